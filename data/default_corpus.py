"""The corpus `python data/prepare.py` uses when given no inputs: text that ships with every CPython, so it needs no
network. The documentation's topics (pydoc_data.topics, one document each), then the standard library's .py sources
in sorted order, up to a cap on the total that keeps the default prepare quick.

Machine-made sources (codec tables, Unicode databases, build variables, alias maps) would teach a small model to
write tables instead of Python, so one rule leaves them out: a source is left out when more than half of its code
lines (blank and comment lines aside) hold nothing but literals: strings, numbers, brackets, commas and colons."""
import os
import re
import sysconfig
from pathlib import Path

from pydoc_data.topics import topics

CAP_BYTES = 8_000_000
# Third-party packages are no part of the standard library; its tests are repetitive and some are deliberately
# malformed (bad encodings, syntax errors).
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
MAX_DATA_SHARE = 0.5

# A data line, in one pass of the regex engine (possessive quantifiers, so no line backtracks): literals, brackets,
# commas and colons with at least one string or number, then perhaps a comment. A docstring (triple quotes) is no
# data.
_STRING = r"""[rRbBuU]{0,2}+(?!'''|\"\"\")(?:'(?:[^'\\\n]|\\.)*+'|"(?:[^"\\\n]|\\.)*+")"""
_NUMBER = r"-?(?:0[xXoObB][0-9a-fA-F_]++|\d[\d_]*+(?:\.\d*+)?(?:[eE][-+]?\d++)?)"
DATA_LINE = re.compile(rf"^[ \t]*+(?=[^#\n]*?['\"\d])(?:{_STRING}|{_NUMBER}|[ \t,:()\[\]{{}}])++(?:#.*)?$", re.M)
CODE_LINE = re.compile(r"^[ \t]*+[^ \t\n#]", re.M)  # any line but a blank or comment-only one


def data_share(source: str) -> float:
    """The share of the source's code lines that are data literals only."""
    code_lines = len(CODE_LINE.findall(source))
    return len(DATA_LINE.findall(source)) / code_lines if code_lines else 0.0


def default_corpus(cap_bytes: int = CAP_BYTES) -> tuple[list[tuple[str, Path | bytes, int]], list[dict]]:
    """(documents, left out). A document is (name, source, size in bytes), its source the UTF-8 text itself or a
    file holding it; each left-out source is {"name", "bytes", "why"}."""
    docs = []
    for name in sorted(topics):
        text = topics[name].encode()
        docs.append((f"pydoc_data.topics/{name}", text, len(text)))
    total = sum(size for _, _, size in docs)
    left_out = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in _sources(stdlib):
        name = f"stdlib/{path.relative_to(stdlib).as_posix()}"
        try:
            data = path.read_bytes()
            share = data_share(data.decode("utf-8"))  # prepare reads the files as UTF-8: skip any that is not
        except (OSError, UnicodeDecodeError):
            continue
        if share > MAX_DATA_SHARE:
            left_out.append(dict(name=name, bytes=len(data), why=f"{share:.0%} of its code lines are data literals"))
            continue
        if total + len(data) > cap_bytes:
            break
        docs.append((name, path, len(data)))
        total += len(data)
    return docs, left_out


def _sources(stdlib: Path) -> list[Path]:
    found = []
    # os.walk, not rglob, so that site-packages (possibly huge) is never entered.
    for folder, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        found += [Path(folder, f) for f in files if f.endswith(".py")]
    return sorted(found)
