"""The token shard format: a 32-byte header, then the token ids, little-endian.

    bytes 0-7    magic b"TGPTTOKS"
    bytes 8-11   format version (1), uint32
    bytes 12-15  bytes per token id (2: uint16, 4: uint32), uint32
    bytes 16-23  number of tokens, uint64
    bytes 24-31  zero

data/prepare.py writes a split as shards named SPLIT-NNNNNN.bin and lists them in meta.json; data/loader.py
memory-maps them. A shard being written has a token count of 0 in its header and a .partial name until it is
complete.
"""
import struct
from pathlib import Path

import numpy as np

from tritongpt.errors import UserError

MAGIC = b"TGPTTOKS"
VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")
HEADER_BYTES = HEADER.size  # 32: the token ids start aligned for any dtype
DTYPES = {2: "uint16", 4: "uint32"}


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.bin"


def header(dtype: str, num_tokens: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, np.dtype(dtype).itemsize, num_tokens)


def read_header(path: Path) -> tuple[str, int]:
    """(dtype, number of tokens) of a shard, once its header and size are known to agree."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    size = path.stat().st_size
    if len(raw) < HEADER_BYTES or HEADER.unpack(raw)[0] != MAGIC:
        raise UserError(f"{path} is not a token shard (no {MAGIC.decode()} header): it is damaged or was replaced")
    _, version, itemsize, num_tokens = HEADER.unpack(raw)
    if version != VERSION or itemsize not in DTYPES:
        raise UserError(f"{path} is a token shard of format version {version} with {itemsize}-byte tokens, which "
                        f"this version cannot read (it reads version {VERSION}, 2- or 4-byte tokens)")
    if size != HEADER_BYTES + num_tokens * itemsize:
        raise UserError(f"{path} holds {size - HEADER_BYTES:,} bytes of tokens but its header records {num_tokens:,} "
                        f"{DTYPES[itemsize]} tokens: it was cut short or damaged")
    return DTYPES[itemsize], num_tokens
