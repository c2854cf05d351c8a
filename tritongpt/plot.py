"""Training curves from runs' metrics.jsonl: the loss (train and val), the learning rate, tokens/s and the gradient
norm, as four panels of one figure. train.py draws OUT_DIR/training_curves.png at the end of a run; this redraws it,
or overlays several runs to compare them (Triton ops against torch ops, say) without W&B.

    python -m tritongpt.plot out
    python -m tritongpt.plot out-triton out-torch --output compare.png
"""
from __future__ import annotations

import importlib.util
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

from tritongpt.errors import UserError
from tritongpt.files import atomic_file
from tritongpt.options import option, parse_options, run_main

# A run's files that tritongpt.metrics writes and this reads.
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CURVES_FILE = "training_curves.png"
# (metrics.jsonl key, panel title, log scale): the panels, left to right and top to bottom.
PANELS = (
    ("train/loss", "loss (cross-entropy, nats per token)", True),
    ("lr", "learning rate", False),
    ("tokens_per_sec", "tokens per second", False),
    ("grad_norm", "gradient norm (before clipping)", True),
)


@dataclass
class Run:
    name: str  # how the figure labels it: its directory
    config: dict  # config.json: {"options", "model", ...}, empty when missing
    rows: list[dict]  # metrics.jsonl's lines

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, over the lines that logged it."""
        points = [(row["step"], row[key]) for row in self.rows if row.get(key) is not None]
        return tuple(map(list, zip(*points))) if points else ([], [])


def read_run(out_dir: str | Path) -> Run:
    """A run's metrics.jsonl and config.json. A torn last line (a crashed run's) is skipped; any other line that is
    not a metrics record is refused, as is a config.json that is not JSON."""
    out_dir = Path(out_dir)
    metrics = out_dir / METRICS_FILE
    if not metrics.is_file():
        raise UserError(f"no {METRICS_FILE} in {out_dir}; pass a directory that train.py wrote (its --out-dir)")
    lines = metrics.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        row = _metrics_record(line)
        if row is not None:
            rows.append(row)
        elif number < len(lines) or not rows:
            raise UserError(f"{metrics} is not a metrics file written by train.py (line {number} is no JSON record "
                            "with a step); pass a run directory that train.py wrote")
    config_file = out_dir / CONFIG_FILE
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{config_file} is not JSON; pass a run directory that train.py wrote") from None
    return Run(out_dir.name or str(out_dir), config, rows)


def _metrics_record(line: str) -> dict | None:
    """A metrics.jsonl line as its {"step": ..., metric: value, ...}; None for anything else."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


# How the figure names each --optimizer.
OPTIMIZER_NAMES = {"adamw": "AdamW", "muon": "Muon + AdamW"}


def describe(config: dict) -> str:
    """The model, optimizer and data of a run in a few words, from its config.json."""
    model, options = config.get("model", {}), config.get("options", {})
    if not model:
        return "(no config.json)"
    params = f", {config['num_params'] / 1e6:.2f}M parameters" if "num_params" in config else ""
    ops = "/".join(sorted({model.get(op, "?") for op in ("attention", "layernorm", "mlp")}))
    optimizer = options.get("optimizer", "adamw")  # runs from before the option trained with AdamW
    return (f"{model['n_layer']}-layer GPT, width {model['n_embd']}, context {model['block_size']}{params}, "
            f"{ops} ops, {OPTIMIZER_NAMES.get(optimizer, optimizer)}, on {options.get('data_dir', '?')}")


def draw(runs: list[Run], png_path: str | Path) -> None:
    """Draws the runs' curves into one PNG (written atomically), a colour per run."""
    with atomic_file(png_path) as f:
        figure(runs).savefig(f, format="png", dpi=100)


def figure(runs: list[Run]):
    """The runs' curves as a matplotlib Figure of four panels, a colour per run."""
    # A bare Figure renders with Agg without pyplot: no GUI backend and no global figure state.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for ax, (key, title, log_scale) in zip(axes, PANELS):
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            prefix = f"{run.name}: " if len(runs) > 1 else ""
            ax.plot(*run.series(key), color=color, linewidth=1.2, alpha=0.85,
                    label=prefix + ("AdamW" if key == "lr" else "train"))
            if key == "train/loss" and (val := run.series("val/loss"))[0]:
                # The last value goes in the legend: written beside the curves, the runs' labels would overprint
                # each other's markers wherever their losses end close together.
                ax.plot(*val, color=color, linestyle="--", marker="o", markersize=5,
                        label=f"{prefix}val, last {val[1][-1]:.2f}")
            if key == "lr" and (muon := run.series("muon_lr"))[0]:  # Muon's own rate, on the same schedule
                ax.plot(*muon, color=color, linestyle=":", linewidth=1.5, label=prefix + "Muon")
        ax.set_title(title, fontsize=11)
        ax.grid(True, which="major", alpha=0.35)
        if log_scale:
            ax.set_yscale("log")
            # A label at every integer multiple of a power of ten (4, 5, 6, ...), where matplotlib labels only the
            # powers themselves: a loss falling from 8 to 4 would get no label at all. Over more than a decade that
            # many labels run into each other: 1, 2 and 5 times each power then.
            low, high = ax.get_ylim()
            ax.yaxis.set_major_locator(LogLocator(subs=range(1, 10) if high <= 10 * low else (1, 2, 5)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 5))
        if key == "train/loss" or len(ax.lines) > len(runs):  # the rate panel, when it holds Muon's rate too
            ax.legend(fontsize=9)
    for ax in (axes[2], axes[3]):
        ax.set_xlabel("step")
    fig.suptitle(_title(runs), fontsize=12)
    return fig


# Characters in a line of the title: with some room to spare, what fits across the figure at its font size.
TITLE_WIDTH = 110


def _title(runs: list[Run]) -> str:
    """What the runs are: one line for all when they share a model and data, else a line per run; each wrapped to
    the figure's width (a long path breaks mid-word) rather than cut off at its edges."""
    described = {describe(run.config) for run in runs}
    if len(runs) == 1:
        lines = [f"{runs[0].name}: {described.pop()}"]
    elif len(described) == 1:
        lines = [f"{len(runs)} runs: {described.pop()}"]
    else:
        lines = [f"{run.name}: {describe(run.config)}" for run in runs]
    return "\n".join(textwrap.fill(line, TITLE_WIDTH, break_on_hyphens=False) for line in lines)


def draw_run(out_dir: str | Path) -> Path | None:
    """Draws OUT_DIR/training_curves.png from the run's files; None when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        print(f"{CURVES_FILE} not written: matplotlib is not installed")
        return None
    png_path = Path(out_dir) / CURVES_FILE
    draw([read_run(out_dir)], png_path)
    return png_path


@dataclass(frozen=True)
class PlotOptions:
    runs: tuple[str, ...] = option((), "run directories written by train.py (their --out-dir)", positional=True,
                                   metavar="OUT_DIR")
    output: str | None = option(None, "the PNG to write (its folder is made if missing); none means "
                                "OUT_DIR/training_curves.png for one run, training_curves.png here for several",
                                metavar="FILE")


def main(argv: list[str] | None = None) -> None:
    opts, _ = parse_options(PlotOptions, __doc__.split("\n\n")[0], argv, with_config_file=False)
    if not opts.runs:
        raise UserError("no run given; pass one or more run directories, e.g. `python -m tritongpt.plot out`")
    runs = [read_run(out_dir) for out_dir in opts.runs]
    if empty := [out_dir for out_dir, run in zip(opts.runs, runs) if not run.rows]:
        raise UserError(f"{Path(empty[0]) / METRICS_FILE} holds no metrics yet; pass a run that has logged a step")
    output = Path(opts.output or (Path(opts.runs[0]) / CURVES_FILE if len(runs) == 1 else CURVES_FILE))
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("drawing needs matplotlib: pip install matplotlib")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)  # as train.py makes its --out-dir
        draw(runs, output)
    except OSError as e:
        reason = f"{e.filename} is a file, not a folder" if isinstance(e, FileExistsError) else e.strerror or e
        raise UserError(f"cannot write {output} ({reason}); pass an --output you can write to") from None
    print(f"wrote {output}")


if __name__ == "__main__":
    run_main(main)
