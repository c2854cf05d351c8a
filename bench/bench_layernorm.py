"""LayerNorm and add+LayerNorm on the GPU: GB/s of forward, backward and forward+backward for the Triton kernels,
the eager PyTorch reference, torch.compile of the reference and Liger-Kernel's LayerNorm (when installed), against the
measured device-to-device copy bandwidth.

    python -m bench.bench_layernorm          # writes bench/results/layernorm-<device>.json
    python -m bench.bench_layernorm --quick  # LayerNorm at GPT-2's width alone: layernorm-quick-<device>.json

bf16, 16384 rows (batch x seq_len of GPT-2 training), widths 768 ... 8192, eps 1e-5, every input requiring grad
(the training forward, which saves mean and rstd). Bytes are the op's own tensors, each input read once and each
output written once; mean and rstd, which each implementation keeps in its own way, are not counted:
    layer_norm      forward: x, weight, bias -> y              backward: dy, x, weight -> dx, dweight, dbias
    add_layer_norm  forward: x, residual, weight, bias -> normed, summed
                    backward: d_normed, d_summed, summed, weight -> dx (= d_residual, one tensor), dweight, dbias
Forward+backward counts both. Inputs rotate through sets larger than the L2 cache; times are medians of CUDA events.
"""
import importlib.metadata

import torch

from bench.common import (bench_args, copy_bandwidth_gbps, environment, median_ms, print_table, print_targets,
                          require_cuda, results_name, rotating, write_results)
from tritongpt.kernels.layernorm import add_layer_norm, add_layer_norm_reference, layer_norm, layer_norm_reference

ROWS = 16384
WIDTHS = (768, 1024, 1600, 4096, 8192)
OPS = ("layer_norm", "add_layer_norm")
QUICK_OPS, QUICK_WIDTHS = OPS[:1], WIDTHS[:1]
DTYPE = torch.bfloat16
EPS = 1e-5
PASSES = ("fwd", "bwd", "fwd+bwd")
# Targets on an H100 (a benchmark's, not a test's): forward at least this share of the copy bandwidth at width
# >= 1024; forward+backward at least these speed-ups.
FWD_COPY_SHARE, VS_EAGER, VS_COMPILE = 0.85, 1.3, 1.0


def _liger():
    """Liger-Kernel's LayerNorm as f(x, weight, bias), or None and why not, imported only when asked for."""
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        version = importlib.metadata.version("liger-kernel")
    except Exception as e:  # absent, or present but broken against this torch/triton: record it and go on
        return None, f"not installed ({type(e).__name__}: {e})"
    return (lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS)), version


def _compiled(fn):
    """torch.compile of fn with shapes specialised (no dynamic-shape kernels); compiled on first call. Its
    backward must run with retain_graph=True to be timed apart from the forward, which a backward that donates
    its saved buffers refuses; donation only saves memory, so it is switched off."""
    torch._functorch.config.donated_buffer = False
    return torch.compile(fn, dynamic=False)


def _implementations(op: str, liger):
    if op == "layer_norm":
        impls = {"triton": lambda x, w, b: layer_norm(x, w, b, EPS),
                 "eager": lambda x, w, b: layer_norm_reference(x, w, b, EPS),
                 "compile": _compiled(lambda x, w, b: layer_norm_reference(x, w, b, EPS))}
        if liger is not None:
            impls["liger"] = liger
        return impls
    return {"triton": lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS),
            "eager": lambda x, r, w, b: add_layer_norm_reference(x, r, w, b, EPS),
            "compile": _compiled(lambda x, r, w, b: add_layer_norm_reference(x, r, w, b, EPS))}


def _make_inputs(op: str, width: int):
    """Fresh random leaves (requiring grad) and upstream gradients for one call."""
    def make():
        def act():
            return torch.randn(ROWS, width, device="cuda", dtype=DTYPE)
        weight = (1 + 0.1 * torch.randn(width, device="cuda")).to(DTYPE)
        bias = (0.1 * torch.randn(width, device="cuda")).to(DTYPE)
        leaves = [act(), weight, bias] if op == "layer_norm" else [act(), act(), weight, bias]
        upstream = [act()] if op == "layer_norm" else [act(), act()]
        return [t.requires_grad_() for t in leaves], upstream
    return make


def _bytes(op: str, width: int) -> dict:
    act, vec = ROWS * width * DTYPE.itemsize, width * DTYPE.itemsize
    if op == "layer_norm":
        fwd, bwd = 2 * act + 2 * vec, 3 * act + 3 * vec
    else:
        fwd, bwd = 4 * act + 2 * vec, 4 * act + 3 * vec
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _as_tuple(outs):
    return outs if isinstance(outs, tuple) else (outs,)


def _time_impl(fn, sets, set_bytes: int) -> dict:
    """Median ms of each pass of fn over the rotating input sets (a cycle of (leaves, upstream))."""
    def fwd():
        leaves, _ = next(sets)
        fn(*leaves)

    def fwd_bwd():
        leaves, upstream = next(sets)
        torch.autograd.grad(_as_tuple(fn(*leaves)), leaves, upstream)

    def with_graph(leaves, upstream):
        return leaves, _as_tuple(fn(*leaves)), upstream

    # Warm up first: compilation (Triton's, Inductor's) stays out of the timings and out of do_bench's estimate.
    for _ in range(2):
        fwd_bwd()
    graphs = rotating(lambda: with_graph(*next(sets)), set_bytes)  # one forward graph per input set

    def bwd():
        leaves, outs, upstream = next(graphs)
        torch.autograd.grad(outs, leaves, upstream, retain_graph=True)

    passes = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
    return {name: median_ms(f, warmup_ms=50, rep_ms=300) for name, f in passes.items()}


def main(argv=None):
    args = bench_args(__doc__, "LayerNorm at GPT-2's width (768) only", argv)
    ops, widths = (QUICK_OPS, QUICK_WIDTHS) if args.quick else (OPS, WIDTHS)
    print(f"{', '.join(ops)}, {str(DTYPE).removeprefix('torch.')}, {ROWS} rows, widths {', '.join(map(str, widths))}: "
          "triton, eager, compile and liger (if installed), fwd / bwd / fwd+bwd GB/s against the copy bandwidth",
          flush=True)
    if args.dry_run:
        return
    require_cuda()
    torch.manual_seed(0)
    env = environment()
    liger, liger_status = _liger()
    copy_gbps = copy_bandwidth_gbps()
    results, table = [], []
    for op in ops:
        for width in widths:
            torch._dynamo.reset()  # each width compiles afresh: no recompile limit, no dynamic-shape fallback
            nbytes = _bytes(op, width)
            sets = rotating(_make_inputs(op, width), nbytes["fwd+bwd"])
            gbps = {}
            for impl, fn in _implementations(op, liger).items():
                try:
                    times = _time_impl(fn, sets, nbytes["fwd+bwd"])
                except Exception as e:  # Liger is carried as a wheel and may not run against this torch/triton
                    if impl != "liger":
                        raise
                    liger, liger_status = None, f"failed at width {width} ({type(e).__name__}: {e})"
                    continue
                for p in PASSES:
                    gbps[impl, p] = nbytes[p] / (times[p] * 1e-3) / 1e9
                    results.append({"op": op, "width": width, "impl": impl, "pass": p, "ms": times[p],
                                    "bytes": nbytes[p], "gbps": gbps[impl, p]})
            del sets
            torch.cuda.empty_cache()
            for p in PASSES:
                row = {"op": op, "width": width, "pass": p, "triton GB/s": gbps["triton", p],
                       "% copy": 100 * gbps["triton", p] / copy_gbps}
                for impl in ("eager", "compile", "liger"):
                    row[f"{impl} GB/s"] = gbps.get((impl, p))
                    row[f"x {impl}"] = gbps["triton", p] / gbps[impl, p] if (impl, p) in gbps else None
                table.append(row)

    targets = []
    for row in table:
        if row["op"] == "layer_norm" and row["pass"] == "fwd" and row["width"] >= 1024:
            targets.append({"width": row["width"], "target": f"fwd >= {FWD_COPY_SHARE:.0%} of copy",
                            "value": row["% copy"] / 100, "met": row["% copy"] / 100 >= FWD_COPY_SHARE})
        if row["op"] == "layer_norm" and row["pass"] == "fwd+bwd":
            for impl, need in (("eager", VS_EAGER), ("compile", VS_COMPILE)):
                targets.append({"width": row["width"], "target": f"fwd+bwd >= {need}x {impl}",
                                "value": row[f"x {impl}"], "met": row[f"x {impl}"] >= need})

    path = write_results(results_name("layernorm", args.quick), {
        "environment": env, "liger_kernel": liger_status, "copy_gbps": copy_gbps,
        "rows": ROWS, "widths": list(widths), "dtype": str(DTYPE), "eps": EPS,
        "bytes_model": "each input read once, each output written once; mean/rstd not counted (see module doc)",
        "mode": "training: every input requires grad; bwd timed with retain_graph=True on rotating forward graphs",
        "torch_compile": "torch.compile(reference, dynamic=False), donated_buffer off, recompiled per width",
        "results": results, "targets": targets,
    })
    print(f"{env['device']}: copy {copy_gbps:.0f} GB/s; torch {env['torch']}, triton {env['triton']}; "
          f"liger-kernel: {liger_status}; results in {path}")
    print_targets(targets, lambda t: f"width {t['width']}")
    print_table(table, ["op", "width", "pass", "triton GB/s", "% copy", "eager GB/s", "compile GB/s",
                        "liger GB/s", "x eager", "x compile", "x liger"])


if __name__ == "__main__":
    main()
