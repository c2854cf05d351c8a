"""The corpus `python data/prepare.py` uses when given no inputs: text that ships with every CPython, so it needs no
network. The documentation's topics (pydoc_data.topics, one document each), then the standard library's .py sources
in sorted order, up to a cap on the total that keeps the default prepare quick."""
import os
import sysconfig
from pathlib import Path

from pydoc_data.topics import topics

CAP_BYTES = 8_000_000
# Third-party packages are no part of the standard library; its tests are repetitive and some are deliberately
# malformed (bad encodings, syntax errors).
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def default_corpus(cap_bytes: int = CAP_BYTES) -> list[tuple[str, Path | bytes, int]]:
    """(name, source, size in bytes) for each document; the source is the UTF-8 text itself or a file holding it."""
    docs = []
    for name in sorted(topics):
        text = topics[name].encode()
        docs.append((f"pydoc_data.topics/{name}", text, len(text)))
    total = sum(size for _, _, size in docs)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in _sources(stdlib):
        try:
            data = path.read_bytes()
            data.decode("utf-8")  # prepare reads the files as UTF-8: skip any that is not
        except (OSError, UnicodeDecodeError):
            continue
        if total + len(data) > cap_bytes:
            break
        docs.append((f"stdlib/{path.relative_to(stdlib).as_posix()}", path, len(data)))
        total += len(data)
    return docs


def _sources(stdlib: Path) -> list[Path]:
    found = []
    # os.walk, not rglob, so that site-packages (possibly huge) is never entered.
    for folder, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        found += [Path(folder, f) for f in files if f.endswith(".py")]
    return sorted(found)
