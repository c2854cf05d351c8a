"""The training-curves figure: written at the end of a run with its four panels, and redrawn from run directories
by `python -m tritongpt.plot`, one run or several overlaid."""
import errno
import io
import json
import os
import struct
from contextlib import redirect_stderr

import pytest

from tritongpt import plot
from tritongpt.errors import UserError
from tritongpt.metrics import MetricsLogger
from tritongpt.options import run_main

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


def refused(*args: str) -> str:
    """The one line `python -m tritongpt.plot ARGS` fails with (exit status 2)."""
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as exit:
        run_main(lambda: plot.main(list(args)))
    assert exit.value.code == 2
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_comparison_figure_keeps_its_title_and_labels_clear(tmp_path):
    # Runs of different data (a long path among them: the title cannot fit on one line) whose val losses end
    # close together, where labels by the markers would collide.
    for name, data_dir, speed in (("triton", "/datasets/" + "a-long-corpus-name-" * 6, 3.0), ("torch", "d", 1.0)):
        log_run(tmp_path / name, speed=speed)
        config = {**CONFIG, "options": {"data_dir": data_dir}}
        (tmp_path / name / plot.CONFIG_FILE).write_text(json.dumps(config))
    runs = [plot.read_run(tmp_path / name) for name in ("triton", "torch")]
    fig = plot.figure(runs)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)  # lays the figure out as saving it does

    title = fig.texts[0]
    assert "triton: " in title.get_text() and "torch: " in title.get_text()
    box = title.get_window_extent(renderer)
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1

    loss = fig.axes[0]
    texts = [t for t in [*loss.texts, *loss.get_legend().get_texts()] if t.get_text()]
    boxes = [t.get_window_extent(renderer) for t in texts]
    radius = max(line.get_markersize() for line in loss.lines) / 2 * fig.dpi / 72
    markers = [loss.transData.transform(xy) for line in loss.lines if line.get_marker() == "o"
               for xy in line.get_xydata()]
    for i, box in enumerate(boxes):
        assert not any(box.overlaps(other) for other in boxes[i + 1:]), "two labels overprint each other"
        assert not any(box.x0 - radius < x < box.x1 + radius and box.y0 - radius < y < box.y1 + radius
                       for x, y in markers), f"{texts[i].get_text()!r} overprints a marker"
    last_val = f"{runs[0].series('val/loss')[1][-1]:.2f}"
    assert sum(last_val in t.get_text() for t in texts) == 2  # each run's last val loss is still shown


def test_cli_writes_into_a_new_folder_and_refuses_what_it_cannot_write(tmp_path, monkeypatch, capsys):
    log_run(tmp_path / "run")
    output = tmp_path / "figures" / "2024" / "compare.png"
    plot.main([str(tmp_path / "run"), "--output", str(output)])
    assert f"wrote {output}" in capsys.readouterr().out
    assert png_size(output) == png_size(tmp_path / "run" / plot.CURVES_FILE)

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert "notes.txt is a file, not a folder" in refused(str(tmp_path / "run"), "--output", str(a_file / "c.png"))
    assert a_file.read_text() == "mine"

    before = output.read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", disk_full)
    line = refused(str(tmp_path / "run"), "--output", str(output))
    assert f"cannot write {output} ({os.strerror(errno.ENOSPC)})" in line
    assert output.read_bytes() == before and sorted(p.name for p in output.parent.iterdir()) == ["compare.png"]


@pytest.mark.parametrize("text, line", [
    ("\x00\x9f garbage", 1),
    ('[1, 2]\n', 1),  # JSON, but no record
    ('{"step": 0, "train/loss": 8.0}\nnot json\n{"step": 5, "train/loss": 7.0}\n', 2),
    ('{"step": "zero"}\n', 1),
])
def test_cli_refuses_metrics_that_are_not_records(tmp_path, text, line):
    run = tmp_path / "run"
    run.mkdir()
    (run / plot.METRICS_FILE).write_text(text)
    assert f"is not a metrics file written by train.py (line {line} " in refused(str(run))
    assert sorted(p.name for p in run.iterdir()) == [plot.METRICS_FILE]  # no figure drawn
    (run / plot.METRICS_FILE).write_text("")
    assert "holds no metrics yet" in refused(str(run))
    assert sorted(p.name for p in run.iterdir()) == [plot.METRICS_FILE]


def test_a_torn_last_line_is_skipped(tmp_path):
    logged = log_run(tmp_path)
    with open(tmp_path / plot.METRICS_FILE, "a") as f:
        f.write('{"step": 65, "train/lo')  # a crash in the middle of a write
    assert [row["step"] for row in plot.read_run(tmp_path).rows] == [row["step"] for row in logged]
