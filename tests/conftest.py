"""Test set-up. Without a CUDA GPU the Triton kernels run in Triton's CPU interpreter, which must be switched
on before any @triton.jit function is defined, hence here, before the tests import tritongpt.kernels."""
import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where the kernel tests run: the GPU when there is one, else the CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


TINY_CORPUS = {
    "a.py": "def add(a, b):\n\treturn a + b\n\n\nclass Point:\n    x: int = 0  # origin\n" * 40,
    "notes/b.txt": "The quick brown fox — jumps over the lazy dog. Ünïcödé and 漢字 too.\n" * 60,
    "notes/c.md": "# Title\n\nSome *markdown* with `code` and numbers 12345.\n" * 50,
}


def write_tiny_corpus(root: Path) -> Path:
    """TINY_CORPUS's documents as files under root."""
    for name, text in TINY_CORPUS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A dataset prepared from three small documents (a 400-token vocabulary): fast to train on."""
    from tritongpt.data.prepare import prepare
    root = write_tiny_corpus(tmp_path_factory.mktemp("corpus"))
    out = root / "dataset"
    prepare([str(root / name) for name in TINY_CORPUS], out_dir=out, vocab_size=400, val_fraction=0.34, workers=1,
            progress=False)
    return out


@pytest.fixture
def finished_run(tiny_dataset, tmp_path):
    """A finished two-step run, checkpointed at step 2: (its out dir, the command's options)."""
    from tests.runs import finished_run as train_two_steps
    out = tmp_path / "run"
    return out, train_two_steps(tiny_dataset, out)


@pytest.fixture(scope="session")
def two_rank_run(tiny_dataset, tmp_path_factory):
    """The out dir of a finished torchrun run of 2 processes on one node (SCHEDULE, 6 steps)."""
    from tests.runs import SCHEDULE, TINY, finished, torchrun
    out = tmp_path_factory.mktemp("ddp") / "whole"
    output = finished(torchrun("--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, *SCHEDULE,
                               "--max-iters", "6"))
    assert "2 processes x 2 micro-batches each" in output
    return out
