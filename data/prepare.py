"""Turns text into the token files the trainer reads, and trains the tokenizer that makes them.

`python data/prepare.py [INPUT ...]`: the inputs are text files, or directories searched recursively; with none,
the Python documentation and standard library sources that ship with every CPython (data/default_corpus.py). It
trains a sentencepiece tokenizer on them (or takes the one --tokenizer names), encodes every document followed by
an end-of-document token, and writes to the output directory:

    tokenizer.model     the sentencepiece model; data/tokenizer.py loads it (tokenizer.json for a Hugging Face one)
    train.bin, val.bin  raw little-endian token ids, uint16 when the vocabulary fits, uint32 otherwise
    meta.json           vocab_size, dtype, eot_id, token and document counts, the tokenizer file, the split rule,
                        what was left out and why (machine-made sources of the default corpus, files that are
                        not text), inputs_hash

Files in a folder that are not UTF-8 text throughout (binary, compressed, another encoding) are left out, counted
and listed in meta.json; a file named as an input that is not is an error. The tokenizer trains on at most
TOKENIZER_SAMPLE_LINES lines, drawn evenly at random across the corpus with a fixed seed, so the same inputs always
give the same tokenizer and token files.

Run again on the same inputs and options, it reuses what is there; a dataset built from other inputs or options is
replaced only with --overwrite (checkpoints trained on it depend on its tokenizer), which also rebuilds one that
is there already. Every file is written under a temporary name and renamed into place only once all of them are
complete, meta.json last, so a failure (a full disk, Ctrl-C) leaves an existing dataset whole, and removes the
output directory again if it made it.
"""
import codecs
import contextlib
import errno
import hashlib
import io
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from tritongpt.data.default_corpus import default_corpus
from tritongpt.data.tokenizer import Tokenizer, load_tokenizer
from tritongpt.errors import UserError
from tritongpt.options import option, parse_options, run_main

MODEL_TYPES = ("bpe", "unigram", "char")
DEFAULT_VOCAB_SIZE = 4096
TOKENIZER_FILE = "tokenizer.model"
CHUNK_BYTES = 1 << 18  # documents are encoded in pieces of about this size, so one huge file streams through too
BATCH_CHUNKS = 4  # chunks per thread in each batch encoded at once
SNIFF_BYTES = 8192  # a file with a NUL this near its start is binary (as git tells), even if it is valid UTF-8
MAX_SENTENCE_CHARS = 4096  # longer lines are cut into pieces this long for tokenizer training
TOKENIZER_SAMPLE_LINES = 300_000  # the tokenizer trains on at most this many lines, so it stays quick on any corpus
SAMPLE_SEED = 0
# Tokens every vocabulary holds before any text: the 256 bytes, <unk> and the end-of-document token, and then at
# least one character.
MIN_VOCAB_SIZE = 256 + 2 + 1
MAX_TOKEN_CHARS = 16  # sentencepiece's max_sentencepiece_length, left at its default
# How split_documents picks val; it enters inputs_hash, so a dataset split another way is rebuilt.
VAL_SPLIT = "documents evenly spaced along the corpus ordered by folder, then by a hash of the name"

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
    # tokenizer_sample draws the lines: sentencepiece's own draw, from more lines than this, differs from one process
    # to the next.
    input_sentence_size=TOKENIZER_SAMPLE_LINES,
    shuffle_input_sentence=True,
    # Fixed rather than one per core: a unigram model comes out different for a different number of threads.
    num_threads=4,
)


@dataclass(frozen=True)
class Document:
    name: str  # its path relative to the input it came from: the val split and inputs_hash use it
    source: Path | bytes  # the file holding it, or its UTF-8 text (the documentation topics are no files)
    size: int  # in bytes
    named: bool = False  # given as an input itself, not found in a folder: if it is not text, that is an error

    def open(self):
        return io.BytesIO(self.source) if isinstance(self.source, bytes) else open(self.source, "rb")


def prepare(inputs: list[str] | None = None, out_dir: str | Path = "data/default", vocab_size: int = DEFAULT_VOCAB_SIZE,
            model_type: str = "bpe", val_fraction: float = 0.05, workers: int | None = None,
            progress: bool = True, overwrite: bool = False, tokenizer: str | Path | None = None) -> Path:
    """Builds the dataset in out_dir (or reuses the one there, when made from the same inputs and options) and
    returns the path of its meta.json. With overwrite, it builds it anew whatever is there; without, a dataset there
    from other inputs or options is an error. tokenizer: encode with this one (load_tokenizer reads it) instead of
    training one; vocab_size and model_type then play no part."""
    given = load_tokenizer(tokenizer) if tokenizer is not None else None
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown model type {model_type!r}; use one of {', '.join(MODEL_TYPES)}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab size {vocab_size} is too small: 258 tokens (the 256 bytes, unknown and "
                        f"end-of-document) come before any text; pass --vocab-size {MIN_VOCAB_SIZE} or more (default "
                        f"{DEFAULT_VOCAB_SIZE})")
    if not 0 < val_fraction < 1:
        raise UserError(f"val fraction {val_fraction} is not between 0 and 1; pass e.g. --val-fraction 0.05")
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise UserError(f"{workers} workers; pass --workers 1 or more")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    docs, machine_made = find_documents(inputs, skip=out_dir)
    options = dict(vocab_size=vocab_size, model_type=model_type, val_fraction=val_fraction, val_split=VAL_SPLIT,
                   sentencepiece=SENTENCEPIECE_OPTIONS)
    if given is not None:
        options = dict(val_fraction=val_fraction, val_split=VAL_SPLIT,
                       tokenizer=hashlib.sha256(given.model).hexdigest())
    docs, not_text, digest = read_documents(docs, options, progress)
    if not docs:
        raise UserError(f"no text in {' '.join(inputs)}: no non-empty UTF-8 files found; pass text files or "
                        "directories that contain some (or no inputs, for the default corpus)")
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

    if given is None:
        lines = tokenizer_sample(docs, progress)
        check_vocab_size(lines, vocab_size, model_type)
        model = train_tokenizer(lines, vocab_size, model_type, progress)
        given = Tokenizer(model, origin=str(out_dir / TOKENIZER_FILE))
    else:
        model_type = given.kind
    made = _make_out_dir(out_dir)
    try:
        write_dataset(out_dir, given, model_type, docs, val_fraction, machine_made + not_text, digest, workers,
                      progress)
    except BaseException as e:
        for folder in made:  # empty again: the temporary files are gone
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = "the dataset already there is unchanged" if had_dataset else "nothing was left behind"
            raise UserError(f"the disk holding {out_dir} is full ({e.strerror}); free some space there or pass an "
                            f"--out-dir on another disk ({kept})") from None
        raise
    return out_dir / "meta.json"


def write_dataset(out_dir: Path, tokenizer, model_type: str, docs: list[Document], val_fraction: float,
                  left_out: list[dict], digest: str, workers: int, progress: bool) -> None:
    """Writes a copy of the tokenizer, the token files and meta.json into out_dir, each complete before it replaces
    the one there."""
    names = (tokenizer.file_name, "train.bin", "val.bin", "meta.json")  # the order they are renamed in: meta.json last
    temp = {name: out_dir / f".{name}.{os.getpid()}.tmp" for name in names}
    try:
        temp[tokenizer.file_name].write_bytes(tokenizer.model)
        dtype = token_dtype(tokenizer.vocab_size)
        counts = encode(split_documents(docs, val_fraction), temp, tokenizer, dtype, workers, progress)
        meta = dict(
            vocab_size=tokenizer.vocab_size, dtype=dtype, eot_id=tokenizer.eot_id,
            train_tokens=counts["train_tokens"], val_tokens=counts["val_tokens"], documents=len(docs),
            # Documents per split, each followed by eot_id (a single input document is split in two).
            train_documents=counts["train_documents"], val_documents=counts["val_documents"],
            tokenizer=tokenizer.file_name, tokenizer_kind=tokenizer.kind, model_type=model_type,
            val_fraction=val_fraction, val_split=VAL_SPLIT,
            left_out=left_out, inputs_hash=digest, files={name: temp[name].stat().st_size for name in names[:-1]},
        )
        temp["meta.json"].write_text(json.dumps(meta, indent=2) + "\n")
        # Remove the old meta.json first: a crash between the renames then leaves no dataset (the next run rebuilds
        # it) rather than an old meta.json describing new files.
        (out_dir / "meta.json").unlink(missing_ok=True)
        for name in names:
            temp[name].replace(out_dir / name)
    finally:
        for path in temp.values():
            path.unlink(missing_ok=True)


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
            docs += [Document(file.relative_to(path).as_posix(), file, file.stat().st_size)
                     for file in _walk(path, skip)]
        elif path.is_file():
            docs.append(Document(path.name, path, path.stat().st_size, named=True))
        else:
            raise UserError(f"input {arg} does not exist; check the path (inputs are text files or directories)")
    return [doc for doc in docs if doc.size], []


def _walk(folder: Path, skip: Path | None) -> list[Path]:
    """The files under folder, in sorted order, skipping hidden ones (.git and the like), the folder `skip`, and
    anything that is no file (a broken link, a socket)."""
    skip = skip.resolve() if skip is not None else None
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and Path(parent, d).resolve() != skip]
        found += [Path(parent, f) for f in files if not f.startswith(".") and Path(parent, f).is_file()]
    return sorted(found)


def read_documents(docs: list[Document], options: dict, progress: bool) -> tuple[list[Document], list[dict], str]:
    """(the documents that are text; those that are not, each {"name", "bytes", "why"}; sha256 over the options and
    each text document's name and contents), in one pass over the inputs. Text is UTF-8 throughout with no NUL near
    its start; a document named as an input that is not text is an error."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    text, not_text = [], []
    with _bar(docs, "reading inputs", progress) as bar:
        for doc in docs:
            with_doc = digest.copy()
            with_doc.update(f"{doc.name}\0{doc.size}\0".encode())
            if (why := _hash_text(doc, with_doc)) is None:
                text.append(doc)
                digest = with_doc
            elif doc.named:
                raise UserError(f"{doc.source} is not UTF-8 text ({why}); pass text files or directories")
            else:
                not_text.append(dict(name=doc.name, bytes=doc.size, why=why))
            bar.update(doc.size)
    return text, not_text, digest.hexdigest()


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
                block = f.read(CHUNK_BYTES)
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


def tokenizer_sample(docs: list[Document], progress: bool) -> list[str]:
    """The lines the tokenizer trains on, in corpus order: every non-empty line (sentencepiece skips empty ones), or
    when there are more than TOKENIZER_SAMPLE_LINES, that many drawn uniformly across the corpus by reservoir
    sampling with a fixed seed, so that the same corpus always gives the same sample."""
    rng = random.Random(SAMPLE_SEED)  # random() is the one draw Python keeps the same across versions
    sample = []  # (line number, line)
    seen = 0
    for line in _lines(docs, progress):
        if not line:
            continue
        if len(sample) < TOKENIZER_SAMPLE_LINES:
            sample.append((seen, line))
        elif (slot := int(rng.random() * (seen + 1))) < TOKENIZER_SAMPLE_LINES:
            sample[slot] = (seen, line)
        seen += 1
    return [line for _, line in sorted(sample, key=lambda numbered: numbered[0])]


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
        print(f"training a {model_type} tokenizer of {vocab_size} tokens on {_count(len(lines), 'line')}")
    model = io.BytesIO()
    spm.set_random_generator_seed(0)  # it shuffles the lines: the same way on every run
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                       model_type=model_type, minloglevel=2, **SENTENCEPIECE_OPTIONS)
    except RuntimeError as e:
        raise UserError(_vocab_size_advice(" ".join(str(e).split()), vocab_size)) from None
    return model.getvalue()


def _lines(docs: list[Document], progress: bool):
    with _bar(docs, "reading lines for the tokenizer", progress) as bar:
        for doc in docs:
            with doc.open() as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="") as f:
                while line := f.readline(MAX_SENTENCE_CHARS):
                    yield line.rstrip("\n")
            bar.update(doc.size)


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


def split_documents(docs: list[Document], val_fraction: float) -> list[tuple[str, Document, int, int]]:
    """(split, document, start byte, end byte) for each piece of text, in document order."""
    if len(docs) == 1:
        # A single document is split by characters instead: its last val_fraction goes to val.
        doc = docs[0]
        with doc.open() as f:
            cut = _char_start(f, max(1, int(doc.size * (1 - val_fraction))))
        return [("train", doc, 0, cut), ("val", doc, cut, doc.size)]
    # Val takes documents evenly spaced along the corpus ordered by folder, so every kind of text (every folder) gives
    # val its share; within a folder the order is by a hash of the name. The same documents on every run, whatever
    # order the inputs come in, and at least one document in each split.
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    order = sorted(range(len(docs)), key=lambda i: (_folder(docs[i].name), _name_hash(docs[i].name), i))
    val = {order[int((k + 0.5) * len(docs) / n_val)] for k in range(n_val)}
    return [("val" if i in val else "train", doc, 0, doc.size) for i, doc in enumerate(docs)]


def _folder(name: str) -> str:
    return name.rpartition("/")[0]


def _name_hash(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def _char_start(f, pos: int) -> int:
    """The first position at or after pos where a UTF-8 character starts (or the end of the file)."""
    f.seek(pos)
    while (byte := f.read(1)) and byte[0] & 0xC0 == 0x80:  # a continuation byte
        pos += 1
    return pos


def encode(pieces: list[tuple[str, Document, int, int]], temp: dict[str, Path], tokenizer: Tokenizer, dtype: str,
           threads: int, progress: bool) -> dict:
    """Encodes the pieces of text into temp["train.bin"] and temp["val.bin"], in order, each followed by the
    end-of-document token; returns the token and document counts per split."""
    counts = dict.fromkeys(("train_tokens", "val_tokens", "train_documents", "val_documents"), 0)
    little_endian = np.dtype(dtype).newbyteorder("<")
    with (open(temp["train.bin"], "wb") as train, open(temp["val.bin"], "wb") as val,
          tqdm(total=sum(end - start for _, _, start, end in pieces), desc="encoding", unit="B", unit_scale=True,
               disable=None if progress else True) as bar):
        files = {"train": train, "val": val}
        # Batches of chunks, each encoded by sentencepiece's own threads, keep every core busy while only a batch
        # is in memory at a time.
        for batch in _batches(_chunks(pieces), threads * BATCH_CHUNKS):
            encoded = tokenizer.encode_batch([text for _, text, _, _ in batch], threads)
            for (split, _, nbytes, last), ids in zip(batch, encoded):
                files[split].write(np.array(ids + [tokenizer.eot_id] * last, dtype=little_endian).tobytes())
                counts[f"{split}_tokens"] += len(ids) + last
                counts[f"{split}_documents"] += last
                bar.update(nbytes)
    return counts


def _chunks(pieces):
    """(split, text, its size in bytes, whether it ends its piece) for each chunk of about CHUNK_BYTES of the
    pieces, read one at a time and cut at character boundaries."""
    for split, doc, start, end in pieces:
        with doc.open() as f:
            while True:
                stop = end if end - start <= CHUNK_BYTES else _char_start(f, start + CHUNK_BYTES)
                f.seek(start)
                # read_documents found it UTF-8; should it have changed since, what is not becomes U+FFFD.
                yield split, f.read(stop - start).decode("utf-8", errors="replace"), stop - start, stop == end
                if stop == end:
                    break
                start = stop


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _megabytes(sources: list[dict]) -> str:
    return f"{sum(source['bytes'] for source in sources) / 1e6:.1f} MB"


def _bar(docs: list[Document], desc: str, progress: bool) -> tqdm:
    return tqdm(total=sum(doc.size for doc in docs), desc=desc, unit="B", unit_scale=True,
                disable=None if progress else True)


@dataclass(frozen=True)
class PrepareOptions:
    inputs: tuple[str, ...] = option((), "text files or directories (searched recursively); with none, the Python "
                                     "documentation and standard library sources", positional=True, metavar="INPUT")
    out_dir: str | None = option(None, "where to write the dataset; none means data/default with no INPUT, "
                                 "data/custom with some", metavar="DIR")
    vocab_size: int = option(DEFAULT_VOCAB_SIZE, "tokenizer vocabulary size", metavar="TOKENS")
    model_type: str = option("bpe", "sentencepiece model type", choices=MODEL_TYPES, metavar="TYPE")
    val_fraction: float = option(0.05, "share of the documents held out for validation, drawn across every folder",
                                 metavar="SHARE")
    workers: int | None = option(None, "threads that encode; none means one per CPU core")
    overwrite: bool = option(False, "replace the dataset in OUT_DIR, even one built from other inputs or options")
    tokenizer: str | None = option(None, "encode with this tokenizer instead of training one: a Hugging Face "
                                   "tokenizer directory (tokenizer.json, or GPT-2's vocab.json + merges.txt) or a "
                                   "sentencepiece .model file", metavar="PATH")


def main(argv: list[str] | None = None) -> None:
    opts, _ = parse_options(PrepareOptions, __doc__.split("\n\n")[0], argv, with_config_file=False)
    out_dir = opts.out_dir or ("data/custom" if opts.inputs else "data/default")
    meta_path = prepare(list(opts.inputs), out_dir, opts.vocab_size, opts.model_type, opts.val_fraction,
                        opts.workers, overwrite=opts.overwrite, tokenizer=opts.tokenizer)
    meta = json.loads(meta_path.read_text())
    print(f"{meta_path}: {_count(meta['documents'], 'document')}, {meta['train_tokens']:,} train and "
          f"{meta['val_tokens']:,} val tokens, vocabulary {meta['vocab_size']} ({meta['dtype']})")


if __name__ == "__main__":
    run_main(main)
