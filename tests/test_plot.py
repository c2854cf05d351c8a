"""The training-curves figure: written at the end of a run with its four panels, and redrawn from run directories
by `python -m tritongpt.plot`, one run or several overlaid."""
import struct

import pytest

from tritongpt import plot
from tritongpt.errors import UserError
from tritongpt.metrics import MetricsLogger

CONFIG = {"options": {"data_dir": "data/default"}, "num_params": 1_320_000,
          "model": {"n_layer": 4, "n_embd": 128, "block_size": 128, "attention": "torch", "layernorm": "torch",
                    "mlp": "torch"}}


def log_run(out_dir, steps: int = 60, speed: float = 1.0) -> list[dict]:
    """A run's metrics through the logger, as train.py logs them; returns what was logged."""
    logger = MetricsLogger(out_dir, config=CONFIG)
    logged = []
    for step in range(0, steps + 1, 5):
        values = {"train/loss": 8.0 / (1 + step / 10), "lr": 1e-3 * min(1, step / 10), "grad_norm": 2.0 / (1 + step),
                  "tokens_per_sec": speed * (7000 + 10 * step)}
        if step % 20 == 0:
            values["val/loss"] = 8.2 / (1 + step / 10)
        logger.log(step, values)
        logged.append({"step": step, **values})
    logger.finish()
    return logged


def png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


def quadrants_with_curves(path) -> int:
    """How many of the figure's four quadrants hold pixels of the first run's colour (matplotlib's C0 blue)."""
    from matplotlib.image import imread
    pixels = imread(path)[..., :3]
    blue = (pixels[..., 2] > 0.55) & (pixels[..., 2] - pixels[..., 0] > 0.3)
    h, w = blue.shape
    return sum(bool(blue[rows, cols].any()) for rows in (slice(0, h // 2), slice(h // 2, h))
               for cols in (slice(0, w // 2), slice(w // 2, w)))


def test_a_run_ends_with_the_four_panel_figure(tmp_path):
    log_run(tmp_path)
    png = tmp_path / plot.CURVES_FILE
    width, height = png_size(png)
    assert width >= 1000 and height >= 700  # room for four panels, not one small plot
    assert quadrants_with_curves(png) == 4  # loss, learning rate, tokens/s and grad norm each drawn


def test_read_run_gives_back_what_was_logged(tmp_path):
    logged = log_run(tmp_path)
    run = plot.read_run(tmp_path)
    assert run.config == CONFIG
    for key in ("train/loss", "lr", "grad_norm", "tokens_per_sec", "val/loss"):
        expected = [(row["step"], row[key]) for row in logged if key in row]
        assert list(zip(*run.series(key))) == expected
    assert "4-layer GPT" in plot.describe(run.config) and "data/default" in plot.describe(run.config)


def test_cli_overlays_several_runs(tmp_path, capsys):
    log_run(tmp_path / "triton", speed=3.0)
    log_run(tmp_path / "torch")
    output = tmp_path / "compare.png"
    plot.main([str(tmp_path / "triton"), str(tmp_path / "torch"), "--output", str(output)])
    assert f"wrote {output}" in capsys.readouterr().out
    assert png_size(output) == png_size(tmp_path / "torch" / plot.CURVES_FILE)
    (tmp_path / "torch" / plot.CURVES_FILE).unlink()
    plot.main([str(tmp_path / "torch")])  # one run: its own training_curves.png, redrawn
    assert png_size(tmp_path / "torch" / plot.CURVES_FILE) == png_size(output)


def test_cli_refuses_a_directory_without_metrics(tmp_path):
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot.main([str(tmp_path)])
    with pytest.raises(UserError, match="no run given"):
        plot.main([])
