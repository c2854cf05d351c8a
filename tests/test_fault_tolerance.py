"""Runs that survive a lost worker: torchrun restarts resume by themselves and replay exactly what was lost, a
checkpoint killed mid-write leaves the previous one whole, and a checkpoint written by N processes resumes on M."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tritongpt.checkpoint import LATEST_FILE, load_checkpoint
from tritongpt.errors import UserError
from tritongpt.train_options import TrainOptions, restarted_job
from tests.runs import REPO, TINY, assert_user_error, metrics, run, train_losses
from tests.test_ddp import finished, torchrun

# Eight steps of two micro-batches, checkpointed every two (all of them kept) and evaluated every four.
SCHEDULE = [*TINY, "--max-iters", "8", "--grad-accum", "2", "--ckpt-interval", "2", "--eval-interval", "4",
            "--keep-checkpoints", "4"]


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def optimizer_tensors(ckpt: dict) -> dict:
    return {f"{name}.{k}": v for name, state in ckpt["optimizer"]["state"].items() for k, v in state.items()}


def each_step_once(out: Path) -> None:
    logged = [m["step"] for m in metrics(out)]
    assert [s for s in logged if s] == sorted(s for s in logged if s)  # in order: replayed lines replaced the lost
    assert sorted(train_losses(out)) == list(range(1, 9))
    assert [m["step"] for m in metrics(out) if "val/loss" in m] == [0, 4, 8]
    assert len(logged) == 8 + 3


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    finished(torchrun("--data-dir", str(tiny_dataset), "--out-dir", str(out), *SCHEDULE))
    return out


@pytest.mark.slow
def test_a_lost_worker_is_restarted_and_the_run_ends_as_if_never_interrupted(tiny_dataset, uninterrupted, tmp_path):
    out = tmp_path / "out"
    args = ["--data-dir", str(tiny_dataset), "--out-dir", str(out), *SCHEDULE]
    # Rank 1 kills itself (SIGKILL) after step 5 of the first launch; torchrun restarts both ranks.
    output = finished(torchrun(*args, launcher=("--max-restarts", "1"), env_extra={"TRITONGPT_FAULT_DRILL": "5"}))
    assert "exitcode: -9" in output and "resuming from step" in output, output[-3000:]
    resumed_at = int(output.split("resuming from step ")[1].split()[0])
    assert resumed_at in (2, 4)  # step 4's checkpoint may or may not have been complete when rank 1 died
    ours, theirs = load_checkpoint(out), load_checkpoint(uninterrupted)
    assert ours["iter_num"] == theirs["iter_num"] == 8
    assert same_tensors(ours["model"], theirs["model"])  # bitwise: the replay is the very same computation
    assert same_tensors(optimizer_tensors(ours), optimizer_tensors(theirs))
    each_step_once(out)
    assert json.loads((out / "config.json").read_text())["launch"]["restart"] == 1

    # A new launch (not a restart) into a directory holding a run still refuses it.
    again = torchrun(*args)
    output, _ = again.communicate(timeout=240)
    assert again.returncode != 0
    refusals = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(refusals) == 1 and refusals[0].startswith(f"error: {out} already holds a run"), output[-3000:]
    assert "Traceback" not in output.split("error:")[0] and "UserError" not in output  # torchrun's own report follows


def test_a_restart_continues_only_its_own_job(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"launch": {"job": "job-a", "restart": 0}}))
    opts = TrainOptions(out_dir=str(out))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert not restarted_job(opts, out)  # a first launch: the refusal of an occupied directory applies
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert restarted_job(opts, out)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    with pytest.raises(UserError, match="holds another job's run"):
        restarted_job(opts, out)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's id for every job launched without --rdzv-id
    with pytest.raises(UserError, match="give torchrun --rdzv-id"):
        restarted_job(opts, out)
    shutil.rmtree(out)
    out.mkdir()
    assert not restarted_job(opts, out)  # nothing of the job's yet: it starts, as a first launch would


SLOW_WRITE = """
import runpy, sys, time
import torch.distributed.checkpoint.filesystem as fs
write_data = fs._FileSystemWriter.write_data

def stuck_at_step_4(self, plan, planner):  # the write of step 4's tensors never ends
    if "step_000004" in str(self.path):
        time.sleep(3600)
    return write_data(self, plan, planner)

fs._FileSystemWriter.write_data = stuck_at_step_4
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def last_logged_step(out: Path) -> int:
    """The last step metrics.jsonl logs a training loss for, read while the run writes it (0 before any)."""
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("}") and "train/loss" in line), default=0)


@pytest.mark.slow
def test_a_kill_during_a_background_write_leaves_the_previous_checkpoint(tiny_dataset, tmp_path):
    script = tmp_path / "slow_write.py"
    script.write_text(SLOW_WRITE)
    out = tmp_path / "out"
    args = ["--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--max-iters", "7",
            "--ckpt-interval", "2", "--eval-interval", "7"]
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        # Training goes on while step 4's write is stuck: the step loop never waits for a write...
        while last_logged_step(out) < 5:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        # ...until the next one, at step 6, waits for it. Killed there, as a crash would:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (out / "checkpoints" / LATEST_FILE).read_text() == "step_000002\n"
    assert load_checkpoint(out)["iter_num"] == 2
    assert (out / "checkpoints" / ".step_000004").is_dir()  # the unfinished write, never named by `latest`

    assert run("train.py", "--resume", "--out-dir", str(out)).returncode == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [LATEST_FILE, "step_000007"]
    whole = tmp_path / "whole"
    assert run("train.py", *args[:2], "--out-dir", str(whole), *args[4:]).returncode == 0
    assert same_tensors(load_checkpoint(out)["model"], load_checkpoint(whole)["model"])


def resume_at_step_4(source: Path, out: Path) -> None:
    """A copy of a run as it was after step 4 (its later checkpoints and log lines are replayed when it resumes)."""
    shutil.copytree(source, out)
    (out / "checkpoints" / LATEST_FILE).write_text("step_000004\n")
    for later in ("step_000006", "step_000008"):
        shutil.rmtree(out / "checkpoints" / later)


def assert_same_losses(a: Path, b: Path) -> None:
    # One process sums the two micro-batches' gradients where two ranks all-reduce them: a rounding apart, which
    # Muon's Newton-Schulz, in bf16, can turn into the last bit of some of its update's elements; over four steps
    # that keeps the losses within 3e-4 relative (tests/test_muon.py works it out).
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    assert [la[s] for s in range(5, 9)] == pytest.approx([lb[s] for s in range(5, 9)], rel=3e-4)


@pytest.mark.slow
def test_a_checkpoint_resumes_on_another_number_of_processes(tiny_dataset, uninterrupted, tmp_path):
    # Written by 2 ranks, resumed by 1 (with the same global batch: 2 micro-batches).
    on_one = tmp_path / "on_one"
    resume_at_step_4(uninterrupted, on_one)
    result = run("train.py", "--resume", "--out-dir", str(on_one))
    assert result.returncode == 0, result.stderr
    assert "written by 2 processes and this run has 1" in result.stdout
    assert_same_losses(on_one, uninterrupted)
    each_step_once(on_one)

    # Written by 1 process, resumed by 2.
    alone = tmp_path / "alone"
    assert run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(alone), *SCHEDULE).returncode == 0
    on_two = tmp_path / "on_two"
    resume_at_step_4(alone, on_two)
    finished(torchrun("--resume", "--out-dir", str(on_two)))
    assert_same_losses(on_two, alone)
    each_step_once(on_two)
    assert_same_losses(on_two, uninterrupted)


def test_a_checkpoint_pointer_to_a_missing_folder_is_one_line(finished_run):
    out, _ = finished_run
    (out / "checkpoints" / LATEST_FILE).write_text("step_000099\n")
    assert_user_error(run("train.py", "--resume", "--out-dir", str(out)), "names step_000099, which is missing")
    assert_user_error(run("sample.py", "--checkpoint", str(out)), "names step_000099, which is missing")
