"""Running train.py and sample.py from tests: in this process (start-up costs seconds a process) or as a real one."""
import io
import json
import os
import re
import struct
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import sample
import train
from tritongpt import export
from tritongpt.data import prepare
from tritongpt.checkpoint import CHECKPOINTS_DIR, LATEST_FILE, load_checkpoint, step_folder_name
from tritongpt.files import LOCK_FILE
from tritongpt.options import run_main

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--batch-size", "4", "--eval-iters", "2", "--log-interval", "1", "--sample-tokens", "0"]
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.json", "training_curves.png")
FINAL_CHECKPOINT = "checkpoints/step_000002"  # finished_run's
# Six steps of four micro-batches (two per rank under torchrun), evaluated and checkpointed every three, with AdamW,
# whose fp32 step keeps runs on different process counts within rounding of each other, and within a bound per
# weight (tests/test_ddp.py; Muon's bf16 Newton-Schulz is held to one process in tests/test_muon.py).
SCHEDULE = ["--eval-interval", "3", "--lr-decay-iters", "6", "--warmup-iters", "2", "--grad-accum", "4",
            "--optimizer", "adamw"]


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


def torchrun(*args: str, nproc: int = 2, rendezvous: tuple[str, ...] = ("--standalone",),
             launcher: tuple[str, ...] = (), env_extra: dict | None = None, **popen) -> subprocess.Popen:
    """train.py under torchrun, nproc processes (on one node, unless rendezvous names another), with launcher's
    options for torchrun itself."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rendezvous,
                             f"--nproc_per_node={nproc}", *launcher, "train.py", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finished(proc: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-3000:]
    return output


# How soon after one rank is killed every other rank has ended: a chosen bound, well under the collective timeout
# (COLLECTIVE_TIMEOUT, 5 minutes) that the ranks would otherwise wait out, and well over the few seconds it takes.
LOST_RANK_EXIT_S = 60


def checkpointed(launchers: list[subprocess.Popen], out: Path) -> None:
    """Waits until the run in out has written a checkpoint and trained on (a run that ends stops the test)."""
    deadline = time.time() + 180
    while not ((out / CHECKPOINTS_DIR / LATEST_FILE).exists() and (out / "metrics.jsonl").exists()
               and len(train_losses(out)) >= 5):
        assert all(p.poll() is None for p in launchers) and time.time() < deadline, "training did not start"
        time.sleep(0.2)


def assert_lost_rank_reported(output: str, out: Path, rank: int) -> None:
    """The job's output names the lost rank and the last checkpoint (whole), in one line, and holds no traceback
    from this project's code (torchrun's own report below it is torchrun's)."""
    lines = [line for line in output.splitlines() if line.startswith("error")]
    step = load_checkpoint(out)["iter_num"]
    assert len(lines) == 1 and re.fullmatch(
        rf"error: rank {rank} of the job is gone \(killed, or ended by an error of its own\) after step \d+; the last "
        rf"checkpoint, {re.escape(str(out / CHECKPOINTS_DIR / step_folder_name(step)))}, holds step {step}: continue "
        rf"from it with --resume --out-dir {re.escape(str(out))}", lines[0]), output[-3000:]
    assert f'File "{REPO}{os.sep}' not in output, output[-3000:]  # (a venv beside the clone may share its prefix)


def exit_codes(output: str) -> dict[str, str]:
    """{rank: exit code} from torchrun's failure summary."""
    return dict(re.findall(r"rank\s+:\s+(\d+) \(local_rank: \d+\)\s+exitcode\s+:\s+(-?\d+)", output))


def workers_of(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started (its children, each with RANK in its environment)."""
    workers = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        ranks = [int(e.split(b"=")[1]) for e in environ if e.startswith(b"RANK=")]
        if ppid == launcher_pid and ranks:
            workers[ranks[0]] = int(pid)
    return workers


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


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


def assert_resumed_run_matches_uninterrupted(args: list[str], tmp_path: Path) -> tuple[Path, str]:
    """Trains 6 steps with args in one run, and 3 then 3 more resumed in another: the two end with the same losses
    and weights, exactly (CPU, fp32: the checkpoint restores everything the step depends on). Returns the resumed
    run's OUT_DIR and its output."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run("train.py", *args, "--out-dir", str(whole), "--max-iters", "6").returncode == 0
    assert run("train.py", *args, "--out-dir", str(parts), "--max-iters", "3").returncode == 0
    resumed = run("train.py", "--resume", "--out-dir", str(parts), "--max-iters", "6")
    assert resumed.returncode == 0, resumed.stderr
    assert train_losses(parts) == train_losses(whole)
    a, b = (load_checkpoint(out)["model"] for out in (whole, parts))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return parts, resumed.stdout


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
