"""Running train.py and sample.py from tests: in this process (start-up costs seconds a process) or as a real one."""
import io
import json
import os
import struct
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import sample
import train
from tritongpt import export
from tritongpt.data import prepare
from tritongpt.files import LOCK_FILE
from tritongpt.options import run_main

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--batch-size", "4", "--eval-iters", "2", "--log-interval", "1", "--sample-tokens", "0"]
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.json", "training_curves.png")
FINAL_CHECKPOINT = "checkpoints/step_000002"  # finished_run's
def run(script: str, *args: str):
    """The script's main() in this process, exactly as its command line runs it (start-up costs seconds a process)."""
    main = {"train.py": train.main, "sample.py": sample.main, "data/prepare.py": prepare.main,
            "-m tritongpt.export": export.main}[script]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            run_main(lambda: main(list(args)))
            code = 0
        except SystemExit as e:
            code = e.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def run_process(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)


def assert_user_error(result, fragment: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment in lines[0], lines[0]


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(out_dir) if "train/loss" in m}


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a run directory, by its path in it: what a refused command must leave byte-identical (all but
    the lock file, which names the last process to hold the directory)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def finished_run(dataset: Path, out: Path) -> list[str]:
    """Trains two steps into out, checkpointed at step 2, and returns the command's options."""
    args = ["--data-dir", str(dataset), "--out-dir", str(out), *TINY, "--max-iters", "2", "--eval-interval", "2"]
    result = run("train.py", *args)
    assert result.returncode == 0, result.stderr
    assert sorted([*RUN_FILES, LOCK_FILE]) == sorted(p.name for p in out.iterdir())
    assert (out / "checkpoints" / "latest").read_text() == "step_000002\n"
    return args


def split_ids(meta_path: Path, split: str) -> np.ndarray:
    """The token ids of a split: its shards' headers read by hand, as the format in data/shards.py states them."""
    meta = json.loads(meta_path.read_text())
    ids = []
    for shard in meta["shards"][split]:
        raw = (meta_path.parent / shard["file"]).read_bytes()
        magic, version, itemsize, count = struct.unpack("<8sIIQ", raw[:24])
        assert (magic, version, itemsize, count) == (b"TGPTTOKS", 1, np.dtype(meta["dtype"]).itemsize, shard["tokens"])
        assert raw[24:32] == bytes(8) and len(raw) == 32 + count * itemsize
        ids.append(np.frombuffer(raw, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), offset=32))
    return np.concatenate(ids)
