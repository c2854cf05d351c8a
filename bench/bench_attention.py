"""Causal attention, bf16: the Triton flash attention against PyTorch's SDPA backends (flash, cuDNN, memory-efficient)
and the eager reference, forward, backward and forward+backward, at the GPT-2 124M training shape and at long context.

    python -m bench.bench_attention          (from the repository root; needs a CUDA GPU)
    python -m bench.bench_attention --quick  (GPT-2's shape, against SDPA's flash and cuDNN backends alone)

FLOPs: forward 4·B·H·T²·D, halved for causal; backward 2.5× the forward. The forward is timed as in training (inputs
that require grad); the backward alone replays autograd on a retained graph. Eager attention is the reference
(kernels.attention.attention_reference, nanoGPT's non-flash path) in bf16: it stores T×T scores, so it is skipped (and
the reason recorded) where they would not fit in memory.
Writes bench/results/attention-<device>.json with the environment, the measured ceilings and the raw times.
"""
import contextlib
import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import (bench_args, environment, matmul_peak_tflops, median_ms, print_table, require_cuda,
                          results_name, rotating, write_results)
from tritongpt.kernels import attention_reference, flash_attention, sdpa_attention

DTYPE = torch.bfloat16
CAUSAL = True
SHAPES = [  # (batch, heads, seq_len, head_dim); the long-context ones keep 16K tokens and a model width of 2048
    (16, 12, 1024, 64),  # GPT-2 124M training
    (4, 32, 4096, 64),
    (4, 16, 4096, 128),
    (1, 32, 16384, 64),
    (1, 16, 16384, 128),
]
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION"}
QUICK_SHAPES, QUICK_PEERS = SHAPES[:1], ("triton", "sdpa_flash", "sdpa_cudnn")
EAGER_MEMORY_FRACTION = 0.7  # of the free memory that eager attention's T×T matrices may take


def peers() -> dict:
    """name -> (attention function, context it runs in); SDPA backends this build lacks are left out."""
    out = {"triton": (lambda q, k, v: flash_attention(q, k, v, causal=CAUSAL), contextlib.nullcontext)}
    for name, backend in SDPA_BACKENDS.items():
        if hasattr(SDPBackend, backend):
            out[name] = (lambda q, k, v: sdpa_attention(q, k, v, causal=CAUSAL),
                         lambda backend=getattr(SDPBackend, backend): sdpa_kernel(backend))
    out["eager"] = (lambda q, k, v: attention_reference(q, k, v, causal=CAUSAL), contextlib.nullcontext)
    return out


def forward_flops(batch, heads, seq_len, head_dim) -> float:
    return 4 * batch * heads * seq_len**2 * head_dim * (0.5 if CAUSAL else 1.0)


def eager_bytes(batch, heads, seq_len, n_sets) -> int:
    """Eager attention's T×T bf16 matrices: one (the probabilities) kept per retained graph, about three more alive
    while a forward or backward runs."""
    return (n_sets + 3) * batch * heads * seq_len**2 * torch.finfo(DTYPE).bits // 8


def time_peer(attend, context, shape) -> dict:
    """Median ms of forward, backward and forward+backward on rotated fresh inputs."""
    def make_inputs():
        q, k, v = (torch.randn(shape, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(3))
        return q, k, v, torch.randn(shape, device="cuda", dtype=DTYPE)

    def make_graph():
        q, k, v, do = make_inputs()
        return attend(q, k, v), (q, k, v), do

    with context():
        inputs = rotating(make_inputs, _set_bytes(shape))
        for _ in range(2):  # compile and autotune outside the timed region
            q, k, v, do = next(inputs)
            torch.autograd.grad(attend(q, k, v), (q, k, v), do)
        torch.cuda.synchronize()

        def forward():
            q, k, v, _ = next(inputs)
            attend(q, k, v)

        def forward_backward():
            q, k, v, do = next(inputs)
            torch.autograd.grad(attend(q, k, v), (q, k, v), do)

        fwd_ms = median_ms(forward)
        fwd_bwd_ms = median_ms(forward_backward)
        del inputs
        graphs = rotating(make_graph, _set_bytes(shape))

        def backward():
            out, leaves, do = next(graphs)
            torch.autograd.grad(out, leaves, do, retain_graph=True)

        bwd_ms = median_ms(backward)
    return {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwd_bwd_ms": fwd_bwd_ms}


def check_output(shape) -> float:
    """Max |triton - SDPA| of the forward on one fresh input (bf16 outputs of size ~1: expect ~1e-2 at most); a
    benchmark of a wrong kernel is worthless."""
    q, k, v = (torch.randn(shape, device="cuda", dtype=DTYPE) for _ in range(3))
    return (flash_attention(q, k, v, causal=CAUSAL).float() - sdpa_attention(q, k, v, causal=CAUSAL).float()
            ).abs().max().item()


def main(argv=None):
    args = bench_args(__doc__, "GPT-2's training shape against SDPA's flash and cuDNN backends only", argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    wanted = QUICK_PEERS if args.quick else tuple(peers())
    print(f"causal attention, {str(DTYPE).removeprefix('torch.')}, forward / backward / both: "
          f"{', '.join(wanted)} at (batch, heads, seq_len, head_dim) {', '.join(map(str, shapes))}", flush=True)
    if args.dry_run:
        return
    require_cuda()
    torch.manual_seed(0)
    env = environment()
    peak = matmul_peak_tflops()
    rows = []
    for shape in shapes:
        batch, heads, seq_len, head_dim = shape
        flops = forward_flops(*shape)
        label = f"{batch}x{heads}x{seq_len}x{head_dim}"
        max_err = check_output(shape)
        n_sets = _rotation_length(_set_bytes(shape))
        for name, (attend, context) in peers().items():
            if name not in wanted:
                continue
            row = {"shape": label, "batch": batch, "heads": heads, "seq_len": seq_len, "head_dim": head_dim,
                   "backend": name}
            free_bytes = torch.cuda.mem_get_info()[0]
            need = eager_bytes(batch, heads, seq_len, n_sets)
            if name == "eager" and need > EAGER_MEMORY_FRACTION * free_bytes:
                row["skipped"] = (f"needs ~{need / 2**30:.0f} GiB for T×T matrices; "
                                  f"{free_bytes / 2**30:.0f} GiB free")
            else:
                try:
                    row.update(time_peer(attend, context, shape))
                except RuntimeError as e:  # no kernel in this backend for this shape, or out of memory
                    row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            torch.cuda.empty_cache()
            if "fwd_ms" in row:
                row["fwd_tflops"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
                row["bwd_tflops"] = 2.5 * flops / (row["bwd_ms"] * 1e-3) / 1e12
                row["fwd_bwd_tflops"] = 3.5 * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
                row["fwd_bwd_pct_of_matmul_peak"] = 100 * row["fwd_bwd_tflops"] / peak
            if name == "triton":
                row["max_diff_vs_sdpa"] = max_err
            rows.append(row)
        flash = next((r for r in rows if r["shape"] == label and r["backend"] == "sdpa_flash" and "fwd_ms" in r),
                     None)
        for r in rows:
            if r["shape"] == label and flash and "fwd_ms" in r:
                r["fwd_bwd_vs_sdpa_flash"] = flash["fwd_bwd_ms"] / r["fwd_bwd_ms"]

    targets = _targets(rows)
    path = write_results(results_name("attention", args.quick), {
        "environment": env, "dtype": str(DTYPE), "causal": CAUSAL,
        "ceilings": {"matmul_bf16_tflops": peak},
        "flops": "forward 4*B*H*T^2*D (x0.5 causal); backward 2.5x forward; fwd+bwd 3.5x forward",
        "targets": targets, "results": rows,
    })
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}; bf16 matmul ceiling {peak:.0f} TFLOP/s; "
          f"results in {path}")
    for line in targets.values():
        print(line)
    for r in rows:
        if "skipped" in r:
            print(f"skipped {r['backend']} at {r['shape']}: {r['skipped']}")
    columns = {"shape": "shape", "backend": "backend", "fwd_ms": "fwd ms", "bwd_ms": "bwd ms", "fwd_bwd_ms": "f+b ms",
               "fwd_tflops": "fwd TF/s", "bwd_tflops": "bwd TF/s", "fwd_bwd_tflops": "f+b TF/s",
               "fwd_bwd_pct_of_matmul_peak": "f+b % peak", "fwd_bwd_vs_sdpa_flash": "f+b vs flash",
               "max_diff_vs_sdpa": "max diff"}
    print_table([{label: r.get(key) for key, label in columns.items()} for r in rows], list(columns.values()))


def _set_bytes(shape) -> int:
    """One input set: q, k, v and the upstream gradient."""
    return 4 * math.prod(shape) * torch.finfo(DTYPE).bits // 8


def _rotation_length(set_bytes: int) -> int:
    """How many input sets bench.common.rotating makes of this size (counted on placeholders, once round)."""
    cycle = rotating(object, set_bytes)
    first, n = next(cycle), 1
    while next(cycle) is not first:
        n += 1
    return n


def _targets(rows) -> dict:
    """The project's H100 targets, as measured here (met or not)."""
    out = {}
    gpt2 = next((r for r in rows if r["backend"] == "triton" and r["seq_len"] == 1024), {})
    if "fwd_bwd_vs_sdpa_flash" in gpt2:
        ratio = gpt2["fwd_bwd_vs_sdpa_flash"]
        verdict = "met" if ratio >= 1.0 else "missed"
        out["gpt2_fwd_bwd_vs_flash"] = f"target fwd+bwd at {gpt2['shape']} >= 1.0x SDPA flash: {ratio:.2f}x ({verdict})"
    for r in rows:
        if r["backend"] == "triton" and r["head_dim"] == 128 and r["seq_len"] >= 4096 and "fwd_tflops" in r:
            verdict = "met" if r["fwd_tflops"] >= 400 else "missed"
            out[f"fwd_d128_{r['seq_len']}"] = (f"target causal fwd at {r['shape']} >= 400 TFLOP/s: "
                                               f"{r['fwd_tflops']:.0f} ({verdict})")
    return out


if __name__ == "__main__":
    main()
