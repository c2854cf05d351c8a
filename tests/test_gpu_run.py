"""bench/gpu_run.sh quick on a machine without a GPU: a dry run in which every step checks its command and reports
itself skipped with its budget, the budgets fit the 8 minutes a short GPU session gives, and a step whose command
fails is reported and fails the run. (On a GPU it would run the real session, so these tests need its absence.)"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICK_STEPS = ["env", "tests-gpu", "throughput-quick", "attention-quick", "layernorm-quick", "mlp-quick",
               "cross-entropy-quick", "repeatability"]
SESSION_S = 8 * 60

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, gpu_run.sh quick runs for real")


def _gpu_run(*steps: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ARCHIVE_DIR")}
    return subprocess.run(["bash", "bench/gpu_run.sh", *steps], cwd=ROOT, env={**env, "PYTHON": python},
                          capture_output=True, text=True, timeout=300)


def _files_under(path: Path) -> set[Path]:
    return set(path.rglob("*")) if path.exists() else set()


def test_quick_without_a_gpu_is_a_dry_run_that_fits_the_session():
    results_before = _files_under(ROOT / "bench" / "results")
    run = _gpu_run("quick")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    skipped = re.findall(r"^=== (\S+): skipped \(no GPU\), budget (\d+) s$", run.stdout, re.MULTILINE)
    assert [step for step, _ in skipped] == QUICK_STEPS
    total = re.findall(r"^=== budgets' sum: (\d+) s for (\d+) steps$", run.stdout, re.MULTILINE)
    assert total == [(str(sum(int(budget) for _, budget in skipped)), str(len(QUICK_STEPS)))]
    assert run.stdout.rstrip().splitlines()[-1].startswith("=== budgets' sum")
    assert int(total[0][0]) <= SESSION_S - 20, "the script's own start needs time too"
    # Each step checked its command: the tests were collected, each benchmark printed its plan.
    assert re.search(r"\d+/\d+ tests collected", run.stdout)
    assert "BROKEN" not in run.stdout
    assert _files_under(ROOT / "bench" / "results") == results_before, "a dry run writes no results"


def test_a_step_whose_command_fails_is_reported_and_fails_the_dry_run(tmp_path):
    # An interpreter that cannot run the repeatability check stands for one whose module or arguments have rotted.
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\n[[ " $* " == *" bench.repeatability "* ]] && exit 3\n'
                      f'exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    run = _gpu_run("layernorm-quick", "repeatability", python=str(python))
    assert run.returncode == 1, run.stdout[-3000:]
    assert "=== repeatability: skipped (no GPU), budget" in run.stdout
    assert re.search(r"=== repeatability: .*\n(    .*\n)*    BROKEN: the step's command fails", run.stdout)
    assert "=== 1 step(s) BROKEN" in run.stdout
    layernorm = run.stdout.split("=== layernorm-quick")[1].split("===")[0]
    assert "BROKEN" not in layernorm
