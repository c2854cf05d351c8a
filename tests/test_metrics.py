"""The metrics logger: metrics.jsonl, config.json and training_curves.png always; W&B offline runs read back from their
run file. Nothing here uses the network: W&B runs are offline, or online with no API key (which falls back)."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.runs import TINY, run
from tritongpt.metrics import MetricsLogger, mfu

CONFIG = {"n_layer": 2, "lr": 6e-4, "dataset": "shakespeare_char", "betas": [0.9, 0.95]}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_metrics(step: int) -> dict:
    return {"train/loss": 4.0 / (1 + step), "lr": 1e-4 * step, "grad_norm": 0.5 + step / 7,
            "tokens_per_sec": 1000.0 + step / 3, "mfu": None, "step_time_ms": 12.5 + step}


def read_lines(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def wandb_records(tmp_path, monkeypatch):
    """The run-file reader, in a W&B environment that finds no stored key or settings and starts and ends with no
    wandb service. Skips where wandb is not installed (the GPU image)."""
    wandb = pytest.importorskip("wandb")
    from tests import wandb_records
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    # teardown() drops wandb's process-wide settings (read from the environment once) and stops its service.
    wandb.teardown()
    yield wandb_records
    wandb.teardown()


def test_jsonl_config_and_training_curves(tmp_path):
    out = tmp_path / "out"
    logger = MetricsLogger(out, config=CONFIG)
    assert logger.run_id is None
    for step in range(0, 50, 10):
        logger.log(step, train_metrics(step))
        if step % 20 == 0:
            logger.log(step, {"val/loss": 3.0 - step / 100})
    logger.log(50, {"train/loss": 1.5, "gpu_peak_mem_gib": 2.25})

    lines = read_lines(out)  # readable before finish(): every line is flushed as it is logged
    assert [line["step"] for line in lines] == [0, 0, 10, 20, 20, 30, 40, 40, 50]
    for line in lines[:-1]:
        assert isinstance(line.pop("time"), float)
        step = line.pop("step")
        assert line in (train_metrics(step), {"val/loss": 3.0 - step / 100})
    assert lines[0]["mfu"] is None and '"mfu": null' in (out / "metrics.jsonl").read_text()
    assert json.loads((out / "config.json").read_text()) == CONFIG

    logger.finish()
    png = (out / "training_curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    logger.finish()  # a second finish() does nothing
    logger.log(60, {"train/loss": 1.0})  # neither does logging after it
    assert len(read_lines(out)) == 9
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "training_curves.png"]


def test_resume_keeps_lines_before_resume_step_and_appends(tmp_path):
    first = MetricsLogger(tmp_path, config=CONFIG)
    for step in range(0, 100, 10):
        first.log(step, {"train/loss": float(step)})
    first.finish()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 100, "train/lo')  # the torn last line of a crashed run

    resumed = MetricsLogger(tmp_path, config=CONFIG, resume_step=50)
    for step in range(50, 70, 10):
        resumed.log(step, {"train/loss": step + 0.5})
    resumed.finish()
    lines = read_lines(tmp_path)
    assert [(line["step"], line["train/loss"]) for line in lines] == [
        (0, 0.0), (10, 10.0), (20, 20.0), (30, 30.0), (40, 40.0), (50, 50.5), (60, 60.5)]

    MetricsLogger(tmp_path, config=CONFIG).finish()  # a fresh run (no resume_step) starts the file over
    assert read_lines(tmp_path) == []


def test_wandb_offline_history_config_and_resume(tmp_path, wandb_records, capsys):
    steps, eval_steps = range(100), range(0, 100, 25)
    logger = MetricsLogger(tmp_path, config=CONFIG, wandb=True, mode="offline", run_name="test")
    for step in steps:
        logger.log(step, train_metrics(step))
        if step in eval_steps:
            logger.log(step, {"val/loss": 5.0 - step / 100})
    logger.finish()
    assert f"wandb sync {tmp_path / 'wandb'}" in capsys.readouterr().out

    [run_file] = wandb_records.run_files(tmp_path)
    assert run_file.name == f"run-{logger.run_id}.wandb"
    # Over one 32 KiB block, so that records split across blocks are reassembled by the reader too.
    assert run_file.stat().st_size > wandb_records.BLOCK_SIZE
    rows = {row["_step"]: row for row in wandb_records.history(run_file)}
    assert sorted(rows) == list(steps)  # a step's train and val metrics share one row
    for step in steps:
        expected = {k: v for k, v in train_metrics(step).items() if v is not None}  # mfu=None is left out
        if step in eval_steps:
            expected["val/loss"] = 5.0 - step / 100
        assert {k: v for k, v in rows[step].items() if not k.startswith("_")} == expected
    assert wandb_records.config(run_file) == CONFIG

    # --resume continues the run id; offline, wandb writes the continuation as a second run directory.
    resumed = MetricsLogger(tmp_path, config=CONFIG, wandb=True, mode="offline", resume_run_id=logger.run_id,
                            resume_step=100)
    resumed.log(100, {"train/loss": 0.25})
    resumed.finish()
    assert resumed.run_id == logger.run_id
    first, second = wandb_records.run_files(tmp_path)
    assert first == run_file and second.name == run_file.name
    assert [row["train/loss"] for row in wandb_records.history(second)] == [0.25]


def test_wandb_online_without_api_key_falls_back_to_offline(tmp_path, wandb_records, capsys):
    logger = MetricsLogger(tmp_path, config=CONFIG, wandb=True, mode="online")
    notice = [line for line in capsys.readouterr().out.splitlines() if "no W&B API key" in line]
    assert len(notice) == 1 and "logging offline" in notice[0] and "wandb sync" in notice[0]
    logger.log(1, {"train/loss": 2.0, "tokens_per_sec": 3.0})
    logger.finish()
    [run_file] = wandb_records.run_files(tmp_path)
    assert run_file.name == f"run-{logger.run_id}.wandb"
    assert [(row["train/loss"], row["tokens_per_sec"]) for row in wandb_records.history(run_file)] == [(2.0, 3.0)]
    assert len(read_lines(tmp_path)) == 1


def test_disabled_or_wandb_off_never_imports_wandb(tmp_path):
    # A fresh interpreter, since this one may have imported wandb already.
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from tritongpt.metrics import MetricsLogger

        tmp = Path({str(tmp_path)!r})
        rank1 = MetricsLogger(tmp / "rank1", config={{}}, wandb=True, enabled=False)
        rank1.log(1, {{"train/loss": 1.0}})
        rank1.finish()
        assert rank1.run_id is None and not (tmp / "rank1").exists()

        for name, kwargs in (("off", {{}}), ("disabled", {{"wandb": True, "mode": "disabled"}})):
            logger = MetricsLogger(tmp / name, config={{}}, **kwargs)
            logger.log(1, {{"train/loss": 1.0}})
            logger.finish()
            assert logger.run_id is None and (tmp / name / "training_curves.png").exists()
        assert "wandb" not in sys.modules
    """)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_train_py_logs_every_step_and_eval_to_an_offline_wandb_run(tiny_dataset, tmp_path, wandb_records):
    out = tmp_path / "out"
    result = run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--max-iters", "4",
                 "--eval-interval", "2", "--log-interval", "2", "--wandb", "--wandb-mode", "offline",
                 "--wandb-project", "test-project")
    assert result.returncode == 0, result.stderr
    [run_file] = wandb_records.run_files(out)
    rows = wandb_records.history(run_file)
    train_rows = {row["_step"]: row for row in rows if "train/loss" in row}
    val_rows = {row["_step"]: row for row in rows if "val/loss" in row}
    assert sorted(train_rows) == [2, 4] and sorted(val_rows) == [0, 2, 4]
    logged = {m["step"]: m for m in read_lines(out) if "train/loss" in m}
    for step, row in train_rows.items():
        assert row["train/loss"] == logged[step]["train/loss"]
        assert row["tokens_per_sec"] == logged[step]["tokens_per_sec"] > 0
        assert {"lr", "grad_norm", "step_time_ms"} <= set(row)
    assert wandb_records.config(run_file)["options"]["max_iters"] == 4


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA GeForce RTX 4090", None)])
def test_mfu_against_the_datasheet_peak(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    expected = None if peak is None else 1e9 * 2e5 / peak
    assert mfu(1e9, 2e5, torch.device("cuda", 0)) == expected
    assert mfu(1e9, 2e5, torch.device("cpu")) is None
