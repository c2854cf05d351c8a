"""Data-parallel training under torchrun, 2 processes on gloo (CPU): it must train the model one process would."""
import math
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

from tritongpt.files import LOCK_FILE, DirectoryLock
from tests.runs import (LOST_RANK_EXIT_S, SCHEDULE, TINY, alive, assert_lost_rank_reported, checkpointed,
                        exit_codes, finished, metrics, run, torchrun, train_losses, workers_of)
from tritongpt.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def test_two_ranks_train_the_same_model_as_one_process(tiny_dataset, two_rank_run, tmp_path):
    single = tmp_path / "single"
    assert run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(single), *TINY, *SCHEDULE,
               "--max-iters", "6").returncode == 0
    assert_trains_as_one_process(two_rank_run, single)


def assert_trains_as_one_process(ranks_out: Path, one_out: Path) -> None:
    """The run in ranks_out (several processes) trained, over SCHEDULE's six steps, what the run in one_out (one
    process, the same global batch) did: its losses to rounding, its weights within what AdamW promises."""
    ranks, one = metrics_by_step(ranks_out), metrics_by_step(one_out)
    assert sorted(ranks) == sorted(one) == list(range(0, 7))
    # Step 1 starts from the same weights on the same windows: only the order in which the micro-batches' gradients
    # are summed differs ((g0 + g1) + (g2 + g3) against ((g0 + g1) + g2) + g3; the 1/4 scalings are powers of two,
    # exact). That is a few fp32 roundings of the sum, far inside 1e-5 relative; the gradient norm too (under FSDP
    # computed over the ranks' shards of the gradients).
    assert ranks[1]["grad_norm"] == pytest.approx(one[1]["grad_norm"], rel=1e-5)
    # Later steps start from weights that differ by those roundings, passed through AdamW. Adam divides by
    # sqrt(v), so an element whose gradient is itself at the rounding level can take a different step (up to the
    # full step size), but such elements have near-zero gradients, so their effect on the loss is second order:
    # the losses still agree to rounding.
    for step in range(1, 7):
        assert ranks[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-5), step
    assert [m["val/loss"] for m in ranks.values() if "val/loss" in m] == pytest.approx(
        [m["val/loss"] for m in one.values() if "val/loss" in m], rel=1e-5)
    # What AdamW promises per element: each step moves a weight by at most lr_t * adam_step_bound(t) (plus a
    # decay shared by both runs), so two runs from the same start differ by at most twice the sum of those. The
    # checkpoint (each rank's part) reads on one process as the whole model, under the names one process gives it.
    lr = [m["lr"] for step, m in sorted(one.items()) if step >= 1]
    bound = sum(2 * lr_t * adam_step_bound(t, 0.9, 0.95) for t, lr_t in enumerate(lr, start=1))
    a, b = load_checkpoint(ranks_out)["model"], load_checkpoint(one_out)["model"]
    assert a.keys() == b.keys()
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
        os.kill(workers_of(proc.pid)[1], signal.SIGTERM)
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


def test_a_killed_rank_ends_the_job_in_one_line_naming_it(tiny_dataset, tmp_path):
    out = tmp_path / "killed"
    # Three ranks: the two left learn which one is gone from each other (with two, it is plainly the other).
    proc = torchrun("--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--max-iters", "100000",
                    "--eval-interval", "100000", "--ckpt-interval", "3", nproc=3)
    workers = {}
    try:
        checkpointed([proc], out)
        workers = workers_of(proc.pid)
        assert sorted(workers) == [0, 1, 2]
        os.kill(workers[1], signal.SIGKILL)
        output, _ = proc.communicate(timeout=LOST_RANK_EXIT_S)
        assert proc.returncode == 1
        assert_lost_rank_reported(output, out, rank=1)
        # Ranks 0 and 2 exit 1 once they have met the loss, unless torchrun, which stops them on rank 1's death,
        # ends one first in its last moments (its signal is only noted while a rank trains and reports).
        codes = exit_codes(output)
        assert codes.pop("1") == "-9" and codes.keys() == {"0", "2"} and set(codes.values()) <= {"1", "-15"}, output
        assert not any(alive(pid) for pid in workers.values())
    finally:
        for pid in [proc.pid, *workers.values()]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)
