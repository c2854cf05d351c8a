"""The training run's metrics: a JSON-lines file always, Weights & Biases when asked for, a PNG of the training curves
at the end (tritongpt.plot).

out_dir/metrics.jsonl is the record that does not depend on anything: one line per log call, flushed at once, so
it survives a crash and needs no service or network. W&B mirrors it when --wandb is on. `wandb` is imported only
then (the GPU image does not ship it), and matplotlib only when the curves are drawn (it is slow to import).
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch

from tritongpt.errors import UserError
from tritongpt.files import atomic_file, disk_full
from tritongpt.plot import CONFIG_FILE, CURVES_FILE, METRICS_FILE, draw_run
# wandb.init waits 90 s by default. With an API key but no network it waits that long before failing; a shorter
# wait keeps the offline fallback quick, and a slow network that misses it loses nothing (the run syncs later).
WANDB_INIT_TIMEOUT_S = 30.0


class MetricsLogger:
    """Logs a training run's metrics. With enabled=False (DDP ranks other than 0) every method does nothing."""

    def __init__(self, out_dir, *, config: dict, wandb: bool = False, project: str = "tritongpt",
                 run_name: str | None = None, entity: str | None = None, mode: str = "online",
                 resume_run_id: str | None = None, resume_step: int | None = None, enabled: bool = True):
        """resume_step: the step the run resumes at; metrics.jsonl keeps its lines before it and is appended to
        (None: a fresh run, which replaces metrics.jsonl). resume_run_id: the W&B run to continue."""
        self.run_id: str | None = None  # the W&B run's id, for the checkpoint, so that --resume continues it
        self._file = None
        self._run = None
        self._sync_dir: str | None = None  # where an offline W&B run is saved, for the `wandb sync` hint
        if not enabled:
            return
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Round-tripped through JSON so that W&B receives exactly what config.json holds (dtypes etc. as strings).
        config = json.loads(json.dumps(config, default=str))
        _write_atomically(self.out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        self._file = self._open_metrics(resume_step)
        # W&B's "disabled" mode only makes a run that does nothing, so it is treated as W&B off.
        if wandb and mode != "disabled":
            self._run = self._start_wandb(config, project, run_name, entity, mode, resume_run_id)
            self.run_id = self._run.id

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        """Appends {"step", **metrics, "time"} to metrics.jsonl; None (an unknown value) is written as null and
        left out of W&B. Values may be Python, NumPy or 0-d tensor numbers."""
        if self._file is None:
            return
        values = {key: None if value is None else float(value) for key, value in metrics.items()}
        self._file.write(json.dumps({"step": step, **values, "time": time.time()}) + "\n")
        self._file.flush()
        if self._run is not None:
            self._run.log({key: value for key, value in values.items() if value is not None}, step=step)

    def finish(self) -> None:
        """Closes metrics.jsonl, draws training_curves.png from it (when it holds anything) and finishes the W&B
        run. Safe to call twice."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        try:
            if (self.out_dir / METRICS_FILE).stat().st_size:  # a run that logged nothing has no curves
                draw_run(self.out_dir)
        except OSError as e:  # a full disk is reported by what failed to write first, not by the plot
            if not disk_full(e):
                raise
            print(f"{CURVES_FILE} not drawn: the disk is full")
        finally:
            if self._run is not None:
                import wandb

                self._run.finish()
                # finish() returns before wandb's service process has written all of the run file; teardown()
                # waits for it, and ends that process.
                wandb.teardown()
                self._run = None
                if self._sync_dir is not None:
                    print(f"W&B run saved offline; upload it with `wandb sync {self._sync_dir}`")

    def _open_metrics(self, resume_step: int | None):
        path = self.out_dir / METRICS_FILE
        if resume_step is None:
            return open(path, "w")
        if path.exists():
            # Lines from the resume step on were logged after the checkpoint the run resumes from: they will be
            # logged again.
            kept = [line + "\n" for line in path.read_text().splitlines() if _logged_before(line, resume_step)]
            _write_atomically(path, "".join(kept))
        return open(path, "a")

    def _start_wandb(self, config: dict, project: str, run_name: str | None, entity: str | None, mode: str,
                     resume_run_id: str | None):
        try:
            import wandb
        except ImportError:
            raise UserError("--wandb needs the wandb package: pip install wandb") from None
        init = functools.partial(
            wandb.init, dir=str(self.out_dir), project=project, entity=entity, name=run_name, config=config,
            id=resume_run_id, resume="allow" if resume_run_id else None,
            # quiet: wandb's start-up and sync lines, the run URL and warnings, without its end-of-run summary.
            settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, quiet=True))
        run = None
        offline_reason = None
        if mode == "online":
            # Online without a key, wandb.init would prompt for one on a terminal (and fail without one). This
            # looks for one (WANDB_API_KEY, wandb's settings, netrc) and never prompts; only when it finds one
            # does it ask the server whose it is, to print "logged in as" (a 5 s timeout).
            if not wandb.login(prompt=False, verify=False):
                offline_reason = "no W&B API key found (set WANDB_API_KEY or run `wandb login`)"
            else:
                try:
                    run = init(mode="online")
                except (wandb.Error, TimeoutError) as e:
                    offline_reason = f"W&B could not be reached ({str(e).splitlines()[0]})"
                    # wandb's service process still holds the failed run's id; a resumed run reuses that id.
                    wandb.teardown()
        if run is None:
            run = init(mode="offline")
            self._sync_dir = run.settings.sync_dir
        if offline_reason:
            print(f"{offline_reason}: logging offline; upload later with `wandb sync {self._sync_dir}`")
        return run


# Dense bf16 tensor-core peaks from the vendors' datasheets, matched against the device name in this order.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)


def peak_bf16_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def mfu(flops_per_token: float, tokens_per_sec: float, device: torch.device) -> float | None:
    """Model FLOPs utilisation: the model's FLOPs per second against the device's dense bf16 peak; None when the
    peak is not known (a CPU, or a GPU the table does not list)."""
    peak = peak_bf16_flops(device)
    return None if peak is None else flops_per_token * tokens_per_sec / peak


def _logged_before(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line was logged before `step`. One that does not parse is a crashed run's torn
    last line, and is dropped."""
    try:
        return json.loads(line)["step"] < step
    except (ValueError, KeyError, TypeError):
        return False


def _write_atomically(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text.encode())

