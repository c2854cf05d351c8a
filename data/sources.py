"""The inputs data/prepare.py reads, and how it cuts them into blocks.

A plain text file is one document. A .jsonl, .json, .jsonl.gz or .json.gz file holds one JSON record per line, a
.parquet file one record per row, a Hugging Face dataset one per row; a record's document is its text field. Parquet
and datasets need the optional packages of `pip install -e ".[data]"`, imported only when such an input is given.

Blocks are what the tokenizer sample is drawn from and what the encoding processes take one at a time: a piece of a
text document, or the records of about block_bytes of input. They are cut by the input alone (never by how many
processes encode), and the main process only reads them: parsing and validating records happens in
record_texts, where the blocks are encoded.
"""
import gzip
import importlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tritongpt.errors import UserError

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIX = ".parquet"
EXTRA = 'pip install -e ".[data]"'
LINE_SEARCH_BYTES = 1 << 16  # a text block ends at the first newline this near its size


@dataclass(frozen=True)
class Document:
    """An input: one text document, or a file or dataset of records (kind "json", "parquet" or "hub")."""
    name: str  # its path relative to the input it came from: the val split and inputs_hash use it
    source: Path | bytes | str  # the file, its UTF-8 text (the documentation topics are no files), a dataset's name
    size: int  # in bytes; 0 for a dataset whose size is not known before reading it
    named: bool = False  # given as an input itself, not found in a folder: if it is not text, that is an error
    kind: str = "text"

    def open(self):
        return io.BytesIO(self.source) if isinstance(self.source, bytes) else open(self.source, "rb")


@dataclass(frozen=True)
class Block:
    kind: str  # "text": a piece of one document; "json": whole JSON lines; "rows": the texts of records
    payload: bytes | list
    nbytes: int  # of the input it covers, for progress
    split: str | None = None  # a text piece's split; records are each split by their index
    ends_document: bool = False  # a text piece: whether its document ends with it
    first_record: int = 0  # records: the index of its first among all the corpus's records
    source: str = ""  # records: the name of the input...
    first_line: int = 1  # ...and the line (or row) number of its first record, for errors


def record_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSON_SUFFIXES):
        return "json"
    return "parquet" if name.endswith(PARQUET_SUFFIX) else "text"


def require(module: str, what: str):
    """Imports an optional dependency, or says in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise UserError(f"reading {what} needs the {package} package; install it with `{EXTRA}`") from None


def hub_dataset(name: str, split: str):
    """The split of a Hugging Face dataset (a local folder, data files, or a name on the Hub), streamed."""
    datasets = require("datasets", "--hf-dataset")
    try:
        return datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # datasets raises many kinds: not found, no network, a bad split, a bad file
        reason = " ".join(str(e).split())[:300]
        raise UserError(f"cannot open --hf-dataset {name} split {split} ({type(e).__name__}: {reason}); pass a "
                        "local dataset folder or data files, or a Hub name with the network reachable") from None


def check_text_field(doc: Document, text_field: str, hf_split: str) -> None:
    """Refuses, before any work, a record input whose first record has no text field: the usual mistake."""
    if doc.kind == "parquet":
        schema = require("pyarrow.parquet", "Parquet files").read_schema(doc.source)
        if text_field not in schema.names:
            raise UserError(f"{doc.source} has no {text_field!r} column (it has {', '.join(schema.names)}); pass "
                            "--text-field with the one that holds the text")
        return
    if doc.kind == "hub":
        first = next(iter(hub_dataset(doc.source, hf_split)), None)
        if first is None:
            raise UserError(f"--hf-dataset {doc.source} split {hf_split} has no records; pass another --hf-split")
        record_texts(Block("rows", [first.get(text_field, _MISSING)], 0, source=doc.name), text_field)
        return
    with _open_json(doc) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                record_texts(Block("json", line, 0, source=doc.name, first_line=number), text_field)
                return


def blocks(plan: list[tuple[Document, list | None]], block_bytes: int, text_field: str,
           hf_split: str) -> Iterator[Block]:
    """The corpus as blocks, in order. plan: each document with its pieces (split, start, end) for a text document,
    None for records."""
    record = 0
    for doc, pieces in plan:
        if doc.kind == "text":
            yield from _text_blocks(doc, pieces, block_bytes)
            continue
        reader = {"json": _json_blocks, "parquet": _parquet_blocks, "hub": _hub_blocks}[doc.kind]
        for kind, payload, records, first_line, nbytes in reader(doc, block_bytes, text_field, hf_split):
            yield Block(kind, payload, nbytes, first_record=record, source=doc.name, first_line=first_line)
            record += records


def record_texts(block: Block, text_field: str) -> list[str | None]:
    """The text of each record of a block; None for a blank line or an empty text."""
    if block.kind == "json":
        lines = block.payload.split(b"\n")
        if lines[-1] == b"":  # the newline that ends the last line
            lines.pop()
        return [_json_text(line, text_field, block.source, block.first_line + i) for i, line in enumerate(lines)]
    return [_row_text(value, text_field, block.source, block.first_line + i) for i, value in enumerate(block.payload)]


_MISSING = object()


def _json_text(line: bytes, text_field: str, source: str, number: int) -> str | None:
    if not line.strip():
        return None
    where = f"{source} line {number:,}"
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not UTF-8 (an invalid byte at column {e.start + 1}); fix or remove that "
                        "record") from None
    except ValueError as e:
        raise UserError(f"{where} is not JSON ({e}); a .jsonl or .json input holds one JSON record per line") from None
    if not isinstance(record, dict) or text_field not in record:
        fields = ", ".join(map(repr, record)) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
        raise UserError(f"{where} has no {text_field!r} field (it has {fields or 'none'}); pass --text-field with "
                        "the one that holds the text")
    return _row_text(record[text_field], text_field, source, number, kind="line")


def _row_text(value, text_field: str, source: str, number: int, kind: str = "row") -> str | None:
    where = f"{source} {kind} {number:,}"
    if value is _MISSING:
        raise UserError(f"{where} has no {text_field!r} field; pass --text-field with the one that holds the text")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: its {text_field!r} is not UTF-8 (an invalid byte at offset {e.start:,}); fix "
                            "or remove that record") from None
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: its {text_field!r} is a {type(value).__name__}, not text; pass --text-field with "
                        "the one that holds the text")
    return value or None


def char_start(f, pos: int) -> int:
    """The first position at or after pos where a UTF-8 character starts (or the end of the file)."""
    f.seek(pos)
    while (byte := f.read(1)) and byte[0] & 0xC0 == 0x80:  # a continuation byte
        pos += 1
    return pos


def _text_blocks(doc: Document, pieces: list[tuple[str, int, int]], block_bytes: int) -> Iterator[Block]:
    """A text document's pieces cut into blocks of about block_bytes, read one at a time: each cut just after a
    newline, or at a character boundary in a line longer than LINE_SEARCH_BYTES."""
    with doc.open() as f:
        for split, start, end in pieces:
            while True:
                stop = end if end - start <= block_bytes else _line_end(f, start + block_bytes, end)
                f.seek(start)
                yield Block("text", f.read(stop - start), stop - start, split=split, ends_document=stop == end)
                if stop == end:
                    break
                start = stop


def _line_end(f, pos: int, end: int) -> int:
    f.seek(pos)
    newline = f.read(min(LINE_SEARCH_BYTES, end - pos)).find(b"\n")
    return pos + newline + 1 if newline >= 0 else char_start(f, pos)


def _open_json(doc: Document):
    return gzip.open(doc.source, "rb") if doc.name.lower().endswith(".gz") else open(doc.source, "rb")


def _json_blocks(doc: Document, block_bytes: int, text_field: str, hf_split: str):
    with _open_json(doc) as f:
        raw = getattr(f, "fileobj", f)  # progress counts the bytes of the file, compressed or not
        line, done = 1, 0
        while block := f.read(block_bytes):
            block += f.readline()  # whole lines only
            records = block.count(b"\n") + (not block.endswith(b"\n"))
            position = raw.tell()
            yield "json", block, records, line, position - done
            line, done = line + records, position


def _parquet_blocks(doc: Document, block_bytes: int, text_field: str, hf_split: str):
    parquet = require("pyarrow.parquet", "Parquet files").ParquetFile(doc.source)
    total_rows, row = max(1, parquet.metadata.num_rows), 1
    for group in range(parquet.num_row_groups):  # one row group in memory at a time
        texts = parquet.read_row_group(group, columns=[text_field]).column(0).to_pylist()
        for run in _runs(texts, block_bytes):
            yield "rows", run, len(run), row, doc.size * len(run) // total_rows
            row += len(run)


def _hub_blocks(doc: Document, block_bytes: int, text_field: str, hf_split: str):
    row = 1
    records = (record.get(text_field, _MISSING) for record in hub_dataset(doc.source, hf_split))
    for run in _runs(records, block_bytes):
        yield "rows", run, len(run), row, sum(len(text) for text in run if isinstance(text, (str, bytes)))
        row += len(run)


def _runs(texts, block_bytes: int) -> Iterator[list]:
    """Consecutive texts in lists of about block_bytes characters."""
    run, size = [], 0
    for text in texts:
        run.append(text)
        size += len(text) if isinstance(text, (str, bytes)) else 0
        if size >= block_bytes:
            yield run
            run, size = [], 0
    if run:
        yield run
