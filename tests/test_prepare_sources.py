"""data/prepare.py on JSON lines, Parquet and Hugging Face datasets, with a given tokenizer, and stopped part-way:
every format gives the tokens its documents give as plain files, a stopped prepare continues to the same files, and
bad records and missing packages are one line with nothing left behind."""
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.runs import assert_user_error, run
from tritongpt.data import prepare as prep
from tritongpt.data.prepare import prepare
from tritongpt.data.tokenizer import Tokenizer

VOCAB = 320

# Documents that JSON and Parquet must carry exactly: newlines, tabs, quotes, backslashes, non-ASCII, a lone "▁".
DOCUMENTS = [f"Document {i}: \"quoted\" \\ back\tslash\n{'ünïcödé 漢字 🎉 ▁ ' * (i % 4)}line two of {i}.\n"
             + "filler words " * (i * 7 % 23) for i in range(60)]


def _ids(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    return np.concatenate([np.fromfile(out / shard["file"], dtype="<u2", offset=32) for shard in meta["shards"][split]])


def _documents(out: Path) -> list[tuple[int, ...]]:
    """Each document's token ids (its end-of-document token left off), train's then val's."""
    eot = json.loads((out / "meta.json").read_text())["eot_id"]
    docs = []
    for split in ("train", "val"):
        ids = _ids(out, split)
        ends = np.flatnonzero(ids == eot)
        docs += [tuple(ids[start + 1:end]) for start, end in zip([-1, *ends[:-1]], ends)]
    return docs


def _files(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The documents as plain files and in every record format, and a tokenizer trained on the plain files."""
    root = tmp_path_factory.mktemp("formats")
    (root / "plain").mkdir()
    for i, text in enumerate(DOCUMENTS):
        (root / "plain" / f"doc{i:02d}.txt").write_text(text)
    lines = "".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in enumerate(DOCUMENTS))
    (root / "docs.jsonl").write_text(lines)
    (root / "docs.json").write_text(lines)
    (root / "docs.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (root / "hub").mkdir()
    (root / "hub" / "train.jsonl").write_text(lines)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": list(range(len(DOCUMENTS))), "text": DOCUMENTS}), root / "docs.parquet",
                   row_group_size=7)
    plain = prepare([str(root / "plain")], root / "plain-out", vocab_size=VOCAB, workers=1, progress=False)
    return root, plain.parent


@pytest.mark.parametrize("source", ["docs.jsonl", "docs.json", "docs.jsonl.gz", "docs.parquet", "hub"])
def test_every_format_gives_the_tokens_of_the_same_documents_as_plain_files(corpus, tmp_path, source):
    root, plain = corpus
    args = ["--hf-dataset", str(root / "hub")] if source == "hub" else [str(root / source)]
    result = run("data/prepare.py", *args, "--out-dir", str(tmp_path / "out"), "--tokenizer",
                 str(plain / "tokenizer.model"), "--workers", "1", "--shard-tokens", "500")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert sorted(_documents(out)) == sorted(_documents(plain))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == len(DOCUMENTS) and meta["val_documents"] == 3, "records 9, 29 and 49"
    assert len(meta["shards"]["train"]) > 3
    # Records are split by their index, whatever the format: the same shards from each.
    reference = tmp_path.parent / "records-reference"
    if not reference.exists():
        prepare([str(root / "docs.jsonl")], reference, tokenizer=str(plain / "tokenizer.model"), workers=2,
                shard_tokens=500, progress=False)
    assert {name: data for name, data in _files(out).items() if name != "meta.json"} == \
        {name: data for name, data in _files(reference).items() if name != "meta.json"}


def test_a_given_tokenizer_is_used_and_copied(corpus, tmp_path):
    root, plain = corpus
    model = (plain / "tokenizer.model").read_bytes()
    meta_path = prepare([str(root / "docs.jsonl")], tmp_path / "out", tokenizer=str(plain / "tokenizer.model"),
                        workers=1, progress=False, vocab_size=100)  # the vocabulary is the tokenizer's
    meta = json.loads(meta_path.read_text())
    assert (tmp_path / "out" / meta["tokenizer"]).read_bytes() == model
    assert meta["vocab_size"] == VOCAB and meta["model_type"] == "bpe"
    tokenizer = Tokenizer(plain / "tokenizer.model")
    assert sorted(_documents(tmp_path / "out")) == sorted(tuple(tokenizer.encode(text)) for text in DOCUMENTS)
    result = run("data/prepare.py", str(root / "docs.jsonl"), "--out-dir", str(tmp_path / "other"),
                 "--tokenizer", str(tmp_path / "nothing.model"))
    assert_user_error(result, f"no tokenizer model at {tmp_path / 'nothing.model'}")
    assert result.returncode == 2 and not (tmp_path / "other").exists()


def _write_lines(path: Path, records: list) -> None:
    path.write_bytes(b"".join(record if isinstance(record, bytes) else json.dumps(record).encode() + b"\n"
                              for record in records))


def test_empty_records_and_blank_lines_are_left_out_and_counted(corpus, tmp_path):
    _, plain = corpus
    _write_lines(tmp_path / "in.jsonl", [{"text": "one"}, {"text": ""}, b"\n", {"text": None}] +
                 [{"text": f"record {i}"} for i in range(30)])
    result = run("data/prepare.py", str(tmp_path / "in.jsonl"), "--out-dir", str(tmp_path / "out"), "--tokenizer",
                 str(plain / "tokenizer.model"))
    assert result.returncode == 0, result.stderr
    assert "left out 3 empty records (a blank line, or an empty or null text)" in result.stdout
    meta = json.loads((tmp_path / "out/meta.json").read_text())
    assert meta["empty_records"] == 3 and meta["documents"] == 31


@pytest.mark.parametrize("case", ["no such field", "not UTF-8", "not JSON", "not text", "a bad record further on"])
def test_a_bad_record_is_one_line_and_leaves_nothing(corpus, tmp_path, case, monkeypatch):
    _, plain = corpus
    good = [{"text": f"record number {i}"} for i in range(400)]
    records, expected = {
        "no such field": ([{"content": "x"}] + good, "in.jsonl line 1 has no 'text' field (it has 'content')"),
        "not UTF-8": ([b'{"text": "caf\xe9"}\n'] + good, "in.jsonl line 1 is not UTF-8 (an invalid byte at column 14)"),
        "not JSON": ([b'{"text": "unclosed}\n'] + good, "in.jsonl line 1 is not JSON"),
        "not text": ([{"text": 42}] + good, "in.jsonl line 1: its 'text' is a int, not text"),
        "a bad record further on": (good + [b"\xff\n"], "in.jsonl line 401 is not UTF-8"),
    }[case]
    _write_lines(tmp_path / "in.jsonl", records)
    # Small blocks and shards, so that shards are complete before the last record is read.
    monkeypatch.setattr(prep, "BLOCK_BYTES", 1000)
    result = run("data/prepare.py", str(tmp_path / "in.jsonl"), "--out-dir", str(tmp_path / "out"), "--tokenizer",
                 str(plain / "tokenizer.model"), "--workers", "1", "--shard-tokens", "100")
    assert_user_error(result, expected)
    assert result.returncode == 2 and not (tmp_path / "out").exists()


def test_a_folder_file_without_the_text_field_is_left_out(corpus, tmp_path):
    root, plain = corpus
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "package.json").write_text('{"name": "a config file, not records"}\n')
    (tmp_path / "in" / "docs.jsonl").write_bytes((root / "docs.jsonl").read_bytes())
    meta_path = prepare([str(tmp_path / "in")], tmp_path / "out", tokenizer=str(plain / "tokenizer.model"),
                        workers=1, progress=False)
    meta = json.loads(meta_path.read_text())
    assert [doc["name"] for doc in meta["left_out"]] == ["package.json"]
    assert "no 'text' field" in meta["left_out"][0]["why"] and meta["documents"] == len(DOCUMENTS)


@pytest.mark.parametrize("module, args", [("pyarrow", ["docs.parquet"]), ("datasets", ["--hf-dataset", "hub"])])
def test_a_missing_optional_package_is_one_line_naming_the_install(corpus, tmp_path, monkeypatch, module, args):
    root, _ = corpus
    for name in [name for name in sys.modules if name == module or name.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import fails
    args = [str(root / arg) if arg != "--hf-dataset" else arg for arg in args]
    result = run("data/prepare.py", *args, "--out-dir", str(tmp_path / "out"))
    assert_user_error(result, f"needs the {module} package; install it with `pip install -e \".[data]\"`")
    assert result.returncode == 2 and not (tmp_path / "out").exists()


def test_a_dataset_that_cannot_be_opened_is_one_line(tmp_path):
    result = run("data/prepare.py", "--hf-dataset", str(tmp_path / "no-such-folder"), "--out-dir",
                 str(tmp_path / "out"))
    assert_user_error(result, f"cannot open --hf-dataset {tmp_path / 'no-such-folder'} split train")
    assert not (tmp_path / "out").exists()


class _Stop(BaseException):
    pass


def test_a_stopped_prepare_continues_from_its_last_complete_shard(corpus, tmp_path, monkeypatch):
    root, plain = corpus
    args = dict(tokenizer=str(plain / "tokenizer.model"), workers=1, progress=False, shard_tokens=400)
    monkeypatch.setattr(prep, "BLOCK_BYTES", 700)
    whole = _files(prepare([str(root / "docs.jsonl")], tmp_path / "whole", **args).parent)
    assert len(whole) > 8

    encoded = []  # the blocks encoded
    real_call = prep.Encoder.__call__
    monkeypatch.setattr(prep.Encoder, "__call__", lambda self, block: encoded.append(block) or real_call(self, block))
    saves = []
    real_write = prep._write_atomically

    def stop_at_the_third_state(path, data):
        if path.name == prep.STATE_FILE and len(saves) == 2:
            raise KeyboardInterrupt  # as Ctrl-C would, with the open shard part-written
        saves.append(path)
        real_write(path, data)

    monkeypatch.setattr(prep, "_write_atomically", stop_at_the_third_state)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare([str(root / "docs.jsonl")], out, **args)
    assert not (out / "meta.json").exists(), "never looks complete"
    stage = out / prep.PARTIAL_DIR
    state = json.loads((stage / prep.STATE_FILE).read_text())
    # The shard open when the state was saved, completed since or not, with tokens written after the state.
    open_shard = f"train-{len(state['train']):06d}.bin"
    open_shard = stage / (open_shard if (stage / open_shard).exists() else open_shard + ".partial")
    with open(open_shard, "ab") as f:
        f.write(b"tokens written after the state was saved")  # as a kill -9 would leave them

    monkeypatch.setattr(prep, "_write_atomically", real_write)
    encoded.clear()
    prepare([str(root / "docs.jsonl")], out, **args)
    assert _files(out) == whole
    total_blocks = sum(1 for _ in prep.blocks(prep.split_documents(prep.find_documents([str(root / "docs.jsonl")])[0],
                                                                   0.05), 700, "text", "train"))
    assert len(encoded) == total_blocks - state["blocks"] and state["blocks"] >= 2, "the blocks saved were not redone"


def test_a_stopped_prepare_of_other_inputs_is_started_afresh(corpus, tmp_path, monkeypatch):
    root, plain = corpus
    out = tmp_path / "out"
    (out / prep.PARTIAL_DIR).mkdir(parents=True)
    (out / prep.PARTIAL_DIR / prep.STATE_FILE).write_text(json.dumps({"inputs_hash": "another corpus"}))
    (out / prep.PARTIAL_DIR / "train-000000.bin").write_bytes(b"stale")
    prepare([str(root / "docs.jsonl")], out, tokenizer=str(plain / "tokenizer.model"), workers=1, progress=False)
    assert not (out / prep.PARTIAL_DIR).exists()
    assert sorted(_documents(out)) == sorted(_documents(plain))


def test_the_bounded_sample_is_all_the_tokenizer_trains_on(tmp_path, monkeypatch):
    # Rows of one 300-byte line each, in runs of 600 bytes: each run drawn gives the sample one row, not both.
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [f"row {i:03d} " + "abcdefghij " * 27 for i in range(100)]
    pq.write_table(pa.table({"text": rows}), tmp_path / "rows.parquet", row_group_size=16)
    trained_on = []
    real_train = prep.train_tokenizer
    monkeypatch.setattr(prep, "train_tokenizer", lambda lines, *a: trained_on.extend(lines) or real_train(lines, *a))
    monkeypatch.setattr(prep, "SAMPLE_BLOCK_BYTES", 500)
    prepare([str(tmp_path / "rows.parquet")], tmp_path / "out", vocab_size=290, workers=1, progress=False,
            tokenizer_sample_mb=0.004)  # 8 runs of the corpus's 50
    assert len(trained_on) == 8 and set(trained_on) < set(rows)
    assert sum(len(line.encode()) for line in trained_on) <= 4_000
    numbers = sorted(int(line.split()[1]) for line in trained_on)
    assert numbers[-1] - numbers[0] > 50, "drawn across the corpus, not from its start"
