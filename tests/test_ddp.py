"""Data-parallel training under torchrun, 2 processes on gloo (CPU): it must train the model one process would."""
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tritongpt.files import LOCK_FILE, DirectoryLock
from tests.runs import REPO, TINY, metrics, run, train_losses
from tritongpt.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
# Six steps of four micro-batches (two per rank), evaluated and checkpointed every three.
SCHEDULE = ["--eval-interval", "3", "--lr-decay-iters", "6", "--warmup-iters", "2", "--grad-accum", "4"]


def torchrun(*args: str, nproc: int = 2, launcher: tuple[str, ...] = (), env_extra: dict | None = None,
             **popen) -> subprocess.Popen:
    """train.py under torchrun, with launcher's options for torchrun itself."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", *launcher, "train.py", *args],
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
    ddp, one = metrics_by_step(two_rank_run), metrics_by_step(single)
    assert sorted(ddp) == sorted(one) == list(range(0, 7))
    # Step 1 starts from the same weights on the same windows: only the order in which the four micro-batches'
    # gradients are summed differs ((g0 + g1) + (g2 + g3) against ((g0 + g1) + g2) + g3; the 1/4 scalings are powers
    # of two, exact). That is a few fp32 roundings of the sum, far inside 1e-5 relative.
    assert ddp[1]["train/loss"] == pytest.approx(one[1]["train/loss"], rel=1e-5)
    assert ddp[1]["grad_norm"] == pytest.approx(one[1]["grad_norm"], rel=1e-5)
    # Later steps start from weights that differ by those roundings, passed through AdamW. Adam divides by
    # sqrt(v), so an element whose gradient is itself at the rounding level can take a different step (up to the
    # full step size), but such elements have near-zero gradients, so their effect on the loss is second order:
    # the losses still agree to rounding.
    for step in range(2, 7):
        assert ddp[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-5), step
    assert [m["val/loss"] for m in ddp.values() if "val/loss" in m] == pytest.approx(
        [m["val/loss"] for m in one.values() if "val/loss" in m], rel=1e-5)
    # What AdamW promises per element: each step moves a weight by at most lr_t * adam_step_bound(t) (plus a
    # decay shared by both runs), so two runs from the same start differ by at most twice the sum of those.
    lr = [m["lr"] for step, m in sorted(one.items()) if step >= 1]
    bound = sum(2 * lr_t * adam_step_bound(t, 0.9, 0.95) for t, lr_t in enumerate(lr, start=1))
    a = load_checkpoint(two_rank_run)["model"]
    b = load_checkpoint(single)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=bound, msg=name)


def adam_step_bound(t: int, beta1: float, beta2: float) -> float:
    """The largest |m_hat / sqrt(v_hat)| Adam can reach at step t (1-based), whatever the gradients: by
    Cauchy-Schwarz, |sum_i a_i g_i| <= sqrt(sum_i a_i^2 / b_i) * sqrt(sum_i b_i g_i^2), with a_i and b_i the
    bias-corrected weights of gradient i in m_hat and v_hat. (It is 1 at t = 1, where m_hat / sqrt(v_hat) = sign(g).)"""
    total = 0.0
    for i in range(1, t + 1):
        a = (1 - beta1) * beta1 ** (t - i) / (1 - beta1 ** t)
        b = (1 - beta2) * beta2 ** (t - i) / (1 - beta2 ** t)
        total += a * a / b
    return math.sqrt(total)


def metrics_by_step(out: Path) -> dict[int, dict]:
    merged = {}
    for m in metrics(out):
        merged.setdefault(m["step"], {}).update(m)
    return merged


def test_resumed_two_rank_run_matches_uninterrupted(tiny_dataset, two_rank_run, tmp_path):
    parts = tmp_path / "parts"
    finished(torchrun("--data-dir", str(tiny_dataset), "--out-dir", str(parts), *TINY, *SCHEDULE, "--max-iters", "3"))
    finished(torchrun("--resume", "--out-dir", str(parts), "--max-iters", "6"))
    assert train_losses(parts) == train_losses(two_rank_run)  # same world size: bitwise the same arithmetic
    a = load_checkpoint(two_rank_run)["model"]
    b = load_checkpoint(parts)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_mistake_is_one_line_from_rank_0_and_no_rank_goes_on(tiny_dataset, tmp_path):
    proc = torchrun("--data-dir", str(tiny_dataset), "--out-dir", str(tmp_path / "out"), *TINY, "--beta2", "1.5")
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1  # torchrun's own, whatever its workers' (the README says so)
    assert [line for line in output.splitlines() if line.startswith("error:")] == ["error: --beta2 must be below 1, got 1.5"]
    assert "Traceback" not in output.split("error: --beta2")[0] and "UserError" not in output
    # torchrun's failure summary: rank 0 exits 2 with the line above. Rank 1 meets the same mistake and exits 2 when
    # torchrun stops it, unless torchrun stops it before it got that far (SIGTERM, -15, while still importing).
    assert exit_codes(output) in ({"0": "2", "1": "2"}, {"0": "2", "1": "-15"}), output[-3000:]
    assert not (tmp_path / "out").exists()


def exit_codes(output: str) -> dict[str, str]:
    """{rank: exit code} from torchrun's failure summary."""
    return dict(re.findall(r"rank\s+:\s+(\d+) \(local_rank: \d+\)\s+exitcode\s+:\s+(-?\d+)", output))


def test_rank_0_refuses_a_directory_another_run_holds(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with DirectoryLock(out) as lock:  # this process stands for the other run
        assert lock.acquire() is None
        proc = torchrun("--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--max-iters", "2")
        output, _ = proc.communicate(timeout=240)
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        f"error: --out-dir {out} is in use by another training run (pid {os.getpid()} on {socket.gethostname()}); "
        "wait for it to end (or stop it), or pass another --out-dir"]
    # Rank 1 does not take the lock: it waits for rank 0 to connect until torchrun stops it.
    assert exit_codes(output) == {"0": "2", "1": "-15"}, output[-3000:]
    assert "Traceback" not in output.split("error: --out-dir")[0]
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_with_its_checkpoint(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    proc = torchrun("--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--max-iters", "100000",
                    "--eval-interval", "100000")
    try:
        deadline = time.time() + 180
        while not ((out / "metrics.jsonl").exists() and len(train_losses(out)) >= 2):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.5)
        # Rank 1 alone: rank 0, which writes the checkpoint, learns of it from rank 1. (A scheduler's SIGTERM goes
        # to torchrun, which passes it on to every rank, each at its own point in its step.)
        os.kill(_workers(proc.pid)[1], signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    step = load_checkpoint(out)["iter_num"]
    assert step == max(train_losses(out))
    assert [line for line in output.splitlines() if line.startswith("stopped by")] == [
        f"stopped by SIGTERM after step {step}; the last checkpoint, {out / 'checkpoints' / f'step_{step:06d}'}, "
        f"holds step {step}: continue from it with --resume --out-dir {out}"]
    # Each rank exits 143 (128 + SIGTERM), unless torchrun's SIGTERM, sent as the first one exits, ends it sooner.
    assert set(exit_codes(output).values()) <= {"143", "-15"} and exit_codes(output).keys() == {"0", "1"}, output


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
