"""The LM head's loss on the GPU: forward+backward time and peak extra memory of the fused Triton linear +
cross-entropy, against eager PyTorch (F.linear then F.cross_entropy, which materialise the N x V logits), torch.compile
of the same, and Liger-Kernel's fused linear cross-entropy (when installed; it materialises chunks of the logits).

    python -m bench.bench_linear_cross_entropy     # writes bench/results/linear_cross_entropy-<device>.json

bf16, GPT-2's head: D = 768, V = 50,257, N = 16,384 and 8,192 tokens (micro-batches of 16 and 8 x 1024), a tenth of
the targets ignored (-1). Each call is the training step's: the loss, then the gradients of x and weight.
Time: median of CUDA events over inputs rotated past the L2 cache. Memory: the peak allocated during one
forward+backward above what was allocated before it (the inputs), less the two gradients every implementation
must return (x's and weight's): what the loss itself needs on top. Rate: the fused op's 4 N V D multiply-adds (eager's
matmuls do 3) as TFLOP/s, beside the measured cuBLAS matmul ceiling.
"""
import gc
import importlib.metadata

import torch

from bench.common import (environment, matmul_peak_tflops, median_ms, print_table, require_cuda, rotating,
                          write_results)
from tritongpt.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

TOKENS = (16384, 8192)
WIDTH, VOCAB = 768, 50257
DTYPE = torch.bfloat16
IGNORED_FRACTION = 0.1
# Targets on an H100 (a benchmark's, not a test's): extra memory at most this share of eager's, and time at most
# eager's and Liger's.
MEMORY_VS_EAGER, TIME_VS_EAGER, TIME_VS_LIGER = 0.1, 1.0, 1.0


def plan() -> str:
    return (f"linear + cross-entropy, {str(DTYPE).removeprefix('torch.')}, D={WIDTH}, V={VOCAB}, "
            f"N in {', '.join(map(str, TOKENS))}, {IGNORED_FRACTION:.0%} of targets ignored: forward+backward time and "
            "peak extra memory of triton (fused), eager, compile (torch.compile of eager) and liger (if installed); "
            f"targets: extra memory <= {MEMORY_VS_EAGER}x eager's, time <= {TIME_VS_EAGER}x eager's and "
            f"<= {TIME_VS_LIGER}x liger's")


def _liger():
    """Liger-Kernel's fused linear cross-entropy as f(x, weight, targets), or None and why not."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        version = importlib.metadata.version("liger-kernel")
    except Exception as e:  # absent, or present but broken against this torch/triton: record it and go on
        return None, f"not installed ({type(e).__name__}: {e})"
    return (lambda x, w, t: liger_fused_linear_cross_entropy(x, w, t, ignore_index=-1)), version


def _implementations(liger) -> dict:
    torch._functorch.config.donated_buffer = False  # (as bench_layernorm: compiled backward run more than once)
    impls = {"triton": linear_cross_entropy,
             "eager": linear_cross_entropy_reference,
             "compile": torch.compile(linear_cross_entropy_reference, dynamic=False)}
    if liger is not None:
        impls["liger"] = liger
    return impls


def _make_inputs(tokens: int):
    def make():
        x = torch.randn(tokens, WIDTH, device="cuda", dtype=DTYPE, requires_grad=True)
        weight = (0.02 * torch.randn(VOCAB, WIDTH, device="cuda")).to(DTYPE).requires_grad_()
        targets = torch.randint(0, VOCAB, (tokens,), device="cuda")
        targets = targets.masked_fill(torch.rand(tokens, device="cuda") < IGNORED_FRACTION, -1)
        return x, weight, targets
    return make


def _step(fn, x, weight, targets):
    return torch.autograd.grad(fn(x, weight, targets), (x, weight))


def _extra_memory_mb(fn, x, weight, targets) -> float:
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = _step(fn, x, weight, targets)
    torch.cuda.synchronize()
    returned = sum(g.numel() * g.element_size() for g in grads)
    return (torch.cuda.max_memory_allocated() - base - returned) / 2**20


def main():
    print(plan())
    require_cuda()
    torch.manual_seed(0)
    env = environment()
    peak = matmul_peak_tflops()
    liger, liger_status = _liger()
    results, table, targets = [], [], []
    for tokens in TOKENS:
        torch._dynamo.reset()
        set_bytes = (tokens + VOCAB) * WIDTH * DTYPE.itemsize
        sets = rotating(_make_inputs(tokens), set_bytes)
        row = {"N": tokens}
        for impl, fn in _implementations(liger).items():
            try:
                for _ in range(2):  # compilation stays out of the measurements
                    _step(fn, *next(sets))
                memory = _extra_memory_mb(fn, *next(sets))
                ms = median_ms(lambda: _step(fn, *next(sets)), warmup_ms=50, rep_ms=300)
            except Exception as e:  # Liger is carried as a wheel and may not run against this torch/triton
                if impl != "liger":
                    raise
                liger, liger_status = None, f"failed at N={tokens} ({type(e).__name__}: {e})"
                continue
            results.append({"N": tokens, "impl": impl, "ms": ms, "extra_memory_mb": memory})
            row[f"{impl} ms"], row[f"{impl} MiB"] = ms, memory
            gc.collect()
            torch.cuda.empty_cache()
        del sets
        torch.cuda.empty_cache()
        row["triton TFLOP/s"] = 8 * tokens * VOCAB * WIDTH / (row["triton ms"] * 1e9)
        targets.append({"N": tokens, "target": f"extra memory <= {MEMORY_VS_EAGER}x eager's",
                        "value": row["triton MiB"] / row["eager MiB"],
                        "met": row["triton MiB"] <= MEMORY_VS_EAGER * row["eager MiB"]})
        targets.append({"N": tokens, "target": f"time <= {TIME_VS_EAGER}x eager's",
                        "value": row["triton ms"] / row["eager ms"],
                        "met": row["triton ms"] <= TIME_VS_EAGER * row["eager ms"]})
        if "liger ms" in row:
            targets.append({"N": tokens, "target": f"time <= {TIME_VS_LIGER}x liger's",
                            "value": row["triton ms"] / row["liger ms"],
                            "met": row["triton ms"] <= TIME_VS_LIGER * row["liger ms"]})
        table.append(row)

    path = write_results("linear_cross_entropy", {
        "environment": env, "liger_kernel": liger_status, "width": WIDTH, "vocab": VOCAB, "dtype": str(DTYPE),
        "ignored_fraction": IGNORED_FRACTION, "ceilings": {"matmul_bf16_tflops": peak},
        "flops": "triton: 8*N*V*D (forward logits, backward logits again, dx, dW); eager's matmuls: 6*N*V*D",
        "memory_model": "peak allocated during one forward+backward above the inputs, less the returned gradients",
        "torch_compile": "torch.compile(reference, dynamic=False), donated_buffer off, recompiled per N",
        "results": results, "targets": targets,
    })
    missed = [t for t in targets if not t["met"]]
    print(f"{env['device']}: torch {env['torch']}, triton {env['triton']}; bf16 matmul ceiling {peak:.0f} TFLOP/s; "
          f"liger-kernel: {liger_status}; results in {path}")
    print(f"targets met: {len(targets) - len(missed)}/{len(targets)}"
          + "".join(f"\n  missed: N={t['N']}: {t['target']} (got {t['value']:.2f})" for t in missed))
    print_table(table,
                ["N", "triton TFLOP/s"] + [f"{impl} {unit}" for impl in ("triton", "eager", "compile", "liger")
                                           for unit in ("ms", "MiB")])


if __name__ == "__main__":
    main()
