"""The token-window loader: what DDP and exact resume rely on, and the checks that refuse a damaged token file."""
import json
import shutil

import numpy as np
import pytest
import torch

from tests.runs import TINY, assert_user_error, run
from tritongpt.data import loader as loader_module
from tritongpt.data.loader import TokenWindows
from tritongpt.data.shards import HEADER_BYTES, header
from tritongpt.errors import UserError

BLOCK = 8


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)  # each token is its own position: windows are easy to check
    return path


def loader(path, **kw):
    args = dict(dtype="uint16", vocab_size=1000, num_tokens=1000, block_size=BLOCK, micro_batch=4, grad_accum=2,
                seed=7)
    return TokenWindows(path, **{**args, **kw})


def test_windows_are_shifted_pairs(token_file):
    data = loader(token_file)
    x, y = data.fetch(data.next_step()[0])
    assert x.shape == y.shape == (4, BLOCK) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, BLOCK - 1, dtype=torch.long))  # contiguous text


def test_ranks_split_the_global_batch_of_one_process(token_file):
    single = loader(token_file, grad_accum=4)
    ranks = [loader(token_file, grad_accum=4, rank=r, world_size=2) for r in range(2)]
    for _ in range(30):  # across several epochs
        alone = single.next_step()
        per_rank = [r.next_step() for r in ranks]
        assert per_rank[0].shape == (2, 4)
        together = torch.cat([p.flatten() for p in per_rank])
        assert len(set(together.tolist())) == together.numel()  # no two ranks share a window in a step
        assert sorted(together.tolist()) == sorted(alone.flatten().tolist())


def test_an_epoch_visits_each_window_once(token_file):
    data = loader(token_file, micro_batch=5, grad_accum=1)
    seen = []
    while data.epoch == 0:
        seen += data.next_step().flatten().tolist()
    seen = seen[:-5]  # the last call already began epoch 1
    assert len(seen) == len(set(seen))
    starts = sorted(seen)
    # One grid per epoch: windows never overlap, and fewer than one step's worth of them is left out at its end.
    assert all((b - a) % BLOCK == 0 and b - a >= BLOCK for a, b in zip(starts, starts[1:]))
    windows_in_epoch = (1000 - 1 - starts[0] % BLOCK) // BLOCK
    assert windows_in_epoch - 5 < len(seen) <= windows_in_epoch


def test_state_round_trip_continues_identically(token_file):
    a = loader(token_file)
    for _ in range(70):
        a.next_step()
    b = loader(token_file)
    b.load_state_dict(a.state_dict())
    for _ in range(70):
        assert torch.equal(a.next_step(), b.next_step())


def test_eval_batches_are_fixed_and_shared_out_among_ranks(token_file):
    a, b = loader(token_file), loader(token_file)
    a.next_step()
    alone = a.eval_batches(3)
    assert alone.shape == (3, 4) and torch.equal(alone, b.eval_batches(3))
    shares = [loader(token_file, rank=r, world_size=2).eval_batches(3) for r in range(2)]
    assert [len(s) for s in shares] == [2, 1]  # batches 0 and 2, batch 1
    assert sorted(torch.cat(shares).flatten().tolist()) == sorted(alone.flatten().tolist())


def test_short_split_and_bad_accumulation_are_user_errors(tmp_path, token_file):
    short = tmp_path / "val.bin"
    np.arange(BLOCK, dtype=np.uint16).tofile(short)
    with pytest.raises(UserError, match="fewer than block_size \\+ 1"):
        loader(short, num_tokens=BLOCK)
    with pytest.raises(UserError, match="does not divide by the 2 processes"):
        loader(token_file, grad_accum=3, world_size=2)
    with pytest.raises(UserError, match="missing"):
        loader(tmp_path / "nothing.bin")


@pytest.mark.parametrize("damage, message", [
    ("odd size", "holds 1,999 bytes, not a whole number of uint16 tokens but meta.json records 1,000"),
    ("empty", "is empty but meta.json records 1,000"),
    ("cut short", "holds 600 tokens but meta.json records 1,000"),
    ("too long", "holds 1,200 tokens but meta.json records 1,000"),
    ("an id past the vocabulary", "holds token id 5000 at position 777, outside the 1000-token vocabulary"),
])
def test_a_damaged_token_file_is_refused_on_opening(token_file, damage, message):
    tokens = np.fromfile(token_file, dtype=np.uint16)
    if damage == "odd size":
        token_file.write_bytes(token_file.read_bytes()[:-1])
    elif damage == "empty":
        token_file.write_bytes(b"")
    elif damage == "cut short":
        tokens[:600].tofile(token_file)
    elif damage == "too long":
        np.concatenate([tokens, tokens[:200]]).tofile(token_file)
    else:
        tokens[777] = 5000
        tokens.tofile(token_file)
    with pytest.raises(UserError, match=message) as error:
        loader(token_file)
    assert str(token_file) in str(error.value) and "data/prepare.py" in str(error.value)
    assert "--overwrite" in str(error.value)


def test_an_id_the_opening_check_missed_stops_the_batch_that_holds_it(token_file, monkeypatch):
    # Two checked runs of 100 tokens: the start and the end of the file; position 500 lies between them.
    monkeypatch.setattr(loader_module, "CHECKED_RUNS", 2)
    monkeypatch.setattr(loader_module, "CHECKED_RUN_TOKENS", 100)
    tokens = np.arange(1000, dtype=np.uint16)
    tokens[500] = 1000
    tokens.tofile(token_file)
    data = loader(token_file)
    assert data.fetch(torch.tensor([0, 100, 900]))[0].shape == (3, BLOCK)
    with pytest.raises(UserError, match="holds token id 1000 at position 500, outside the 1000-token vocabulary"):
        data.fetch(torch.tensor([0, 496]))


@pytest.mark.parametrize("damage", ["truncated train shard", "val shard of random tokens", "meta.json without sizes"])
def test_train_refuses_a_damaged_dataset_in_one_line(tiny_dataset, tmp_path, damage):
    data = shutil.copytree(tiny_dataset, tmp_path / "data")
    if damage == "truncated train shard":
        train_bin = data / "train-000000.bin"
        train_bin.write_bytes(train_bin.read_bytes()[:-64])  # an even cut: a whole number of tokens
        expected = f"{train_bin} holds"
    elif damage == "val shard of random tokens":
        val_bin = data / "val-000000.bin"
        raw = val_bin.read_bytes()
        val_bin.write_bytes(raw[:HEADER_BYTES] + np.random.default_rng(0).bytes(len(raw) - HEADER_BYTES))
        expected = f"{val_bin} holds token id"
    else:
        meta = json.loads((data / "meta.json").read_text())
        del meta["train_tokens"]
        (data / "meta.json").write_text(json.dumps(meta))
        expected = "lacks train_tokens"
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    result = run("train.py", "--data-dir", str(data), "--out-dir", str(tmp_path / "out"), *TINY, "--max-iters", "2")
    assert_user_error(result, expected)
    assert result.returncode == 2
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    assert not (tmp_path / "out").exists()


def write_shards(folder, lengths, dtype="uint16"):
    """Shards of the given lengths whose tokens are their positions in the split (so windows are easy to check)."""
    paths, start = [], 0
    for i, length in enumerate(lengths):
        path = folder / f"train-{i:06d}.bin"
        path.write_bytes(header(dtype, length) + np.arange(start, start + length, dtype=dtype).tobytes())
        paths.append(path)
        start += length
    return paths


def test_windows_are_drawn_from_every_shard_and_never_span_two(tmp_path):
    lengths = [300, 97, 403]  # ends 300, 397, 800
    data = loader(write_shards(tmp_path, lengths), num_tokens=800, vocab_size=800, micro_batch=5, grad_accum=1)
    seen = []
    while data.epoch == 0:
        starts = data.next_step()
        x, y = data.fetch(starts[0])
        assert torch.equal(x[:, 0], starts[0]), "a window's first token is its position in the split"
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(5, BLOCK - 1, dtype=torch.long)), "within one shard"
        seen += starts.flatten().tolist()
    seen = seen[:-5]  # the last call already began epoch 1
    ends = np.cumsum(lengths)
    shard_of = [int(np.searchsorted(ends, s, side="right")) for s in seen]
    assert all(s + BLOCK < ends[k] for s, k in zip(seen, shard_of)), "x and y lie in the shard they start in"
    assert set(shard_of) == {0, 1, 2} and len(seen) == len(set(seen))
    offset = seen[0] % BLOCK if shard_of[0] == 0 else (seen[0] - ends[shard_of[0] - 1]) % BLOCK
    # Every window of the epoch's grid in each shard, less the fewer than one step's worth left at its end.
    windows = sum((length - 1 - offset) // BLOCK for length in lengths)
    assert windows - 5 < len(seen) <= windows


def test_an_unsharded_dataset_of_an_earlier_version_loads_and_keeps_its_order(token_file):
    meta = dict(dtype="uint16", vocab_size=1000, train_tokens=1000)  # no "shards": train.bin, val.bin
    assert TokenWindows.split_files(token_file.parent, meta, "train") == token_file
    data = loader(TokenWindows.split_files(token_file.parent, meta, "train"), micro_batch=1, grad_accum=1)
    # The order earlier versions drew, so that their runs resume on the same windows.
    g = torch.Generator().manual_seed(7 * 1_000_003)
    offset = int(torch.randint(BLOCK, (1,), generator=g))
    order = offset + torch.randperm((1000 - 1 - offset) // BLOCK, generator=g) * BLOCK
    assert [int(data.next_step()) for _ in range(len(order))] == order.tolist()


def test_sharded_and_single_file_splits_give_the_same_windows_for_one_shard(tmp_path, token_file):
    sharded = loader(write_shards(tmp_path, [1000]), micro_batch=4, grad_accum=2)
    single = loader(token_file, micro_batch=4, grad_accum=2)
    for _ in range(40):
        starts = sharded.next_step()
        assert torch.equal(starts, single.next_step())
        assert all(torch.equal(a, b) for a, b in zip(sharded.fetch(starts[0]), single.fetch(starts[0])))
    assert torch.equal(sharded.eval_batches(3), single.eval_batches(3))


@pytest.mark.parametrize("damage, message", [
    ("no header", "is not a token shard"),
    ("cut short", "holds 1,000 bytes of tokens but its header records 600"),
    ("other dtype", "holds uint32 tokens but meta.json records uint16"),
    ("missing", "token shard .* is missing"),
    ("counts disagree", "hold 700 tokens but meta.json records 701"),
])
def test_a_damaged_shard_is_refused_on_opening(tmp_path, damage, message):
    paths = write_shards(tmp_path, [600, 100])
    if damage == "no header":
        paths[0].write_bytes(np.arange(600, dtype=np.uint16).tobytes())
    elif damage == "cut short":
        paths[0].write_bytes(paths[0].read_bytes()[:HEADER_BYTES + 1000])
    elif damage == "other dtype":
        paths[1].write_bytes(header("uint32", 100) + np.arange(100, dtype=np.uint32).tobytes())
    elif damage == "missing":
        paths[1].unlink()
    with pytest.raises(UserError, match=message) as error:
        loader(paths, num_tokens=701 if damage == "counts disagree" else 700)
    assert "Traceback" not in str(error.value)
