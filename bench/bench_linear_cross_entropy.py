"""The LM head's loss on the GPU: forward+backward time and peak extra memory of the fused Triton linear +
cross-entropy, against eager PyTorch (F.linear then F.cross_entropy, which materialise the N x V logits), torch.compile
of the same, PyTorch's own chunked loss (torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions: it
splits the rows into chunks and computes each chunk's gradients in the forward; "auto", and the accuracy policies
"accurate" and "compact" at its automatic chunk size), and Liger-Kernel's fused linear cross-entropy (when installed;
it materialises chunks of the logits).

    python -m bench.bench_linear_cross_entropy          # writes bench/results/linear_cross_entropy-<device>.json
    python -m bench.bench_linear_cross_entropy --quick  # N = 8,192 against eager, PyTorch's "auto" chunking, Liger

bf16, GPT-2's head: D = 768, V = 50,257, N = 16,384 and 8,192 tokens (micro-batches of 16 and 8 x 1024), a tenth of
the targets ignored (-1). Each call is the training step's: the loss, then the gradients of x and weight.
Time: median of CUDA events over inputs rotated past the L2 cache. Memory: the peak allocated during one
forward+backward above what was allocated before it (the inputs), less the two gradients every implementation
must return (x's and weight's): what the loss itself needs on top. Rate: the fused op's 4 N V D multiply-adds (eager's
matmuls do 3) as TFLOP/s, beside the measured cuBLAS matmul ceiling. A PyTorch without
torch.nn.functional.linear_cross_entropy (before 2.12) is recorded as such and its peers left out.
"""
import gc
import importlib.metadata

import torch
import torch.nn.functional as F

from bench.common import (bench_args, environment, matmul_peak_tflops, median_ms, print_table, print_targets,
                          require_cuda, results_name, rotating, write_results)
from tritongpt.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

TOKENS = (16384, 8192)
QUICK_TOKENS = (8192,)
TORCH_CHUNKED_POLICIES = ("auto", "accurate", "compact")  # LinearCrossEntropyOptions.acc_policy
WIDTH, VOCAB = 768, 50257
DTYPE = torch.bfloat16
IGNORED_FRACTION = 0.1
# Targets on an H100 (a benchmark's, not a test's): extra memory at most this share of eager's, and time at most
# eager's and Liger's.
MEMORY_VS_EAGER, TIME_VS_EAGER, TIME_VS_LIGER = 0.1, 1.0, 1.0


def plan(tokens, impls) -> str:
    return (f"linear + cross-entropy, {str(DTYPE).removeprefix('torch.')}, D={WIDTH}, V={VOCAB}, "
            f"N in {', '.join(map(str, tokens))}, {IGNORED_FRACTION:.0%} of targets ignored: forward+backward time and "
            f"peak extra memory of {', '.join(impls)} (liger if installed); targets: extra memory <= "
            f"{MEMORY_VS_EAGER}x eager's, time <= {TIME_VS_EAGER}x eager's and <= {TIME_VS_LIGER}x liger's")


def _liger():
    """Liger-Kernel's fused linear cross-entropy as f(x, weight, targets), or None and why not."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        version = importlib.metadata.version("liger-kernel")
    except Exception as e:  # absent, or present but broken against this torch/triton: record it and go on
        return None, f"not installed ({type(e).__name__}: {e})"
    return (lambda x, w, t: liger_fused_linear_cross_entropy(x, w, t, ignore_index=-1)), version


def _torch_chunked():
    """PyTorch's chunked loss per accuracy policy as f(x, weight, targets), or {} and why not."""
    if not hasattr(F, "linear_cross_entropy"):
        return {}, f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (it came in 2.12)"
    from torch.nn import LinearCrossEntropyOptions
    return ({f"torch chunked {policy}": (lambda x, w, t, options=LinearCrossEntropyOptions(acc_policy=policy):
                                         F.linear_cross_entropy(x, w, t, ignore_index=-1, options=options))
             for policy in TORCH_CHUNKED_POLICIES},
            f"torch {torch.__version__}: F.linear_cross_entropy with LinearCrossEntropyOptions(acc_policy=...)")


def _implementations(liger, quick: bool) -> dict:
    impls = {"triton": linear_cross_entropy, "eager": linear_cross_entropy_reference}
    if not quick:
        import torch._functorch.config
        torch._functorch.config.donated_buffer = False  # (as bench_layernorm: compiled backward run more than once)
        impls["compile"] = torch.compile(linear_cross_entropy_reference, dynamic=False)
    chunked, _ = _torch_chunked()
    impls.update(list(chunked.items())[:1] if quick else chunked)
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


def main(argv=None):
    args = bench_args(__doc__, "N = 8,192 against eager, PyTorch's chunked loss (auto) and Liger only", argv)
    tokens_list = QUICK_TOKENS if args.quick else TOKENS
    torch_chunked_status = _torch_chunked()[1]
    print(plan(tokens_list, _implementations(None, args.quick)), flush=True)
    print(f"PyTorch's chunked loss: {torch_chunked_status}", flush=True)
    if args.dry_run:
        return
    require_cuda()
    torch.manual_seed(0)
    env = environment()
    peak = matmul_peak_tflops()
    liger, liger_status = _liger()
    results, table, targets, failures = [], [], [], {}
    for tokens in tokens_list:
        torch._dynamo.reset()
        set_bytes = (tokens + VOCAB) * WIDTH * DTYPE.itemsize
        sets = rotating(_make_inputs(tokens), set_bytes)
        row = {"N": tokens}
        for impl, fn in _implementations(liger, args.quick).items():
            try:
                for _ in range(2):  # compilation stays out of the measurements
                    _step(fn, *next(sets))
                memory = _extra_memory_mb(fn, *next(sets))
                ms = median_ms(lambda: _step(fn, *next(sets)), warmup_ms=50, rep_ms=300)
            except Exception as e:  # a peer may not run against this torch/triton (Liger is carried as a wheel)
                if impl in ("triton", "eager"):
                    raise
                failures[impl] = f"failed at N={tokens} ({type(e).__name__}: {str(e)[:300]})"
                if impl == "liger":
                    liger = None
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

    path = write_results(results_name("linear_cross_entropy", args.quick), {
        "environment": env, "liger_kernel": liger_status, "torch_chunked": torch_chunked_status,
        "failures": failures, "width": WIDTH, "vocab": VOCAB, "dtype": str(DTYPE),
        "ignored_fraction": IGNORED_FRACTION, "ceilings": {"matmul_bf16_tflops": peak},
        "flops": "triton: 8*N*V*D (forward logits, backward logits again, dx, dW); eager's matmuls: 6*N*V*D",
        "memory_model": "peak allocated during one forward+backward above the inputs, less the returned gradients",
        "torch_compile": "torch.compile(reference, dynamic=False), donated_buffer off, recompiled per N",
        "results": results, "targets": targets,
    })
    print(f"{env['device']}: torch {env['torch']}, triton {env['triton']}; bf16 matmul ceiling {peak:.0f} TFLOP/s; "
          f"liger-kernel: {liger_status}; PyTorch's chunked loss: {torch_chunked_status}; results in {path}")
    print_targets(targets, lambda t: f"N={t['N']}")
    for impl, why in failures.items():
        print(f"{impl}: {why}")
    impls = list(dict.fromkeys(r["impl"] for r in results))
    print_table(table, ["N", "triton TFLOP/s"] + [f"{impl} {unit}" for impl in impls for unit in ("ms", "MiB")])


if __name__ == "__main__":
    main()
