"""FSDP2 (--parallel fsdp): under torchrun, 2 processes on gloo (CPU), it trains the model that one process (and DDP)
trains, each rank holds half of the weights, gradients and AdamW state, and every op implementation, torch.compile
and HSDP run under it; run alone it is a world of one; its mistaken combinations are refused in one line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import fsdp_memory, train_throughput
from tritongpt import distributed
from tritongpt.errors import UserError
from tritongpt.files import DirectoryLock
from tritongpt.train_options import TrainOptions, check_run
from tests.runs import REPO, TINY, assert_user_error, run, train_losses
from tests.test_ddp import SCHEDULE, assert_trains_as_one_process, finished, torchrun

# Three evaluation batches: rank 0 gets two, rank 1 one, and runs a second one uncounted (a sharded model's forward
# is a collective, which both ranks must make alike).
SIX_STEPS = [*TINY, *SCHEDULE, "--max-iters", "6", "--eval-iters", "3"]


@pytest.fixture(scope="module")
def single_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "single"
    assert run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *SIX_STEPS).returncode == 0
    return out


@pytest.mark.slow
def test_two_ranks_under_fsdp_train_the_same_model_as_one_process(tiny_dataset, single_run, tmp_path):
    out = tmp_path / "fsdp"
    # The closing sample runs on every rank (each layer's forward gathers its weights from both), shown by rank 0.
    output = finished(torchrun("--data-dir", str(tiny_dataset), "--out-dir", str(out), *SIX_STEPS, "--parallel",
                               "fsdp", "--sample-tokens", "8", "--sample-prompt", "class"))
    assert "2 processes x 2 micro-batches each" in output
    assert output.count("--- sample ---") == 1
    assert_trains_as_one_process(out, single_run)  # as DDP does (tests/test_ddp.py)
    # sample.py reads it on one process, and draws what the ranks drew together (its defaults are the closing
    # sample's).
    sampled = run("sample.py", "--checkpoint", str(out), "--prompt", "class", "--max-new-tokens", "8")
    assert sampled.returncode == 0, sampled.stderr
    assert "--- sample ---\n" + sampled.stdout in output


@pytest.mark.slow
def test_each_rank_holds_half_the_training_state_and_every_way_of_running_takes_the_same_step():
    """tests/fsdp_worker.py takes one optimizer step (two micro-batches a rank) with the torch ops, the Triton ops
    (on the interpreter), torch.compile, and HSDP (2 replicas of 1 shard) keeping gathered weights after the
    forward, each from the same weights on the same batches."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "tests.fsdp_worker"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    reference = result["torch"]
    whole, half = reference["computed"]["ddp"], reference["computed"]["fsdp"]
    # The shards partition the whole: each parameter is split by rows, and rank 0 takes the larger part of those
    # that do not split evenly (401 tokens, 24 positions), which the computed figure counts it for.
    held = [sum(rank.values()) for rank in reference["held"]]
    assert sum(held) == whole
    assert held[0] == half and whole / 2 - (half - whole / 2) <= held[1] <= half
    for rank in reference["held"]:  # weights, gradients and the two moments: 4 + 4 + 8 bytes a parameter
        assert rank["weights"] == rank["gradients"] == rank["optimizer"] / 2
    # Gradient accumulation reduces once a step, on the last micro-batch: one reduce-scatter for each of the three
    # units (the two Blocks and the root), not one for each micro-batch.
    assert [result[way]["reductions"] for way in ("torch", "triton", "compiled")] == [3, 3, 3]
    # The divergence guard: a nan in the last rank's shard alone is seen by both.
    assert all(result[way]["nan_seen"] for way in result)
    for way in ("triton", "compiled", "hsdp"):
        assert result[way]["loss"] == pytest.approx(reference["loss"], rel=1e-5), way
        assert result[way]["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5), way
    # HSDP with a single shard in each replica: each rank holds all of it, as under DDP.
    assert [sum(rank.values()) for rank in result["hsdp"]["held"]] == [whole, whole]


def test_alone_fsdp_is_a_world_of_one_that_trains_as_one_process_and_resumes(tiny_dataset, single_run, tmp_path):
    out = tmp_path / "alone"
    args = ["--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, *SCHEDULE, "--parallel", "fsdp"]
    first = run("train.py", *args, "--max-iters", "3")
    assert first.returncode == 0, first.stderr
    resumed = run("train.py", "--resume", "--out-dir", str(out), "--max-iters", "6")
    assert resumed.returncode == 0, resumed.stderr
    assert train_losses(out) == pytest.approx(train_losses(single_run), rel=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--replicate", "2"], "--replicate applies to --parallel fsdp only; add --parallel fsdp or drop it"),
    (["--fsdp-reshard-after-forward", "false"],
     "--fsdp-reshard-after-forward applies to --parallel fsdp only; add --parallel fsdp or drop it"),
    (["--parallel", "fsdp", "--replicate", "2"],
     "--replicate 2 does not divide the 1 processes into equal groups; pass a divisor of 1"),
    (["--parallel", "fsdp", "--replicate", "0"], "--replicate must be at least 1, got 0"),
    (["--parallel", "zero"], "--parallel: invalid choice: 'zero'"),
])
def test_mistaken_fsdp_options_are_refused_in_one_line(tiny_dataset, tmp_path, args, message):
    result = run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(tmp_path / "out"), *TINY, *args)
    assert_user_error(result, message)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_run_saved_under_ddp_resumes_under_fsdp(finished_run):
    out, _ = finished_run
    resumed = run("train.py", "--resume", "--out-dir", str(out), "--max-iters", "3", "--parallel", "fsdp")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(train_losses(out)) == [1, 2, 3]


def test_training_state_bytes_per_rank_from_the_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Embedding(7, 2))
    # Whole: (15 + 3 + 14) parameters x 16 bytes. In 2 shards the largest holds 2 of the Linear's 3 rows (2 x 5) and
    # of its bias (2), and 4 of the embedding's 7 rows (4 x 2).
    assert distributed.training_state_bytes(model) == 32 * 16
    assert distributed.training_state_bytes(model, 2) == (10 + 2 + 8) * 16
    rows = {row["model"]: row for row in fsdp_memory.table([8])}
    assert rows["gpt2"]["ddp"] == 16 * 124_439_808  # GPT-2 124M, its position embedding included
    # An uneven split costs a parameter at most one row over an eighth: GPT-2 has 148 parameters, rows of <= 3072.
    assert rows["gpt2"]["ddp"] / 8 <= rows["gpt2"]["fsdp8"] <= rows["gpt2"]["ddp"] / 8 + 16 * 148 * 3072


def test_the_throughput_benchmark_plans_an_fsdp_run(capsys):
    train_throughput.main(["--quick", "--parallel", "fsdp", "--dry-run"])
    assert "each model under FSDP2 (a world of one)" in capsys.readouterr().out


def test_fsdp_refuses_float16_whose_gradient_scaler_it_does_not_support(tiny_dataset, tmp_path):
    # On a GPU (float16 is a GPU's dtype): the check runs before anything touches the device.
    world = distributed.World(rank=0, size=1, device=torch.device("cuda"))
    opts = TrainOptions(data_dir=str(tiny_dataset), out_dir=str(tmp_path / "out"), parallel="fsdp", dtype="float16")
    with DirectoryLock(tmp_path / "out") as lock, pytest.raises(UserError) as refused:
        check_run(opts, {"parallel", "dtype"}, world, lock)
    assert str(refused.value) == ("--parallel fsdp computes in bfloat16 or float32, not float16 (whose GradScaler it "
                                  "does not support); pass --dtype bfloat16 or --dtype float32")
