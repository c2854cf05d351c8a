"""Reads back a W&B run file (`run-<id>.wandb`), so that tests can check exactly what a run logged.

The format, as wandb 0.31's wandb-core writes it: a 7-byte header (b":W&B", 2 magic bytes, a version byte), then
LevelDB-log records in 32 KiB blocks. Each record is a 7-byte header (crc32 u32, length u16, type u8: 1 full,
2 first, 3 middle, 4 last fragment) and its data; a block's tail too short for a header is zero padding. The CRC
is zlib's crc32 of the type byte and the data. The data of a full record, or of the fragments joined, is a
serialized `wandb.proto.wandb_internal_pb2.Record`. (wandb no longer ships a reader: its old
`wandb.sdk.internal.datastore` is gone.)
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

FILE_HEADER_SIZE = 7
FILE_MAGIC = b":W&B"
BLOCK_SIZE = 32 * 1024
RECORD_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def run_files(out_dir) -> list[Path]:
    """The run files of the offline runs that were started with dir=out_dir, oldest first."""
    return sorted(Path(out_dir).glob("wandb/offline-run-*/run-*.wandb"))


def read_records(path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    if data[:len(FILE_MAGIC)] != FILE_MAGIC:
        raise ValueError(f"{path}: not a W&B run file (header {data[:FILE_HEADER_SIZE]!r})")
    records, fragments = [], []
    pos = FILE_HEADER_SIZE
    while pos < len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < RECORD_HEADER.size:
            pos += left_in_block
            continue
        crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        chunk = data[pos + RECORD_HEADER.size:pos + RECORD_HEADER.size + length]
        if kind not in (FULL, FIRST, MIDDLE, LAST) or len(chunk) != length or zlib.crc32(bytes([kind]) + chunk) != crc:
            raise ValueError(f"{path}: corrupt record at byte {pos}")
        pos += RECORD_HEADER.size + length
        if kind in (FULL, FIRST):
            fragments = [chunk]
        else:
            fragments.append(chunk)
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(fragments))
            records.append(record)
    return records


def _key(item) -> str:
    # wandb-core writes history keys as `nested_key` (one element for a flat key such as "train/loss").
    return item.key or ".".join(item.nested_key)


def history(path) -> list[dict]:
    """The history rows, each {key: value} with wandb's own "_step", "_runtime" and "_timestamp" included."""
    return [{_key(item): json.loads(item.value_json) for item in record.history.item}
            for record in read_records(path) if record.HasField("history")]


def config(path) -> dict:
    """The run's configuration: what the run record was started with, then later config updates and removals.
    wandb's own "_wandb" entry is left out."""
    result = {}
    for record in read_records(path):
        if record.HasField("run"):
            updates, removals = record.run.config.update, []
        elif record.HasField("config"):
            updates, removals = record.config.update, record.config.remove
        else:
            continue
        result.update({_key(item): json.loads(item.value_json) for item in updates})
        for item in removals:
            result.pop(_key(item), None)
    result.pop("_wandb", None)
    return result
