"""The token-window loader: what DDP and exact resume rely on."""
import numpy as np
import pytest
import torch

from tritongpt.data.loader import TokenWindows
from tritongpt.errors import UserError

BLOCK = 8


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)  # each token is its own position: windows are easy to check
    return path


def loader(path, **kw):
    args = dict(dtype="uint16", block_size=BLOCK, micro_batch=4, grad_accum=2, seed=7)
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
        loader(short)
    with pytest.raises(UserError, match="does not divide by the 2 processes"):
        loader(token_file, grad_accum=3, world_size=2)
    with pytest.raises(UserError, match="missing"):
        loader(tmp_path / "nothing.bin")
