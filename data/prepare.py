"""Turns text into the token shards the trainer reads, and trains the tokenizer that makes them.

`python data/prepare.py [INPUT ...]`: the inputs are text files, JSON lines (.jsonl, .json, .jsonl.gz, .json.gz),
Parquet files, or directories searched recursively for them; `--hf-dataset` adds a Hugging Face dataset; with none,
the Python documentation and standard library sources that ship with every CPython (data/default_corpus.py). It
trains a sentencepiece tokenizer on a sample of them (or takes the one `--tokenizer` names), encodes every document
followed by an end-of-document token, and writes to the output directory:

    tokenizer.model       the sentencepiece model; data/tokenizer.py loads it (tokenizer.json for a Hugging Face one)
    train-NNNNNN.bin,     shards of --shard-tokens token ids each (the last of a split holds the rest), in the format
    val-NNNNNN.bin        data/shards.py describes: a small header, then little-endian uint16 ids when the
                          vocabulary fits, uint32 otherwise
    meta.json             vocab_size, dtype, eot_id, token and document counts, the shards, the tokenizer file, the
                          split rule, what was left out and why (machine-made sources of the default corpus, files
                          that are not text, empty records), inputs_hash

Files in a folder that are not UTF-8 text throughout (binary, compressed, another encoding) are left out, counted
and listed in meta.json; a file named as an input that is not is an error, and so is a record that is not UTF-8 or
lacks --text-field. The tokenizer trains on a sample of at most --tokenizer-sample-mb, blocks of text drawn
uniformly across the whole corpus with a fixed seed, so the same inputs always give the same tokenizer.

Encoding runs on --workers processes, each taking one block of input at a time; blocks are cut by the input alone
and written in input order, so the files are byte-identical for any number of workers. Memory holds the sample and
a few blocks per worker, however large the corpus.

Run again on the same inputs and options, it reuses what is there; a dataset built from other inputs or options is
replaced only with --overwrite (checkpoints trained on it depend on its tokenizer), which also rebuilds one that
is there already. The new dataset is built in OUT_DIR/.partial and moved into place once complete, meta.json last
and atomically, so a failure leaves an existing dataset whole and never a dataset that looks complete when it is
not. A prepare that is stopped (Ctrl-C, killed) continues from its last complete shard when run again with the same
inputs and options; one that fails on bad input or a full disk removes what it wrote.
"""
import codecs
import contextlib
import errno
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tqdm import tqdm

from tritongpt.data import shards
from tritongpt.data.default_corpus import default_corpus
from tritongpt.data.sources import (Block, Document, blocks, char_start, check_text_field, record_kind, record_texts,
                                    require)
from tritongpt.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_bytes
from tritongpt.errors import UserError
from tritongpt.options import option, parse_options, run_main

MODEL_TYPES = ("bpe", "unigram", "char")
DEFAULT_VOCAB_SIZE = 4096
TOKENIZER_FILE = "tokenizer.model"
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_SAMPLE_MB = 20.0
BLOCK_BYTES = 1 << 18  # encoding takes the input in blocks of about this size, so one huge file streams through too
SAMPLE_BLOCK_BYTES = 1 << 16  # the tokenizer sample is made of runs of text this long, drawn across the corpus
BYTES_PER_WORKER = 16_000_000  # by default, no more workers than one per this much input
BLOCKS_IN_FLIGHT = 4  # per worker: enough queued to keep it busy, few enough to bound memory
PARTIAL_DIR = ".partial"  # a dataset being built, in OUT_DIR
STATE_FILE = "state.json"  # in PARTIAL_DIR: how far it got, to continue from there
SNIFF_BYTES = 8192  # a file with a NUL this near its start is binary (as git tells), even if it is valid UTF-8
MAX_SENTENCE_CHARS = 4096  # longer lines are cut into pieces this long for tokenizer training
SAMPLE_SEED = 0
# Tokens every vocabulary holds before any text: the 256 bytes, <unk> and the end-of-document token, and then at
# least one character.
MIN_VOCAB_SIZE = 256 + 2 + 1
MAX_TOKEN_CHARS = 16  # sentencepiece's max_sentencepiece_length, left at its default
# How split_documents picks val; it enters inputs_hash, so a dataset split another way is rebuilt.
VAL_SPLIT = ("text files: documents evenly spaced along the corpus ordered by folder, then by a hash of the name; "
             "records: evenly spaced by their index")

# Options for every tokenizer; they enter inputs_hash, so changing one here rebuilds the datasets.
SENTENCEPIECE_OPTIONS = dict(
    # Text comes back exactly as it went in: no NFKC, runs of spaces (indentation) kept, no space added in front.
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    # A character outside the vocabulary becomes its UTF-8 bytes, never <unk>. Newlines always do (one token each):
    # the tokenizer trains on single lines.
    byte_fallback=True,
    allow_whitespace_only_pieces=True,  # runs of indentation become single tokens
    split_digits=True,  # numbers as digits rather than memorized pieces
    unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,  # eos (</s>) is the end-of-document token
    max_sentence_length=4 * MAX_SENTENCE_CHARS,  # in bytes
    # tokenizer_sample draws the lines (bounded by --tokenizer-sample-mb): sentencepiece's own draw differs from one
    # process to the next, so it takes them all.
    input_sentence_size=0,
    shuffle_input_sentence=True,
    # Fixed rather than one per core: a unigram model comes out different for a different number of threads.
    num_threads=4,
)
MODEL_TYPE_NAMES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}  # sentencepiece's TrainerSpec.ModelType


def prepare(inputs: list[str] | None = None, out_dir: str | Path = "data/default", vocab_size: int = DEFAULT_VOCAB_SIZE,
            model_type: str = "bpe", val_fraction: float = 0.05, workers: int | None = None,
            progress: bool = True, overwrite: bool = False, text_field: str = "text", hf_dataset: str | None = None,
            hf_split: str = "train", tokenizer: str | None = None, tokenizer_sample_mb: float = DEFAULT_SAMPLE_MB,
            shard_tokens: int = DEFAULT_SHARD_TOKENS) -> Path:
    """Builds the dataset in out_dir (or reuses the one there, when made from the same inputs and options) and
    returns the path of its meta.json. With overwrite, it builds it anew whatever is there; without, a dataset there
    from other inputs or options is an error."""
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown model type {model_type!r}; use one of {', '.join(MODEL_TYPES)}")
    given = load_tokenizer(tokenizer) if tokenizer is not None else None
    if given is None and vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab size {vocab_size} is too small: 258 tokens (the 256 bytes, unknown and "
                        f"end-of-document) come before any text; pass --vocab-size {MIN_VOCAB_SIZE} or more (default "
                        f"{DEFAULT_VOCAB_SIZE})")
    if not 0 < val_fraction < 1:
        raise UserError(f"val fraction {val_fraction} is not between 0 and 1; pass e.g. --val-fraction 0.05")
    if workers is not None and workers < 1:
        raise UserError(f"{workers} workers; pass --workers 1 or more")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens {shard_tokens} is not positive; pass e.g. --shard-tokens 100000000")
    if not tokenizer_sample_mb > 0:
        raise UserError(f"--tokenizer-sample-mb {tokenizer_sample_mb} is not positive; pass e.g. "
                        f"--tokenizer-sample-mb {DEFAULT_SAMPLE_MB:g}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    docs, machine_made = find_documents(inputs, skip=out_dir) if inputs or hf_dataset is None else ([], [])
    if hf_dataset is not None:
        docs.append(Document(f"{hf_dataset}:{hf_split}", hf_dataset, 0, named=True, kind="hub"))
    options = dict(vocab_size=vocab_size, model_type=model_type, val_fraction=val_fraction, val_split=VAL_SPLIT,
                   sentencepiece=SENTENCEPIECE_OPTIONS, shard_tokens=shard_tokens, text_field=text_field,
                   tokenizer_sample_mb=tokenizer_sample_mb, shard_format=shards.VERSION)
    if given is not None:  # the tokenizer replaces the options that train one
        options.update(vocab_size=given.vocab_size, model_type=None, tokenizer_sample_mb=None,
                       tokenizer_sha256=hashlib.sha256(given.model).hexdigest())
    docs, not_text, digest = read_documents(docs, options, progress)
    if any(doc.kind == "parquet" for doc in docs):
        require("pyarrow.parquet", "Parquet files")
    for doc in [doc for doc in docs if doc.kind != "text"]:
        try:
            check_text_field(doc, text_field, hf_split)
        except UserError as e:  # a file in a folder that holds no such records is left out, as one not text is
            if doc.named:
                raise
            docs.remove(doc)
            not_text.append(dict(name=doc.name, bytes=doc.size, why=f"not records with a {text_field!r} field ({e})"))
    if not docs:
        raise UserError(f"no text in {' '.join(inputs)}: no non-empty UTF-8 files or records found; pass text, JSON "
                        "lines or Parquet files or directories that contain some (or no inputs, for the default "
                        "corpus)")
    if not overwrite and _reusable(out_dir, digest):
        if progress:
            print(f"{out_dir} already holds this dataset; reusing it")
        return out_dir / "meta.json"
    had_dataset = (out_dir / "meta.json").exists()
    if had_dataset and not overwrite:
        raise UserError(f"{out_dir} holds a dataset built from other inputs or options, and checkpoints trained on it "
                        "need its tokenizer; pass --overwrite to replace it, or another --out-dir")
    if machine_made and progress:
        print(f"left out {_count(len(machine_made), 'machine-made source')} ({_megabytes(machine_made)}), mostly data "
              "literals; meta.json lists them")
    if not_text and progress:
        names = ", ".join(doc["name"] for doc in not_text[:3]) + (", ..." if len(not_text) > 3 else "")
        print(f"left out {_count(len(not_text), 'file')} that {'is' if len(not_text) == 1 else 'are'} not UTF-8 text "
              f"({_megabytes(not_text)}): {names}; meta.json lists them and why")

    plan = split_documents(docs, val_fraction)
    if workers is None:  # starting a process costs about what encoding a few MB does
        workers = max(1, min(os.cpu_count() or 1, sum(doc.size for doc in docs) // BYTES_PER_WORKER or 1_000_000))
    stage = out_dir / PARTIAL_DIR
    # What the workers rebuild the tokenizer from: its kind, the file the dataset keeps, its end-of-document token.
    kind, file_name, eot_id = ((given.kind, given.file_name, given.eot_id) if given is not None
                               else (Tokenizer.kind, TOKENIZER_FILE, None))
    state = _resume_state(stage, digest, file_name)
    if state is not None:
        model = (stage / file_name).read_bytes()
        if progress:
            print(f"continuing the dataset in {stage} from {_count(len(state['train']) + len(state['val']), 'shard')} "
                  "written before")
    elif given is not None:
        model = given.model
    else:
        lines = tokenizer_sample(plan, int(tokenizer_sample_mb * 1e6), text_field, hf_split, progress)
        check_vocab_size(lines, vocab_size, model_type)
        model = train_tokenizer(lines, vocab_size, model_type, progress)
        del lines
    made = _make_out_dir(out_dir)
    try:
        if state is None:
            shutil.rmtree(stage, ignore_errors=True)  # another dataset's, stopped: of no use to this one
            stage.mkdir()
            _write_atomically(stage / file_name, model)
        meta = write_shards(stage, (kind, model, eot_id), file_name, plan, val_fraction, text_field, hf_split,
                            shard_tokens, workers, state, digest, progress)
        meta.update(model_type=_given_model_type(given) if given is not None else model_type,
                    val_fraction=val_fraction, val_split=VAL_SPLIT, text_field=text_field,
                    left_out=machine_made + not_text, inputs_hash=digest)
        publish(stage, out_dir, meta)
        if meta["empty_records"] and progress:
            print(f"left out {_count(meta['empty_records'], 'empty record')} (a blank line, or an empty or null "
                  "text)")
    except KeyboardInterrupt:  # stopped, not failed: what is complete stays, to continue from
        if progress and (stage / STATE_FILE).exists():
            print(f"{stage} keeps the shards complete so far: the same command continues from them", file=sys.stderr)
        raise
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in made:  # empty again: the partial dataset is gone
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = "the dataset already there is unchanged" if had_dataset else "nothing was left behind"
            raise UserError(f"the disk holding {out_dir} is full ({e.strerror}); free some space there or pass an "
                            f"--out-dir on another disk ({kept})") from None
        raise
    return out_dir / "meta.json"


def _given_model_type(tokenizer) -> str:
    if tokenizer.kind != Tokenizer.kind:
        return tokenizer.kind
    spec = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.model).trainer_spec
    return MODEL_TYPE_NAMES.get(spec.model_type, "unknown")


def _write_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        temp.replace(path)
    finally:
        temp.unlink(missing_ok=True)


def _resume_state(stage: Path, digest: str, tokenizer_file: str) -> dict | None:
    """What a stopped prepare of the same inputs and options wrote in stage, when its files are all there: {"blocks":
    blocks written, "train"/"val": token counts of the complete shards, "open": tokens of the open shard per split}."""
    try:
        state = json.loads((stage / STATE_FILE).read_text())
        if state["inputs_hash"] != digest or not (stage / tokenizer_file).is_file():
            return None
        for split in ("train", "val"):
            for index, count in enumerate(state[split]):
                if shards.read_header(stage / shards.shard_name(split, index))[1] != count:
                    return None
            open_path = stage / _open_name(split, len(state[split]))
            completed_since = stage / shards.shard_name(split, len(state[split]))
            if not open_path.exists() and completed_since.exists():  # completed after the state was saved
                completed_since.replace(open_path)
            if open_path.stat().st_size < _open_size(state, split):
                return None
        return state
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return None


def _open_name(split: str, index: int) -> str:
    return shards.shard_name(split, index) + ".partial"


def _open_size(state: dict, split: str) -> int:
    return shards.HEADER_BYTES + state["open"][split] * np.dtype(state["dtype"]).itemsize


def write_shards(stage: Path, recipe: tuple, tokenizer_file: str, plan: list, val_fraction: float, text_field: str,
                 hf_split: str, shard_tokens: int, workers: int, state: dict | None, digest: str,
                 progress: bool) -> dict:
    """Encodes the corpus into shards in stage, continuing from state when given; returns meta.json's counts.
    recipe: (kind, file bytes, end-of-document id) of the tokenizer."""
    tokenizer = _rebuild(recipe)
    dtype = token_dtype(tokenizer.vocab_size)
    if state is None:
        state = dict(inputs_hash=digest, dtype=dtype, blocks=0, train=[], val=[], open=dict(train=0, val=0),
                     documents=dict(train=0, val=0), empty_records=0)
    writers = {split: SplitWriter(stage, split, dtype, shard_tokens, state) for split in ("train", "val")}
    todo = blocks(plan, BLOCK_BYTES, text_field, hf_split)
    total = None if any(doc.kind == "hub" for doc, _ in plan) else sum(doc.size for doc, _ in plan)
    with tqdm(total=total, desc="encoding", unit="B", unit_scale=True, disable=None if progress else True) as bar:
        for _ in range(state["blocks"]):  # written before it was stopped
            bar.update(next(todo).nbytes)
        started, encoded, cpu = time.perf_counter(), 0, _cpu_seconds()
        for result in _ordered_map(todo, workers, (recipe, dtype, text_field, val_fraction)):
            completed = [writers[split].write(result[split]) for split in ("train", "val")]
            for split in ("train", "val"):
                state["documents"][split] += result[f"{split}_documents"]
            state["empty_records"] += result["empty_records"]
            state["blocks"] += 1
            if any(completed):  # a point to continue from
                for writer in writers.values():
                    writer.sync()
                _write_atomically(stage / STATE_FILE, json.dumps(state).encode())
            bar.update(result["nbytes"])
            encoded += result["nbytes"]
        for writer in writers.values():
            writer.finish()
        seconds = time.perf_counter() - started
    if progress:
        # CPU time tells how the work divides whatever else the machine runs: the main process reads and writes,
        # the workers parse and encode.
        here, in_workers = (now - before for now, before in zip(_cpu_seconds(), cpu))
        print(f"encoded {encoded / 1e6:,.1f} MB in {seconds:,.1f} s ({encoded / 1e6 / max(seconds, 1e-9):,.2f} MB/s) "
              f"on {_count(workers, 'worker')}; CPU {here:,.1f} s in this process, {in_workers:,.1f} s in workers")
    tokens = {split: sum(state[split]) for split in ("train", "val")}
    if not tokens["train"] or not tokens["val"]:
        empty = "train" if not tokens["train"] else "val"
        raise UserError(f"no document fell in {empty} at --val-fraction {val_fraction}: the corpus has too few "
                        f"documents or records; pass a {'smaller' if empty == 'train' else 'larger'} --val-fraction "
                        "or more text")
    return dict(
        vocab_size=tokenizer.vocab_size, dtype=dtype, eot_id=tokenizer.eot_id,
        train_tokens=tokens["train"], val_tokens=tokens["val"],
        # Documents (text files and records) per split, each followed by eot_id (a single input document is split
        # in two).
        documents=sum(state["documents"].values()) - sum(len(pieces) - 1 for _, pieces in plan if pieces),
        train_documents=state["documents"]["train"], val_documents=state["documents"]["val"],
        empty_records=state["empty_records"], tokenizer=tokenizer_file, tokenizer_kind=tokenizer.kind,
        shard_tokens=shard_tokens,
        shards={split: [dict(file=shards.shard_name(split, i), tokens=count) for i, count in enumerate(state[split])]
                for split in ("train", "val")},
    )


class SplitWriter:
    """Writes a split's tokens as shards of shard_tokens: the open one as NAME.partial, renamed once full. The
    token counts of the complete shards and of the open one are kept in state (shared with write_shards)."""

    def __init__(self, stage: Path, split: str, dtype: str, shard_tokens: int, state: dict):
        self.stage, self.split, self.dtype, self.shard_tokens, self.state = stage, split, dtype, shard_tokens, state
        self.itemsize = np.dtype(dtype).itemsize
        self._open()

    @property
    def _path(self) -> Path:
        return self.stage / _open_name(self.split, len(self.state[self.split]))

    def _open(self) -> None:
        held = self.state["open"][self.split]
        if held:  # a stopped prepare's: anything written after its last saved state goes
            self.file = open(self._path, "r+b")
            self.file.truncate(shards.HEADER_BYTES + held * self.itemsize)
            self.file.seek(0, os.SEEK_END)
        else:
            self.file = open(self._path, "wb")
            self.file.write(shards.header(self.dtype, 0))

    def write(self, data: bytes) -> bool:
        """Appends the tokens; returns whether that completed a shard."""
        completed = False
        while data:
            room = (self.shard_tokens - self.state["open"][self.split]) * self.itemsize
            self.file.write(data[:room])
            self.state["open"][self.split] += len(data[:room]) // self.itemsize
            data = data[room:]
            if self.state["open"][self.split] == self.shard_tokens:
                self._complete()
                self._open()
                completed = True
        return completed

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def finish(self) -> None:
        if self.state["open"][self.split]:
            self._complete()
        else:
            self.file.close()
            self._path.unlink()

    def _complete(self) -> None:
        self.file.seek(0)
        self.file.write(shards.header(self.dtype, self.state["open"][self.split]))
        self.sync()
        self.file.close()
        self._path.replace(self.stage / shards.shard_name(self.split, len(self.state[self.split])))
        self.state[self.split].append(self.state["open"][self.split])
        self.state["open"][self.split] = 0


def _rebuild(recipe: tuple):
    kind, model, eot_id = recipe
    return tokenizer_from_bytes(kind, model, "the tokenizer", eot_id)


class Encoder:
    """Turns a block into its token ids per split, each document followed by the end-of-document token."""

    def __init__(self, recipe: tuple, dtype: str, text_field: str, val_fraction: float):
        self.tokenizer = _rebuild(recipe)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.text_field, self.val_fraction = text_field, val_fraction

    def __call__(self, block: Block) -> dict:
        if block.kind == "text":
            # read_documents found it UTF-8; should it have changed since, what is not becomes U+FFFD.
            pieces = [(block.split, block.payload.decode("utf-8", errors="replace"), block.ends_document)]
            empty = 0
        else:
            texts = record_texts(block, self.text_field)
            pieces = [(record_split(block.first_record + i, self.val_fraction), text, True)
                      for i, text in enumerate(texts) if text is not None]
            empty = len(texts) - len(pieces)
        ids = {"train": [], "val": []}
        result = dict(train_documents=0, val_documents=0, empty_records=empty, nbytes=block.nbytes)
        for (split, _, ends), tokens in zip(pieces, self.tokenizer.encode_batch([text for _, text, _ in pieces])):
            ids[split] += tokens
            if ends:
                ids[split].append(self.tokenizer.eot_id)
                result[f"{split}_documents"] += 1
        return result | {split: np.array(ids[split], dtype=self.dtype).tobytes() for split in ids}


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds of this process and of its finished child processes (the workers, once the pool is shut down)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def record_split(index: int, val_fraction: float) -> str:
    """Records go to val evenly spaced: one in every 1 / val_fraction, the first half-way along the first run."""
    return "val" if int((index + 1) * val_fraction + 0.5) > int(index * val_fraction + 0.5) else "train"


_encoder: Encoder | None = None  # a worker process's


def _start_worker(*args) -> None:
    global _encoder
    # Ctrl-C reaches every process of the terminal: the main process alone stops the work, keeping what is complete.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _encoder = Encoder(*args)


def _encode_in_worker(block: Block) -> dict:
    return _encoder(block)


def _ordered_map(todo, workers: int, encoder_args: tuple):
    """Each block's encoding, in input order, from `workers` processes that each take a block at a time; a few
    blocks per worker are read ahead, never more."""
    if workers == 1:
        yield from map(Encoder(*encoder_args), todo)
        return
    # spawn, not fork: the calling process may hold threads (a test runner's, torch's) that fork would copy locked.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=encoder_args)
    try:
        pending = deque()
        for block in todo:
            pending.append(pool.submit(_encode_in_worker, block))
            if len(pending) >= workers * BLOCKS_IN_FLIGHT:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def publish(stage: Path, out_dir: Path, meta: dict) -> None:
    """Moves the complete dataset from stage into out_dir, replacing the one there: meta.json goes first (a crash
    part-way then leaves no dataset, which the next run rebuilds, rather than an old meta.json over new files) and
    comes back last, atomically."""
    names = [meta["tokenizer"]] + [shard["file"] for split in ("train", "val") for shard in meta["shards"][split]]
    meta["files"] = {name: (stage / name).stat().st_size for name in names}
    old = _dataset_files(out_dir)
    (out_dir / "meta.json").unlink(missing_ok=True)
    for name in names:
        (stage / name).replace(out_dir / name)
    for name in old - set(names):
        (out_dir / name).unlink(missing_ok=True)
    _write_atomically(out_dir / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    shutil.rmtree(stage)


def _dataset_files(out_dir: Path) -> set[str]:
    """The files of the dataset in out_dir, as its meta.json lists them (only names this script writes)."""
    try:
        listed = json.loads((out_dir / "meta.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    ours = re.compile(r"(train|val)(-\d{6})?\.bin|tokenizer\.(model|json)")
    return {name for name in listed if isinstance(name, str) and ours.fullmatch(name)}


def _check_out_dir(out_dir: Path) -> None:
    """Refuses, before any work, an out_dir that is a file or lies where nothing can be written; creates nothing."""
    existing = next(path for path in (out_dir, *out_dir.parents) if path.exists())
    if existing == out_dir and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir} is a file, not a directory; pass another --out-dir")
    if not existing.is_dir():
        raise UserError(f"--out-dir {out_dir} cannot be made: {existing} is a file; pass another --out-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {existing}; pass an --out-dir you can write to")


def _make_out_dir(out_dir: Path) -> list[Path]:
    """Creates out_dir and any missing parents; returns those it created, deepest first."""
    made = [path for path in (out_dir, *out_dir.parents) if not path.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out_dir} ({e.strerror}); pass another --out-dir") from None
    return made


def find_documents(inputs: list[str] | None, skip: Path | None = None) -> tuple[list[Document], list[dict]]:
    """(the non-empty documents of the inputs, in order (directories walked in sorted order), or of the default
    corpus; the sources the default corpus leaves out, and why). A folder `skip` (the output directory, which may lie
    inside an input) is left out. Whether each is text, read_documents finds out."""
    if not inputs:
        docs, left_out = default_corpus()
        return [Document(*doc) for doc in docs], left_out
    docs = []
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            docs += [Document(file.relative_to(path).as_posix(), file, file.stat().st_size, kind=record_kind(file))
                     for file in _walk(path, skip)]
        elif path.is_file():
            docs.append(Document(path.name, path, path.stat().st_size, named=True, kind=record_kind(path)))
        else:
            raise UserError(f"input {arg} does not exist; check the path (inputs are text, JSON lines or Parquet "
                            "files, or directories)")
    return [doc for doc in docs if doc.size], []


def read_documents(docs: list[Document], options: dict, progress: bool) -> tuple[list[Document], list[dict], str]:
    """(the documents that are text or records; the files that are not, each {"name", "bytes", "why"}; sha256 over
    the options and each input's name and contents), in one pass over the inputs. Text is UTF-8 throughout with no
    NUL near its start; a text document named as an input that is not text is an error. Records are checked as they
    are encoded."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    kept, not_text = [], []
    with _bar(docs, "reading inputs", progress) as bar:
        for doc in docs:
            with_doc = digest.copy()
            with_doc.update(f"{doc.kind}\0{doc.name}\0{doc.size}\0".encode())
            why = _hash_text(doc, with_doc) if doc.kind == "text" else _hash_records(doc, with_doc)
            if why is None:
                kept.append(doc)
                digest = with_doc
            elif doc.named:
                raise UserError(f"{doc.source} is not UTF-8 text ({why}); pass text files or directories")
            else:
                not_text.append(dict(name=doc.name, bytes=doc.size, why=why))
            bar.update(doc.size)
    return kept, not_text, digest.hexdigest()


def _hash_records(doc: Document, digest) -> str | None:
    """Feeds the bytes of a file of records (or of every file of a local dataset folder) to digest; a dataset on the
    Hub is known by its name. Returns why it cannot be read, or None."""
    if doc.kind == "hub":
        folder = Path(doc.source)
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else [folder]
        files = [p for p in files if p.is_file()]
    else:
        files = [doc.source]
    try:
        for path in files:
            digest.update(f"{path}\0".encode())
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
    except OSError as e:
        return f"unreadable: {e.strerror}"
    return None


def _walk(folder: Path, skip: Path | None) -> list[Path]:
    """The files under folder, in sorted order, skipping hidden ones (.git and the like), the folder `skip`, and
    anything that is no file (a broken link, a socket)."""
    skip = skip.resolve() if skip is not None else None
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and Path(parent, d).resolve() != skip]
        found += [Path(parent, f) for f in files if not f.startswith(".") and Path(parent, f).is_file()]
    return sorted(found)


def _hash_text(doc: Document, digest) -> str | None:
    """Feeds the document's bytes to digest; returns why it is not text, or None when it is."""
    decoder = codecs.getincrementaldecoder("utf-8")()  # blocks may end inside a character
    try:
        with doc.open() as f:
            block = f.read(SNIFF_BYTES)
            if (nul := block.find(b"\0")) >= 0:
                return f"binary: a NUL byte at offset {nul}"
            offset = 0  # of block in the file
            while True:
                held = len(decoder.getstate()[0])  # the start of a character the last block ended in
                try:
                    decoder.decode(block, final=not block)
                except UnicodeDecodeError as e:
                    return f"not UTF-8: an invalid byte at offset {offset - held + e.start:,}"
                if not block:
                    return None
                digest.update(block)
                offset += len(block)
                block = f.read(BLOCK_BYTES)
    except OSError as e:
        return f"unreadable: {e.strerror}"


def _reusable(out_dir: Path, digest: str) -> bool:
    """Whether out_dir holds a complete dataset made from the inputs and options digest stands for."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
        return meta["inputs_hash"] == digest and all(
            (out_dir / name).stat().st_size == size for name, size in meta["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def tokenizer_sample(plan: list, sample_bytes: int, text_field: str, hf_split: str, progress: bool) -> list[str]:
    """The lines the tokenizer trains on, in corpus order: blocks of about SAMPLE_BLOCK_BYTES drawn uniformly across
    the whole corpus by reservoir sampling with a fixed seed (every block when the corpus is smaller than the
    sample), each giving its non-empty lines (sentencepiece skips empty ones) up to SAMPLE_BLOCK_BYTES, so at most
    sample_bytes of UTF-8 in all. The draws do not depend on the text, so the same corpus always gives the same
    sample, and only the blocks drawn are parsed."""
    slots = max(1, sample_bytes // SAMPLE_BLOCK_BYTES)
    rng = random.Random(SAMPLE_SEED)  # random() is the one draw Python keeps the same across versions
    drawn = []  # (block number, block)
    total = None if any(doc.kind == "hub" for doc, _ in plan) else sum(doc.size for doc, _ in plan)
    with tqdm(total=total, desc="sampling text for the tokenizer", unit="B", unit_scale=True,
              disable=None if progress else True) as bar:
        for number, block in enumerate(blocks(plan, SAMPLE_BLOCK_BYTES, text_field, hf_split)):
            if number < slots:
                drawn.append((number, block))
            elif (slot := int(rng.random() * (number + 1))) < slots:
                drawn[slot] = (number, block)
            bar.update(block.nbytes)
    lines = []
    for _, block in sorted(drawn, key=lambda numbered: numbered[0]):
        texts = ([block.payload.decode("utf-8", errors="replace")] if block.kind == "text" else
                 [text for text in record_texts(block, text_field) if text is not None])
        room = min(SAMPLE_BLOCK_BYTES, sample_bytes)
        for line in (piece for text in texts for line in text.split("\n")
                     for piece in _pieces(line, MAX_SENTENCE_CHARS) if piece):
            if (size := len(line.encode())) > room:
                break
            lines.append(line)
            room -= size
    return lines


def _pieces(line: str, length: int) -> list[str]:
    return [line[i:i + length] for i in range(0, len(line), length)]


# A word for sentencepiece is a run of characters up to the next space, the spaces before it included (or a run of
# spaces that ends its line): no token spans two.
WORD = re.compile(r" *[^ ]+| +")


def check_vocab_size(lines: list[str], vocab_size: int, model_type: str) -> None:
    """Refuses, before training, a vocabulary larger than the lines can fill. A bpe or unigram token is a byte, a
    special token, a character, or 2 to MAX_TOKEN_CHARS characters of a word, so the distinct ones of those
    bound it; training finds the exact size, often far below that bound. (A char model just stops short.)"""
    if model_type == "char":
        return
    room = vocab_size - (MIN_VOCAB_SIZE - 1)
    tokens, words = set(), set()
    for line in lines:
        tokens.update(line)
        for word in set(WORD.findall(line)) - words:
            words.add(word)
            for n in range(2, min(len(word), MAX_TOKEN_CHARS) + 1):
                tokens.update(word[i:i + n] for i in range(len(word) - n + 1))
        if len(tokens) >= room:  # it may fit: only training can tell
            return
    raise UserError(f"vocab size {vocab_size} is more than this corpus can fill: its text makes at most "
                    f"{len(tokens) + MIN_VOCAB_SIZE - 1} distinct tokens; pass a smaller --vocab-size (or more text)")


def train_tokenizer(lines: list[str], vocab_size: int, model_type: str, progress: bool) -> bytes:
    """The serialized sentencepiece model, trained on the lines."""
    if progress:
        print(f"training a {model_type} tokenizer of {vocab_size} tokens on {_count(len(lines), 'line')} "
              f"({sum(len(line.encode()) for line in lines) / 1e6:,.1f} MB)")
    model = io.BytesIO()
    spm.set_random_generator_seed(0)  # it shuffles the lines: the same way on every run
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                       model_type=model_type, minloglevel=2, **SENTENCEPIECE_OPTIONS)
    except RuntimeError as e:
        raise UserError(_vocab_size_advice(" ".join(str(e).split()), vocab_size)) from None
    return model.getvalue()


def _vocab_size_advice(message: str, vocab_size: int) -> str:
    if too_high := re.search(r"set it to a value <= (\d+)", message):
        return (f"vocab size {vocab_size} is too large for this corpus; pass --vocab-size {too_high[1]} or less "
                "(or more text)")
    if too_low := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        return (f"vocab size {vocab_size} cannot hold the 256 byte tokens and this corpus's characters; pass "
                f"--vocab-size {too_low[1]} or more")
    return f"sentencepiece cannot train on this corpus ({message}); try a smaller --vocab-size or more text"


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned type that holds every token id."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def split_documents(docs: list[Document], val_fraction: float) -> list[tuple[Document, list | None]]:
    """Each document with its pieces (split, start byte, end byte), in document order; None for a file or dataset
    of records, whose records record_split assigns."""
    text = [i for i, doc in enumerate(docs) if doc.kind == "text"]
    if len(docs) == 1 and text:
        # A single document is split by characters instead: its last val_fraction goes to val.
        doc = docs[0]
        with doc.open() as f:
            cut = char_start(f, max(1, int(doc.size * (1 - val_fraction))))
        return [(doc, [("train", 0, cut), ("val", cut, doc.size)])]
    # Val takes documents evenly spaced along the corpus ordered by folder, so every kind of text (every folder) gives
    # val its share; within a folder the order is by a hash of the name. The same documents on every run, whatever
    # order the inputs come in, and at least one document in each split.
    n_val = min(len(text) - 1, max(1, round(val_fraction * len(text))))
    order = sorted(text, key=lambda i: (_folder(docs[i].name), _name_hash(docs[i].name), i))
    val = {order[int((k + 0.5) * len(text) / n_val)] for k in range(n_val)}
    return [(doc, [("val" if i in val else "train", 0, doc.size)] if doc.kind == "text" else None)
            for i, doc in enumerate(docs)]


def _folder(name: str) -> str:
    return name.rpartition("/")[0]


def _name_hash(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _megabytes(sources: list[dict]) -> str:
    return f"{sum(source['bytes'] for source in sources) / 1e6:.1f} MB"


def _bar(docs: list[Document], desc: str, progress: bool) -> tqdm:
    return tqdm(total=sum(doc.size for doc in docs), desc=desc, unit="B", unit_scale=True,
                disable=None if progress else True)


@dataclass(frozen=True)
class PrepareOptions:
    inputs: tuple[str, ...] = option((), "text, JSON lines (.jsonl, .json, optionally .gz) or Parquet files, or "
                                     "directories (searched recursively); with none (and no --hf-dataset), the Python "
                                     "documentation and standard library sources", positional=True, metavar="INPUT")
    out_dir: str | None = option(None, "where to write the dataset; none means data/default with no INPUT, "
                                 "data/custom with some", metavar="DIR")
    vocab_size: int = option(DEFAULT_VOCAB_SIZE, "tokenizer vocabulary size", metavar="TOKENS")
    model_type: str = option("bpe", "sentencepiece model type", choices=MODEL_TYPES, metavar="TYPE")
    tokenizer: str | None = option(None, "encode with this tokenizer instead of training one: a sentencepiece .model "
                                   "file (a dataset's or a checkpoint's) or a Hugging Face tokenizer directory "
                                   "(tokenizer.json, or GPT-2's vocab.json + merges.txt)", metavar="PATH")
    tokenizer_sample_mb: float = option(DEFAULT_SAMPLE_MB, "the tokenizer trains on at most this much text, drawn "
                                        "across the whole corpus", metavar="MB")
    val_fraction: float = option(0.05, "share of the documents held out for validation, drawn across every folder "
                                 "(records: evenly spaced)", metavar="SHARE")
    text_field: str = option("text", "the field of a JSON record, Parquet row or dataset row that holds its text",
                             metavar="NAME")
    hf_dataset: str | None = option(None, "also read this Hugging Face dataset, streamed: a local folder, data "
                                    "files, or a Hub name (which needs the network)", metavar="NAME_OR_PATH")
    hf_split: str = option("train", "the split of --hf-dataset to read", metavar="SPLIT")
    shard_tokens: int = option(DEFAULT_SHARD_TOKENS, "tokens per shard file", metavar="TOKENS")
    workers: int | None = option(None, "processes that encode; none means one per CPU core, at most one per 16 MB of "
                                 "input")
    overwrite: bool = option(False, "replace the dataset in OUT_DIR, even one built from other inputs or options")


def main(argv: list[str] | None = None) -> None:
    opts, _ = parse_options(PrepareOptions, __doc__.split("\n\n")[0], argv, with_config_file=False)
    out_dir = opts.out_dir or ("data/custom" if opts.inputs or opts.hf_dataset else "data/default")
    meta_path = prepare(list(opts.inputs), out_dir, opts.vocab_size, opts.model_type, opts.val_fraction, opts.workers,
                        overwrite=opts.overwrite, text_field=opts.text_field, hf_dataset=opts.hf_dataset,
                        hf_split=opts.hf_split, tokenizer=opts.tokenizer, tokenizer_sample_mb=opts.tokenizer_sample_mb,
                        shard_tokens=opts.shard_tokens)
    meta = json.loads(meta_path.read_text())
    shard_count = len(meta["shards"]["train"]) + len(meta["shards"]["val"])
    print(f"{meta_path}: {_count(meta['documents'], 'document')}, {meta['train_tokens']:,} train and "
          f"{meta['val_tokens']:,} val tokens in {_count(shard_count, 'shard')}, vocabulary {meta['vocab_size']} "
          f"({meta['dtype']})")


if __name__ == "__main__":
    run_main(main)
