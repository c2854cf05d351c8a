"""A run's files on disk. Replacing a file so that a crash never leaves half of one: the new contents go to a
temporary file beside it, which is flushed to disk and then renamed over it (a rename within a directory is atomic).
Holding a directory, so that two processes never write one run's files at once. Telling a full disk apart from other
write errors."""
import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = ".lock"


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


def disk_full(error: BaseException) -> bool:
    """Whether a write failed for want of space (a full disk or an exhausted quota). torch.save reports the failed
    write as a RuntimeError raised while handling it, so the errors it was raised from count too."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


class DirectoryLock:
    """An exclusive hold on a directory: fcntl.flock on DIR/.lock, a file that names the holding process. The
    operating system lets go of it when that process ends, however it ends, so a killed process never leaves it
    stuck (the file stays, holding nothing)."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self.supported = True  # False on a file system without locks (Lustre mounted without flock, some FUSE ones)
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Takes the lock (or keeps it, when already held here); None when held now (or when the file system has
        no locks: see `supported`), else who holds it, as "pid N on HOST"."""
        if self._fd is not None or not self.supported:
            return None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            return holder or "a process that has not written its pid yet"
        except OSError:
            os.close(fd)
            self.supported = False
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file lets go of the lock
            self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
