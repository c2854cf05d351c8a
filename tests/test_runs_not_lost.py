"""What keeps a run from being lost: one process at a time in a run directory, a directory reusable after a run that
wrote no checkpoint, shapes that cannot fit refused before they start, a checkpoint of the last step on Ctrl-C or
SIGTERM, and a full disk that leaves the previous checkpoint whole. Each refusal is one line, with the files intact."""
import errno
import io
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import tritongpt.files
from tritongpt.files import LOCK_FILE, DirectoryLock
from tritongpt.model import GPT, PRESETS, parameter_count, preset, training_memory
from tritongpt.stopping import StopRequests
from tests.runs import FINAL_CHECKPOINT, REPO, TINY, assert_user_error, metrics, run, snapshot, train_losses
from tritongpt.checkpoint import load_checkpoint

# A run that goes on until it is stopped: no evaluation or checkpoint after step 0's, a log line every step.
ENDLESS = [*TINY, "--max-iters", "100000", "--eval-interval", "100000"]


def start_training(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for_steps(proc: subprocess.Popen, out, steps: int) -> None:
    deadline = time.time() + 240  # start-up, on a loaded 2-core machine
    while not ((out / "metrics.jsonl").exists() and len(train_losses(out)) >= steps):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_directory_in_use_is_refused_until_its_run_ends(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    data = ["--data-dir", str(tiny_dataset), *TINY, "--max-iters", "1"]
    first = start_training("--data-dir", str(tiny_dataset), "--out-dir", str(out), *ENDLESS)
    try:
        wait_for_steps(first, out, 1)
        config = (out / "config.json").read_bytes()
        for flags in ([], ["--resume"], ["--overwrite"]):
            second = run("train.py", *data, "--out-dir", str(out), *flags)
            assert_user_error(second, f"--out-dir {out} is in use by another training run (pid {first.pid} on ")
        assert first.poll() is None  # the first run goes on, its files its own
        assert (out / "config.json").read_bytes() == config and not (out / "checkpoints").exists()
    finally:
        first.kill()  # as a crash or the OOM killer would: its lock goes with it
        first.communicate(timeout=60)
    result = run("train.py", *data, "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(out)["iter_num"] == 1


def test_a_lock_is_held_until_released(tmp_path):
    with DirectoryLock(tmp_path) as lock:
        assert lock.acquire() is None  # held already: kept
        assert DirectoryLock(tmp_path).acquire() == f"pid {os.getpid()} on {socket.gethostname()}"
    again = DirectoryLock(tmp_path)
    assert again.acquire() is None
    again.release()


def test_a_file_system_without_locks_still_trains_and_says_so(tiny_dataset, tmp_path, monkeypatch):
    def flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(tritongpt.files.fcntl, "flock", flock)
    out = tmp_path / "out"
    result = run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--max-iters", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(f"note: the file system of {out} has no locks") == 1
    assert load_checkpoint(out)["iter_num"] == 1


def test_a_run_without_a_checkpoint_leaves_its_directory_reusable(tiny_dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--max-iters", "1"]
    with monkeypatch.context() as patch:
        # The first evaluation allocates far more than any machine's address space: a real allocation failure.
        patch.setattr("train.estimate_loss", lambda *_: torch.empty(2**46).sum().item())
        failed = run("train.py", *args)
    assert_user_error(failed, "out of memory on cpu (allocating 262,144.0 GiB failed): this run's shapes do not fit; "
                              "lower --batch-size")
    assert sorted(snapshot(out)) == ["config.json", "metrics.jsonl"] and not metrics(out)  # no plot of nothing

    assert_user_error(run("train.py", "--resume", "--out-dir", str(out)),
                      f"the run in {out} stopped before its first checkpoint (it left only metrics.jsonl, "
                      "config.json): there is nothing to resume; start it again without --resume")
    again = run("train.py", *args)  # the same command
    assert again.returncode == 0, again.stderr
    assert (f"note: {out} holds no checkpoint, only metrics.jsonl, config.json of a run that stopped before writing "
            "one; this run starts over in it") in again.stdout
    assert load_checkpoint(out)["iter_num"] == 1
    assert sorted(train_losses(out)) == [1]


@pytest.mark.parametrize("error, message", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.11 "
                            "GiB of which 3.50 GiB is free."), "out of memory on cpu (allocating 20.00 GiB failed)"),
    (RuntimeError("CUDA error: out of memory"), "out of memory on cpu: this run's shapes do not fit"),
])
def test_an_allocation_failure_in_a_step_is_one_line(tiny_dataset, tmp_path, monkeypatch, error, message):
    def train_step(*_):
        raise error
    monkeypatch.setattr("train.train_step", train_step)
    out = tmp_path / "out"
    assert_user_error(run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY), message)
    assert not (out / "checkpoints" / "latest").exists()


@pytest.mark.parametrize("flags, largest", [
    (["--batch-size", "1000000000"], "(activations: "),
    (["--n-embd", "65536"], "(weights, gradients and AdamW state: "),
    (["--block-size", "512", "--batch-size", "100000000"], "(attention scores: "),  # the CPU's attention is "torch"
])
def test_shapes_that_cannot_fit_are_refused_up_front(tiny_dataset, tmp_path, flags, largest):
    out = tmp_path / "out"
    result = run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, *flags)
    assert_user_error(result, "this run needs at least ")
    assert largest in result.stderr and " cpu has free; lower --batch-size" in result.stderr
    assert not out.exists()


def test_the_memory_bound_counts_the_model_and_never_refuses_a_preset():
    for bias in (True, False):
        config = preset("mini", vocab_size=400, bias=bias)
        assert parameter_count(config) == GPT(config).num_params(non_embedding=False)
        assert training_memory(config, 8, 4)["weights, gradients and AdamW state"] == 16 * parameter_count(config)
    # Every preset at the default batch size, with GPT-2's vocabulary and the GPU's ops, is far below an 80 GB H100;
    # and the CPU's default run below a gigabyte.
    for name in PRESETS:
        config = preset(name, vocab_size=50257, attention="triton", loss="triton")
        assert sum(training_memory(config, 8, 2).values()) < 40e9, name
    assert sum(training_memory(preset("mini", vocab_size=4096), 8, 4).values()) < 1e9


@pytest.mark.slow
@pytest.mark.parametrize("signum, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_a_signal_saves_the_step_just_finished(tiny_dataset, tmp_path, signum, name):
    out = tmp_path / "out"
    proc = start_training("--data-dir", str(tiny_dataset), "--out-dir", str(out), *ENDLESS)
    try:
        wait_for_steps(proc, out, 2)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr
    step = load_checkpoint(out)["iter_num"]
    assert step == max(train_losses(out))  # the last step logged is the one saved
    saved = f"step_{step:06d}"
    assert stderr.strip() == (f"stopped by {name} after step {step}; the last checkpoint, "
                              f"{out / 'checkpoints' / saved}, holds step {step}: continue from it with --resume "
                              f"--out-dir {out}")
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_FILE, "checkpoints", "config.json", "metrics.jsonl",
                                                            "training_curves.png"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", saved]  # no partial write left


def test_stop_requests_note_signals_and_a_second_ctrl_c_stops_at_once():
    with StopRequests() as requests:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's second notice changes nothing
        assert requests.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    with StopRequests() as requests:
        os.kill(os.getpid(), signal.SIGINT)
        assert requests.received == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


class FillingDisk(io.FileIO):
    """A file on a disk that fills after its first kilobyte: beyond it, write fails as a full disk's does."""

    def write(self, data) -> int:
        if self.tell() + len(data) > 1024:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_a_full_disk_keeps_the_previous_checkpoint(finished_run, monkeypatch):
    out, _ = finished_run
    before = snapshot(out)

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        if "trainer.pt" in str(path):  # the checkpoint, buffered as open() buffers any file
            return io.BufferedWriter(FillingDisk(path, "w"))
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(tritongpt.files, "open", open_on_a_full_disk, raising=False)
    result = run("train.py", "--resume", "--out-dir", str(out), "--max-iters", "4")
    assert_user_error(result, f"the disk is full: no space left in {out / 'checkpoints'} for the checkpoint of step "
                              f"4; the last checkpoint, {out / FINAL_CHECKPOINT}, holds step 2: continue from it with "
                              f"--resume --out-dir {out} once there is space")
    assert result.returncode == 2
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k.startswith("checkpoints/")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoints/")}  # the partial checkpoint is gone


def test_init_from_refuses_what_is_not_a_gpt2_checkpoint(tiny_dataset, tmp_path):
    data = ["--data-dir", str(tiny_dataset), "--out-dir", str(tmp_path / "out"), "--max-iters", "1"]
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights\n")
    assert_user_error(run("train.py", *data, "--init-from", str(notes)),
                      f"--init-from: {notes} is not a GPT-2 checkpoint: give the directory save_pretrained wrote")
    torch.save({"wte.weight": torch.zeros(2, 2)}, tmp_path / "weights.pt")
    assert_user_error(run("train.py", *data, "--init-from", str(tmp_path / "weights.pt")),
                      "is a bare state dict, which does not say the model's shape")
    assert_user_error(run("train.py", *data, "--init-from", str(tmp_path)), "has no config.json")
    assert not (tmp_path / "out").exists()


def test_a_moved_run_resumes_where_it_is(finished_run, tmp_path, monkeypatch):
    out, _ = finished_run
    monkeypatch.chdir(tmp_path)
    out.rename("out")  # --out-dir's default
    result = run("train.py", "--resume", "--max-iters", "3")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(tmp_path / "out")["iter_num"] == 3
    assert not out.exists()  # not where the run was first started
