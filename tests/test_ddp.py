"""Data-parallel training under torchrun, 2 processes on gloo (CPU): it must train the model one process would."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.runs import REPO, TINY, metrics, run, train_losses

pytestmark = pytest.mark.slow
# Six steps of four micro-batches (two per rank), evaluated and checkpointed every three.
SCHEDULE = ["--eval-interval", "3", "--lr-decay-iters", "6", "--warmup-iters", "2", "--grad-accum", "4"]


def torchrun(*args: str, nproc: int = 2, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", "train.py", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finished(proc: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def two_rank_run(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "whole"
    output = finished(torchrun("--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, *SCHEDULE,
                               "--max-iters", "6"))
    assert "2 processes x 2 micro-batches each" in output
    return out


def test_two_ranks_train_the_same_model_as_one_process(tiny_dataset, two_rank_run, tmp_path):
    single = tmp_path / "single"
    assert run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(single), *TINY, *SCHEDULE,
               "--max-iters", "6").returncode == 0
    ddp_losses, single_losses = train_losses(two_rank_run), train_losses(single)
    assert sorted(ddp_losses) == list(range(1, 7))
    for step, loss in single_losses.items():
        assert ddp_losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    val = lambda out: [m["val/loss"] for m in metrics(out) if "val/loss" in m]
    assert val(two_rank_run) == pytest.approx(val(single), rel=1e-5)
    a = torch.load(two_rank_run / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(single / "ckpt.pt", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_resumed_two_rank_run_matches_uninterrupted(tiny_dataset, two_rank_run, tmp_path):
    parts = tmp_path / "parts"
    finished(torchrun("--data-dir", str(tiny_dataset), "--out-dir", str(parts), *TINY, *SCHEDULE, "--max-iters", "3"))
    finished(torchrun("--resume", "--out-dir", str(parts), "--max-iters", "6"))
    assert train_losses(parts) == train_losses(two_rank_run)  # same world size: bitwise the same arithmetic
    a = torch.load(two_rank_run / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(parts / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_rank_ends_the_job(tiny_dataset, tmp_path):
    out = tmp_path / "killed"
    proc = torchrun("--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--max-iters", "100000",
                    "--eval-interval", "100000")
    workers = {}
    try:
        deadline = time.time() + 180
        while not ((out / "metrics.jsonl").exists() and len(train_losses(out)) >= 2):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.5)
        workers = _workers(proc.pid)
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=120)
        assert proc.returncode != 0
        assert time.time() - killed_at < 120
        time.sleep(1)
        assert not any(_alive(pid) for pid in workers.values())  # rank 0 was shut down too
    finally:
        for pid in [proc.pid, *workers.values()]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)


def _workers(launcher_pid: int) -> dict[int, int]:
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


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
