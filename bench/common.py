"""What every benchmark shares: the environment it ran in, timing by device events (median of many runs after
warm-up), inputs rotated so the L2 cache does not flatter, the device's measured ceilings, and the JSON + table out.

Run a benchmark from the repository root: `python -m bench.bench_attention` (each writes bench/results/*.json).
Each kernel benchmark also takes --quick (its headline shape against its main peers: the short GPU session of
`bash bench/gpu_run.sh quick`) and --dry-run (say what it would measure and exit, on any machine).
"""
import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
L2_FLUSH_BYTES = 256 * 1024 * 1024  # rotate through at least this much input: several times an H100's 50 MB L2


def bench_args(doc: str, quick: str, argv=None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The options every kernel benchmark shares: --quick (described by `quick`) and --dry-run. A benchmark with
    options of its own passes its parser."""
    p = parser or argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be measured and exit without touching a GPU (checks the arguments)")
    return p.parse_args(argv)


def results_name(name: str, quick: bool) -> str:
    """A quick run's results sit beside the full run's instead of replacing them."""
    return f"{name}-quick" if quick else name


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        sys.exit("error: this benchmark needs a CUDA GPU; run it on a machine with one (the tests cover CPU)")
    return torch.device("cuda")


def environment() -> dict:
    """The versions, and the GPU's name and shape when there is one ("cpu" marks a smoke run on a CPU)."""
    import triton
    env = {
        "device": "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env


def rotating(make_inputs, bytes_per_set: int):
    """Enough independent input sets (from make_inputs()) to exceed the L2 flush size, served round-robin."""
    n = max(2, -(-L2_FLUSH_BYTES // max(bytes_per_set, 1)))
    n = min(n, 16)
    return itertools.cycle([make_inputs() for _ in range(n)])


def median_ms(fn, warmup_ms: int = 100, rep_ms: int = 500) -> float:
    """Median time of fn() in milliseconds, timed with CUDA events after warm-up (triton.testing.do_bench)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def copy_bandwidth_gbps() -> float:
    """Measured device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.randn(512 * 2**20 // 4, device="cuda")  # 512 MiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def matmul_peak_tflops(n: int = 8192, dtype=torch.bfloat16) -> float:
    """Measured dense matmul rate through cuBLAS on random data: the practical compute ceiling."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = median_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def write_results(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    slug = payload.get("environment", {}).get("device", "unknown").replace(" ", "-")
    path = RESULTS_DIR / f"{name}-{slug}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def print_targets(targets: list[dict], where) -> None:
    """How many targets ({"target", "value", "met", ...}) were met, and each one missed, placed by where(target)."""
    missed = [t for t in targets if not t["met"]]
    print(f"targets met: {len(targets) - len(missed)}/{len(targets)}"
          + "".join(f"\n  missed: {where(t)}: {t['target']} (got {t['value']:.2f})" for t in missed))


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
