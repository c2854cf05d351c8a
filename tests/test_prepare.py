"""data/prepare.py and data/tokenizer.py on small synthetic corpora: every document comes back exactly, the files
agree with meta.json, re-runs reuse, the same inputs give the same files, and bad input ends in one line of error
with any existing dataset intact."""
import errno
import gzip
import hashlib
import io
import json
import random
import re
import shutil
import string
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2

from tritongpt.data import prepare as prep
from tritongpt.data.default_corpus import CAP_BYTES, data_share, default_corpus
from tritongpt.data.prepare import prepare, token_dtype
from tritongpt.data.tokenizer import Tokenizer
from tritongpt.errors import UserError
from tests.runs import assert_user_error, run, split_ids

REPO = Path(__file__).resolve().parent.parent
VOCAB = 400
OUTPUTS = ("tokenizer.model", "train-000000.bin", "val-000000.bin", "meta.json")  # of a corpus under one shard

# Text sentencepiece would alter without the options prepare sets: tabs, runs of spaces, trailing spaces, blank
# lines, CRLF, NFKC-foldable characters (ﬁ, the no-break space), a literal "▁" (sentencepiece's own space mark),
# emoji, CJK, a zero-width space, a NUL and a byte-order mark.
TRICKY = ("def f(x):\n\tif x:\t# tab  \n\t\treturn '日本語 🎉'   \n\n\n    pass\r\n"
          "▁leading mark, ▁▁ two, ﬁne\u00a0text, zero\u200bwidth, nul\x00, \ufeffbom, emoji 👩‍👩‍👧 done.\n  \n")


def _corpus(root: Path) -> dict[str, str]:
    """Writes a corpus under root; returns the text of each document prepare should find, by relative path."""
    docs = {  # two standard-library sources make realistic text
        "top.md": "# Notes\n\n" + Path(string.__file__).read_text(),
        "pkg/mod.py": Path(textwrap.__file__).read_text() + TRICKY,
        # TRICKY's NUL past the first 8 KiB, where prepare looks for NULs to tell binary files.
        "pkg/sub/notes.txt": "中文文本，日本語のテキスト、한국어 텍스트。\r\n" * 150 + TRICKY,
        "pkg/sub/deep/numbers.csv": "".join(f"{i},{i * i},{i / 7:.4f}\n" for i in range(300)),
        "pkg/sub/deep/tabs.tsv": "\t".join("col%d" % i for i in range(8)) + "\n" + "a\t\tb\t \n" * 40,
    }
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode())
    # Skipped: an empty file, a hidden directory, a binary file.
    (root / "pkg/empty.txt").write_text("")
    (root / ".git").mkdir()
    (root / ".git/HEAD").write_text("ref: refs/heads/main\n")
    (root / "pkg/blob.bin").write_bytes(bytes(range(256)) * 4)
    return docs


def _splits(meta_path: Path) -> dict[str, list[str]]:
    """The decoded documents of the train and val shards, split on eot_id."""
    meta = json.loads(meta_path.read_text())
    tokenizer = Tokenizer.from_meta(meta_path)
    out = {}
    for split in ("train", "val"):
        ids = split_ids(meta_path, split)
        ends = np.flatnonzero(ids == meta["eot_id"])
        assert len(ids) == 0 or ids[-1] == meta["eot_id"], "every document ends with eot_id"
        out[split] = [tokenizer.decode(ids[start + 1:end]) for start, end in zip([-1, *ends[:-1]], ends)]
    return out


def _snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    """Every file in out (a folder left behind would show as an error here) with its time and contents."""
    return {path.name: (path.stat().st_mtime_ns, path.read_bytes() if path.is_file() else b"a folder")
            for path in sorted(out.iterdir())}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "data/prepare.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A dataset prepared with two workers: (corpus dir, its documents, meta.json path)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = _corpus(root)
    meta_path = prepare([str(root)], root.parent / "out", vocab_size=VOCAB, workers=2, progress=False)
    return root, docs, meta_path


def test_decode_reproduces_every_document(built):
    _, docs, meta_path = built
    splits = _splits(meta_path)
    assert Counter(splits["train"] + splits["val"]) == Counter(docs.values())
    assert len(splits["val"]) == 1, "5 documents at val_fraction 0.05 still give val one"


def test_meta_agrees_with_files(built):
    _, docs, meta_path = built
    meta = json.loads(meta_path.read_text())
    out = meta_path.parent
    assert {"vocab_size", "dtype", "eot_id", "train_tokens", "val_tokens", "documents", "tokenizer", "model_type",
            "inputs_hash"} <= meta.keys()
    assert meta["dtype"] == "uint16" and meta["model_type"] == "bpe" and meta["documents"] == len(docs)
    assert meta["vocab_size"] == VOCAB == Tokenizer(out / meta["tokenizer"]).vocab_size
    assert (out / "train-000000.bin").stat().st_size == 32 + 2 * meta["train_tokens"] > 32
    assert (out / "val-000000.bin").stat().st_size == 32 + 2 * meta["val_tokens"] > 32
    assert meta["shards"] == {split: [{"file": f"{split}-000000.bin", "tokens": meta[f"{split}_tokens"]}]
                              for split in ("train", "val")}
    assert meta["train_documents"] + meta["val_documents"] == len(docs)
    assert len(meta["inputs_hash"]) == 64 and int(meta["inputs_hash"], 16) >= 0
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS), "no temporary files left behind"


def test_tokenizer_round_trips_tricky_text(built):
    tokenizer = Tokenizer.from_meta(built[2])
    ids = tokenizer.encode(TRICKY)
    assert tokenizer.eot_id not in ids
    assert tokenizer.decode(ids) == TRICKY
    assert tokenizer.decode(np.array(ids + [tokenizer.eot_id], dtype=np.uint16)) == TRICKY


def test_dtype_rule():
    assert token_dtype(4096) == token_dtype(2**16) == "uint16"
    assert token_dtype(2**16 + 1) == token_dtype(100_000) == "uint32"


def test_rerun_reuses_a_change_is_refused_and_overwrite_rebuilds(built, tmp_path):
    root, docs, first = built
    root = shutil.copytree(root, tmp_path / "corpus")
    out = tmp_path / "out"
    meta_path = prepare([str(root)], out, vocab_size=VOCAB, workers=1, progress=False)
    before = _snapshot(out)
    assert prepare([str(root)], out, vocab_size=VOCAB, workers=1, progress=False) == meta_path
    assert _snapshot(out) == before
    assert json.loads(meta_path.read_text())["inputs_hash"] == json.loads(first.read_text())["inputs_hash"]

    (root / "pkg/sub/deep/numbers.csv").write_text("changed\n" * 50)
    with pytest.raises(UserError, match="other inputs or options.*--overwrite"):
        prepare([str(root)], out, vocab_size=VOCAB, workers=1, progress=False)
    assert _snapshot(out) == before  # checkpoints trained on it still have their tokenizer
    result = _cli(str(root), "--out-dir", str(out), "--vocab-size", str(VOCAB + 4))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--overwrite" in result.stderr
    assert _snapshot(out) == before

    prepare([str(root)], out, vocab_size=VOCAB, workers=1, progress=False, overwrite=True)
    assert json.loads(meta_path.read_text())["inputs_hash"] != json.loads(first.read_text())["inputs_hash"]
    splits = _splits(meta_path)
    assert "changed\n" * 50 in splits["train"] + splits["val"]


def test_an_out_dir_inside_an_input_is_not_read_as_input(built, tmp_path):
    root = shutil.copytree(built[0], tmp_path / "corpus")
    out = root / "dataset"  # inside the input directory
    meta_path = prepare([str(root)], out, vocab_size=VOCAB, workers=1, progress=False)
    before = _snapshot(out)
    assert prepare([str(root)], out, vocab_size=VOCAB, workers=1, progress=False) == meta_path
    assert _snapshot(out) == before  # reused: its own files did not change the inputs' hash
    assert json.loads(meta_path.read_text())["inputs_hash"] == json.loads(built[2].read_text())["inputs_hash"]


def test_single_document_is_split_by_characters(tmp_path):
    text = "单一文档 " + Path(prep.__file__).read_text()
    (tmp_path / "one.txt").write_text(text)
    meta_path = prepare([str(tmp_path / "one.txt")], tmp_path / "out", vocab_size=VOCAB, workers=1, progress=False)
    splits = _splits(meta_path)
    assert len(splits["train"]) == len(splits["val"]) == 1
    assert splits["train"][0] and splits["val"][0] and splits["train"][0] + splits["val"][0] == text


def test_large_documents_stream_in_chunks(built, tmp_path, monkeypatch):
    # Chunks cut at character boundaries (the corpus has 3- and 4-byte characters); eot only after a document.
    monkeypatch.setattr(prep, "BLOCK_BYTES", 100)
    root, docs, _ = built
    meta_path = prepare([str(root)], tmp_path / "out", vocab_size=VOCAB, workers=2, progress=False)
    splits = _splits(meta_path)
    assert Counter(splits["train"] + splits["val"]) == Counter(docs.values())


def test_char_model(built, tmp_path):
    root, docs, _ = built
    meta_path = prepare([str(root)], tmp_path / "out", vocab_size=VOCAB, model_type="char", workers=1,
                        progress=False)
    assert json.loads(meta_path.read_text())["model_type"] == "char"
    splits = _splits(meta_path)
    assert Counter(splits["train"] + splits["val"]) == Counter(docs.values())


def test_bad_arguments_raise_user_errors(built, tmp_path):
    root = str(built[0])
    with pytest.raises(UserError, match="model type"):
        prepare([root], tmp_path, model_type="wordpiece", progress=False)
    with pytest.raises(UserError, match=r"--vocab-size \d+ or less"):
        prepare([root], tmp_path, vocab_size=60_000, progress=False)
    with pytest.raises(UserError, match=r"--vocab-size \d+ or more"):
        prepare([root], tmp_path, vocab_size=100, progress=False)
    with pytest.raises(UserError, match=r"blob.bin is not UTF-8 text \(binary: a NUL byte at offset 0\)"):
        prepare([str(built[0] / "pkg/blob.bin")], tmp_path, progress=False)
    assert not list(tmp_path.iterdir()), "nothing written"


@pytest.mark.parametrize("case", ["missing", "empty", "bad number", "unknown flag"])
def test_cli_bad_input_is_one_line_error(tmp_path, case):
    corpus = tmp_path / "corpus"
    if case == "empty":
        corpus.mkdir()
        (corpus / "blank.txt").write_text("")
    extra, expected = {"bad number": (["--vocab-size", "abc"], "invalid int value: 'abc'"),
                       "unknown flag": (["--vocab", "9"], "unrecognized arguments: --vocab")}.get(case, ([], str(corpus)))
    result = _cli(str(corpus), "--out-dir", str(tmp_path / "out"), *extra)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert not (tmp_path / "out").exists()


def test_failure_leaves_existing_dataset_intact(built, tmp_path, monkeypatch):
    root, _, _ = built
    out = tmp_path / "out"
    prepare([str(root)], out, vocab_size=VOCAB, workers=1, progress=False)
    before = _snapshot(out)

    # Failing before anything is written: a vocabulary too large for the corpus, through the CLI.
    result = _cli(str(root), "--out-dir", str(out), "--vocab-size", "60000", "--overwrite")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
    assert _snapshot(out) == before

    # Stopped halfway through writing the new shards (as Ctrl-C would): the new dataset waits in .partial.
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "publish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(root)], out, vocab_size=VOCAB + 10, workers=1, progress=False, overwrite=True)
    assert (out / prep.PARTIAL_DIR / "train-000000.bin").is_file()
    assert {name: stamp for name, stamp in _snapshot(out).items() if name != prep.PARTIAL_DIR} == before

    # Failing halfway (a bug, a bad record): the new dataset's files are gone too.
    monkeypatch.setattr(prep, "publish", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        prepare([str(root)], out, vocab_size=VOCAB + 10, workers=1, progress=False, overwrite=True)
    assert _snapshot(out) == before


def test_tokenizer_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="no tokenizer model"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "junk.model")
    with pytest.raises(UserError, match="not found"):
        Tokenizer.from_meta(tmp_path / "meta.json")


def test_cli_help_lists_options_and_defaults():
    result = _cli("--help")
    assert result.returncode == 0
    for option in ("--out-dir", "--vocab-size", "--model-type", "--val-fraction", "--workers"):
        assert option in result.stdout
    assert "(default: 4096)" in result.stdout and "(default: bpe)" in result.stdout


def test_default_corpus_leaves_out_generated_tables_and_keeps_ordinary_modules():
    docs, left_out = default_corpus()
    kept = {name for name, _, _ in docs}
    why = {doc["name"]: doc["why"] for doc in left_out}
    # A generated codec table (a 256-entry string literal) and the generated keyword list.
    assert "data literals" in why["stdlib/encodings/cp1252.py"] and "stdlib/keyword.py" in why
    assert "stdlib/encodings/cp1252.py" not in kept
    for module in ("abc.py", "argparse.py", "base64.py", "encodings/idna.py", "json/decoder.py"):
        assert f"stdlib/{module}" in kept
    assert not kept & set(why)
    assert any(name.startswith("pydoc_data.topics/") for name in kept)
    assert sum(size for _, _, size in docs) <= CAP_BYTES


def test_data_share_tells_a_table_from_code():
    table = "decoding_table = (\n" + "".join(f"    '\\x{i:02x}'  # 0x{i:02X} -> CHAR {i}\n" for i in range(256)) + ")\n"
    aliases = "aliases = {\n" + "".join(f"    'alias{i}': 'codec_{i}',\n" for i in range(50)) + "}\n"
    code = Path(textwrap.__file__).read_text()
    assert data_share(table) > 0.9 and data_share(aliases) > 0.9
    assert data_share(code) < 0.1
    docstring_only = '"""A package."""\n\nfrom .mod import f\n'
    assert data_share(docstring_only) == 0


def _docs(names: list[str]) -> list[prep.Document]:
    return [prep.Document(name, name.encode(), len(name)) for name in names]


def test_val_split_draws_from_every_folder_whatever_the_input_order():
    names = [f"{folder}/doc{i}.py" for folder in ("code", "docs", "tables", "tests") for i in range(25)]

    def val(docs):
        return [doc.name for doc, pieces in prep.split_documents(docs, 0.08) if pieces == [("val", 0, doc.size)]]

    assert len(val(_docs(names))) == 8
    folders = Counter(name.split("/")[0] for name in val(_docs(names)))
    assert folders == dict.fromkeys(("code", "docs", "tables", "tests"), 2)
    assert sorted(val(_docs(names[::-1]))) == sorted(val(_docs(names)))


def test_records_go_to_val_evenly_spaced():
    splits = [prep.record_split(i, 0.05) for i in range(1000)]
    val = [i for i, split in enumerate(splits) if split == "val"]
    assert val == list(range(9, 1000, 20))


def test_a_changed_split_rule_is_another_dataset(built, tmp_path, monkeypatch):
    root, _, _ = built
    out = tmp_path / "out"
    prepare([str(root)], out, vocab_size=VOCAB, workers=1, progress=False)
    monkeypatch.setattr(prep, "VAL_SPLIT", "the last documents")
    with pytest.raises(UserError, match="other inputs or options"):
        prepare([str(root)], out, vocab_size=VOCAB, workers=1, progress=False)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_and_two_workers_and_two_processes_give_the_same_files(tmp_path):
    # Several blocks, shards and a sample smaller than the corpus: two workers finish blocks out of order.
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa", "mu", "πι", "日本"]
    lines = [" ".join(rng.choice(words) + str(rng.randrange(100)) for _ in range(rng.randrange(1, 9)))
             for _ in range(60_000)]
    for part in range(3):
        (tmp_path / f"part{part}.txt").write_text("\n".join(lines[part::4]) + "\n")
    with open(tmp_path / "part3.jsonl", "w") as f:
        f.writelines(json.dumps({"text": line}) + "\n" for line in lines[3::4])
    parts = [str(tmp_path / name) for name in ("part0.txt", "part1.txt", "part2.txt", "part3.jsonl")]
    assert sum(Path(part).stat().st_size for part in parts) > 4 * prep.BLOCK_BYTES
    for out, workers in (("out1", "1"), ("out2", "2")):
        result = _cli(*parts, "--out-dir", str(tmp_path / out), "--vocab-size", "320", "--workers", workers,
                      "--shard-tokens", "100000", "--tokenizer-sample-mb", "0.3")
        assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (tmp_path / "out1").iterdir())
    assert len(files) > 5 and files == sorted(p.name for p in (tmp_path / "out2").iterdir())
    for name in files:
        assert _sha256(tmp_path / "out1" / name) == _sha256(tmp_path / "out2" / name), name


def _numbered_docs(n_lines: int) -> list[tuple[prep.Document, list]]:
    """Two documents of numbered lines, with empty lines between, as split_documents plans them."""
    text = "".join(f"line {i}\n\n" for i in range(n_lines))
    half = text.index(f"line {n_lines // 2}\n")
    return prep.split_documents([prep.Document(name, part.encode(), len(part.encode())) for name, part in
                                 (("a.txt", text[:half]), ("b.txt", text[half:]))], 0.5)


def _sample(plan, sample_bytes):
    return prep.tokenizer_sample(plan, sample_bytes, "text", "train", progress=False)


def test_the_tokenizer_sample_is_bounded_drawn_evenly_and_the_same_every_time(monkeypatch):
    plan = _numbered_docs(20_000)
    assert _sample(plan, 10**6) == [f"line {i}" for i in range(20_000)], "all of a smaller corpus, in order"
    monkeypatch.setattr(prep, "SAMPLE_BLOCK_BYTES", 400)
    sample = _sample(plan, 40_000)  # 100 blocks of the corpus's 550
    assert sample == _sample(plan, 40_000)
    assert 30_000 < sum(len(line.encode()) + 1 for line in sample) <= 40_000
    numbers = [int(line.split()[1]) for line in sample]
    assert len(set(numbers)) == len(numbers) and numbers == sorted(numbers), "distinct whole lines, in corpus order"
    per_tenth = Counter(number // 2_000 for number in numbers)
    assert sorted(per_tenth) == list(range(10)) and all(100 < count < 800 for count in per_tenth.values())


@pytest.mark.parametrize("size", ["0", "-5", "258"])
def test_a_vocab_size_too_small_for_any_text_is_refused_first(tmp_path, size):
    # Even before the missing input is noticed.
    result = run("data/prepare.py", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "out"),
                 "--vocab-size", size)
    assert_user_error(result, f"vocab size {size} is too small")
    assert result.returncode == 2 and "--vocab-size 259 or more" in result.stderr
    assert not list(tmp_path.iterdir())


def _must_not_train(*args):
    raise AssertionError("the tokenizer was trained")


def test_an_out_dir_that_is_a_file_is_refused_before_any_work(built, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "read_documents", _must_not_train)
    (tmp_path / "a_file").write_text("in the way")
    result = run("data/prepare.py", str(built[0]), "--out-dir", str(tmp_path / "a_file"))
    assert_user_error(result, f"--out-dir {tmp_path / 'a_file'} is a file, not a directory")
    assert result.returncode == 2
    result = run("data/prepare.py", str(built[0]), "--out-dir", str(tmp_path / "a_file" / "sub"))
    assert_user_error(result, f"cannot be made: {tmp_path / 'a_file'} is a file")
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"] and (tmp_path / "a_file").read_text() == "in the way"


def test_a_vocabulary_the_corpus_cannot_fill_is_refused_before_training(built, tmp_path, monkeypatch):
    # The test corpus's text holds fewer than 100,000 distinct characters and pieces of words.
    with monkeypatch.context() as patch:
        patch.setattr(prep, "train_tokenizer", _must_not_train)
        result = run("data/prepare.py", str(built[0]), "--out-dir", str(tmp_path / "out"), "--vocab-size", "100000")
    assert_user_error(result, "vocab size 100000 is more than this corpus can fill")
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    # The check is a bound, never stricter than sentencepiece: the largest vocabulary training reaches passes it.
    assert prep.MAX_TOKEN_CHARS == sentencepiece_model_pb2.TrainerSpec().max_sentencepiece_length
    lines = prep.tokenizer_sample(prep.split_documents(prep.find_documents([str(built[0])])[0], 0.05), 10**7,
                                  "text", "train", progress=False)
    for model_type in ("bpe", "unigram"):
        with pytest.raises(UserError, match=r"--vocab-size \d+ or less") as error:
            prep.train_tokenizer(lines, 60_000, model_type, progress=False)
        largest = int(re.search(r"--vocab-size (\d+) or less", str(error.value))[1])
        prep.check_vocab_size(lines, largest, model_type)
        with pytest.raises(UserError, match="more than this corpus can fill"):
            prep.check_vocab_size(lines, 100_000, model_type)


def test_files_that_are_not_utf8_text_are_left_out_counted_and_listed(built, tmp_path):
    root = shutil.copytree(built[0], tmp_path / "corpus")
    text = "plain text\n" * 3000  # 33,000 bytes: past the start that is searched for NUL bytes
    (root / "notes.txt.gz").write_bytes(gzip.compress(text.encode()))
    (root / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (root / "bad_in_the_middle.txt").write_bytes(text[:20_000].encode() + b"\xff" + text[20_000:].encode())
    (root / "cut_at_the_end.txt").write_bytes(text.encode() + "é".encode()[:1])
    result = run("data/prepare.py", str(root), "--out-dir", str(tmp_path / "out"), "--vocab-size", str(VOCAB))
    assert result.returncode == 0, result.stderr
    assert ("left out 5 files that are not UTF-8 text (0.1 MB): bad_in_the_middle.txt, cut_at_the_end.txt, "
            "latin1.txt, ...; meta.json lists them and why") in result.stdout
    meta = json.loads((tmp_path / "out/meta.json").read_text())
    why = {doc["name"]: doc["why"] for doc in meta["left_out"]}
    assert why == {"bad_in_the_middle.txt": "not UTF-8: an invalid byte at offset 20,000",
                   "cut_at_the_end.txt": "not UTF-8: an invalid byte at offset 33,000",
                   "latin1.txt": "not UTF-8: an invalid byte at offset 3",
                   "notes.txt.gz": "binary: a NUL byte at offset 3",  # gzip's flags byte
                   "pkg/blob.bin": "binary: a NUL byte at offset 0"}
    assert meta["documents"] == 5, "the five text files of the corpus"
    splits = _splits(tmp_path / "out/meta.json")
    assert not any("plain text" in doc for doc in splits["train"] + splits["val"])

    # Named as an input, a file that is not text is an error, whether the bad byte is at its start or further in.
    for name, where in (("latin1.txt", "3"), ("bad_in_the_middle.txt", "20,000")):
        result = run("data/prepare.py", str(root / name), "--out-dir", str(tmp_path / "other"))
        assert_user_error(result, f"{root / name} is not UTF-8 text (not UTF-8: an invalid byte at offset {where})")
        assert result.returncode == 2
    assert not (tmp_path / "other").exists()


class _FullDisk(io.FileIO):
    """A file on a disk that fills after its first 100 bytes."""
    def write(self, data):
        if self.tell() + len(data) > 100:
            super().write(bytes(data)[:100 - self.tell()])
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def _open_on_a_full_disk(path, mode="r", *args, **kwargs):
    return _FullDisk(path, mode) if "w" in mode else open(path, mode, *args, **kwargs)


def test_a_full_disk_is_one_line_and_leaves_no_half_made_dataset(built, tmp_path, monkeypatch):
    root = str(built[0])
    existing = tmp_path / "existing"
    prepare([root], existing, vocab_size=VOCAB, workers=1, progress=False)
    before = _snapshot(existing)
    monkeypatch.setattr(prep, "open", _open_on_a_full_disk, raising=False)

    result = run("data/prepare.py", root, "--out-dir", str(tmp_path / "new" / "dataset"), "--vocab-size", str(VOCAB))
    assert_user_error(result, f"the disk holding {tmp_path / 'new' / 'dataset'} is full (No space left on device)")
    assert result.returncode == 2 and "nothing was left behind" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"], "the folders it made are gone"

    result = run("data/prepare.py", root, "--out-dir", str(existing), "--vocab-size", str(VOCAB + 10), "--overwrite")
    assert_user_error(result, f"the disk holding {existing} is full")
    assert result.returncode == 2 and "the dataset already there is unchanged" in result.stderr
    assert _snapshot(existing) == before
    assert sorted(p.name for p in existing.iterdir()) == sorted(OUTPUTS), "no temporary files left"


def test_overwrite_rebuilds_a_damaged_dataset_of_the_same_inputs(built, tmp_path):
    out = tmp_path / "out"
    meta_path = prepare([str(built[0])], out, vocab_size=VOCAB, workers=1, progress=False)
    whole = (out / "val-000000.bin").read_bytes()
    (out / "val-000000.bin").write_bytes(bytes(len(whole)))  # damaged, its size unchanged
    prepare([str(built[0])], out, vocab_size=VOCAB, workers=1, progress=False, overwrite=True)
    assert (out / "val-000000.bin").read_bytes() == whole and meta_path.is_file()


def test_the_summary_counts_one_document_as_one(tmp_path):
    (tmp_path / "one.txt").write_text("一つだけの文書 " + Path(prep.__file__).read_text())
    result = run("data/prepare.py", str(tmp_path / "one.txt"), "--out-dir", str(tmp_path / "out"),
                 "--vocab-size", str(VOCAB), "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path / 'out' / 'meta.json'}: 1 document, " in result.stdout
