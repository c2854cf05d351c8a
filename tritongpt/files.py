"""Replacing a file so that a crash never leaves half of one: the new contents go to a temporary file beside it,
which is flushed to disk and then renamed over it (a rename within a directory is atomic)."""
import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """An open binary file to write path's new contents to. They replace path when the block ends without an error;
    after a crash or an error, path holds its old contents (or still does not exist) and no temporary file is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")  # per process: ranks never share one
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
