"""Benchmark the Triton GELU-MLP (kernels.mlp) against eager PyTorch (cuBLAS matmuls + a separate GELU) and
torch.compile of the same eager code, bf16, at GPT-2 training shapes (16384 rows; 768->3072->768, 1024->4096->1024,
1600->6400->1600). Run from the repository root: python -m bench.bench_mlp (--quick: the whole MLP at GPT-2 small's
widths alone, against eager and torch.compile).

Cases, each timed as the median of many runs (bench.common.median_ms) over rotated input sets, after warm-up (which
also runs the Triton autotuner and torch.compile's compilation):
  mlp fwd        the training forward (inputs require grad, so each implementation saves what its backward needs)
  mlp fwd+bwd    forward, then the gradients of x, both weights and both biases for a fixed upstream gradient
                 triton variants: the default, and MLPOptions(plain_matmul="triton") (the unfused matmuls in Triton
                 instead of cuBLAS); with saved/peak memory
  fc             x @ W1^T alone: cuBLAS's plain matmul vs the fused Triton matmul + bias + GELU (storing h and pre, as
                 in training, and h only, as in inference), and eager's matmul + bias, then GELU
  d_pre          dy @ W2 alone: cuBLAS's plain matmul vs the fused Triton matmul * GELU'(pre) (+ the db1 partials)
  proj           h @ W2^T + b2: cuBLAS (torch.addmm) vs the Triton kernel: the measurement behind plain_matmul
Targets on an H100 (not tested here): mlp fwd+bwd >= 1.15x eager and >= 1.0x torch.compile; fused fc >= 90% of
cuBLAS's plain matmul. The JSON (bench/results/gelu_mlp-<device>.json) holds every raw time.
"""
import torch
import torch.nn.functional as F

from bench.common import (bench_args, environment, matmul_peak_tflops, median_ms, print_table, require_cuda,
                          results_name, rotating, write_results)

ROWS = 16384
WIDTHS = [(768, 3072), (1024, 4096), (1600, 6400)]  # (D, H): GPT-2 small, medium, XL
DTYPE = torch.bfloat16


def make_inputs(d, h, device):
    """Fresh random (x, W1, b1, W2, b2) requiring grad, and an upstream gradient dy, at GPT-2-like scales."""
    params = [torch.randn(ROWS, d), 0.02 * torch.randn(h, d), 0.02 * torch.randn(h),
              0.02 * torch.randn(d, h), 0.02 * torch.randn(d)]
    params = [p.to(device=device, dtype=DTYPE).requires_grad_() for p in params]
    return params, torch.randn(ROWS, d, device=device, dtype=DTYPE)


def timed(fn) -> float:
    """Median ms of fn(), after two untimed calls (autotuning, compilation) so that do_bench's estimate is sane."""
    fn()
    fn()
    torch.cuda.synchronize()
    return median_ms(fn)


def memory_mb(mlp_fn, params, dy) -> tuple[float, float]:
    """(MB held after the forward — output + what autograd saved —, peak MB over forward + backward), above the
    inputs."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = mlp_fn(*params)
    saved = torch.cuda.memory_allocated() - base
    torch.autograd.grad(y, params, dy)
    del y
    torch.cuda.synchronize()
    return saved / 2**20, (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_width(mlp, compiled, d, h, device, results, whole_mlp_only=False):
    """Time every case at widths D -> H -> D (the whole MLP's alone if whole_mlp_only); append one dict per (case,
    implementation) to results."""
    shape = f"{d}->{h}->{d}"
    sets = rotating(lambda: make_inputs(d, h, device), bytes_per_set=2 * (2 * ROWS * d + 2 * h * d + h + d))
    mlp_flops = 4 * ROWS * d * h  # two matmuls of 2*M*D*H each; the backward does twice the forward
    fc_flops = 2 * ROWS * d * h

    def ours(options=mlp.MLPOptions()):
        return lambda *p: mlp.gelu_mlp(*p, approximate="tanh", options=options)

    def eager(*p):
        return mlp.gelu_mlp_reference(*p, approximate="tanh")

    def record(case, impl, ms, flops, **extra):
        results.append({"shape": shape, "case": case, "impl": impl, "ms": ms,
                        "tflops": flops / (ms * 1e-3) / 1e12, **extra})

    # --- the whole MLP ----------------------------------------------------------------------------------------------
    impls = [("eager", eager), ("torch.compile", compiled), ("triton", ours())]
    if not whole_mlp_only:
        impls.append(("triton all-Triton matmuls", ours(mlp.MLPOptions(plain_matmul="triton"))))
    fwd_ms, both_ms, memory = {}, {}, {}
    for name, fn in impls:
        fwd_ms[name] = timed(lambda: fn(*next(sets)[0]))

        def fwd_bwd():
            params, dy = next(sets)
            return torch.autograd.grad(fn(*params), params, dy)
        both_ms[name] = timed(fwd_bwd)
        memory[name] = memory_mb(fn, *next(sets))
    for name, ms in fwd_ms.items():
        record("mlp fwd", name, ms, mlp_flops, x_eager=fwd_ms["eager"] / ms, x_compile=fwd_ms["torch.compile"] / ms)
    for name, ms in both_ms.items():
        saved_mb, peak_mb = memory[name]
        record("mlp fwd+bwd", name, ms, 3 * mlp_flops, x_eager=both_ms["eager"] / ms,
               x_compile=both_ms["torch.compile"] / ms, saved_MB=saved_mb, peak_MB=peak_mb)
    if whole_mlp_only:
        return

    # --- the first matmul alone: cuBLAS's plain matmul vs the fused one -----------------------------------------------
    def plain_fc():
        (x, w1, _, _, _), _ = next(sets)
        return torch.matmul(x.detach(), w1.detach().t())

    def eager_fc():
        (x, w1, b1, _, _), _ = next(sets)
        return F.gelu(F.linear(x.detach(), w1.detach(), b1.detach()), approximate="tanh")

    def fused_fc(save_pre):
        def run():
            (x, w1, b1, _, _), _ = next(sets)
            return mlp._fc_gelu(x.detach(), w1.detach(), b1.detach(), True, save_pre)
        return run

    cublas_ms = timed(plain_fc)
    record("fc", "torch.matmul (cuBLAS)", cublas_ms, fc_flops, vs_cublas=1.0)
    for impl, fn in (("eager linear + gelu", eager_fc), ("triton fused, h + pre", fused_fc(True)),
                     ("triton fused, h only", fused_fc(False))):
        ms = timed(fn)
        record("fc", impl, ms, fc_flops, vs_cublas=cublas_ms / ms)

    # --- the backward's fused matmul: d_pre = (dy @ W2) * gelu'(pre) -------------------------------------------------
    # pre for each input set is computed once, outside the timing.
    d_pre_sets = rotating(lambda: _d_pre_inputs(next(sets)), bytes_per_set=2 * (ROWS * d + d * h + ROWS * h))

    def plain_d_pre():
        dy, w2, _ = next(d_pre_sets)
        return torch.matmul(dy, w2)

    def triton_d_pre():
        dy, w2, pre = next(d_pre_sets)
        return mlp._gelu_grad_matmul(dy, w2, pre, True, want_bias_grad=True)

    cublas_ms = timed(plain_d_pre)
    record("d_pre", "torch.matmul (cuBLAS)", cublas_ms, fc_flops, vs_cublas=1.0)
    ms = timed(triton_d_pre)
    record("d_pre", "triton fused GELU' + db1", ms, fc_flops, vs_cublas=cublas_ms / ms)

    # --- the projection: cuBLAS or Triton (plain_matmul) ------------------------------------------------------------
    hidden = rotating(lambda: torch.randn(ROWS, h, device=device, dtype=DTYPE), bytes_per_set=2 * ROWS * h)

    def proj(plain_matmul):
        def run():
            (_, _, _, w2, b2), _ = next(sets)
            h_in = next(hidden)
            return mlp._mm(h_in, w2.detach().t(), b2.detach(), plain_matmul)
        return run

    cublas_ms = timed(proj("torch"))
    record("proj", "torch.addmm (cuBLAS)", cublas_ms, fc_flops, vs_cublas=1.0)
    ms = timed(proj("triton"))
    record("proj", "triton", ms, fc_flops, vs_cublas=cublas_ms / ms)


def _d_pre_inputs(input_set):
    (x, w1, b1, w2, _), dy = input_set
    with torch.no_grad():
        pre = torch.addmm(b1, x, w1.t())
    return dy, w2.detach(), pre


def main(argv=None):
    args = bench_args(__doc__, "the whole MLP (fwd, fwd+bwd) at 768->3072->768 only", argv)
    widths = WIDTHS[:1] if args.quick else WIDTHS
    print(f"GELU MLP, {str(DTYPE).removeprefix('torch.')}, {ROWS} rows, D->H->D in "
          f"{', '.join(f'{d}->{h}->{d}' for d, h in widths)}: triton, eager, torch.compile"
          + ("" if args.quick else "; and the fc, d_pre and proj matmuls against cuBLAS"), flush=True)
    if args.dry_run:
        return
    device = require_cuda()
    import tritongpt.kernels.mlp as mlp
    env = environment()
    peak = matmul_peak_tflops()
    compiled = torch.compile(mlp.gelu_mlp_reference, dynamic=False)
    results = []
    for d, h in widths:
        print(f"timing {d}->{h}->{d} ...", flush=True)
        bench_width(mlp, compiled, d, h, device, results, whole_mlp_only=args.quick)
        torch.cuda.empty_cache()
    path = write_results(results_name("mlp", args.quick), {
        "environment": env, "dtype": str(DTYPE), "rows": ROWS, "matmul_peak_tflops": peak,
        "targets": {"mlp fwd+bwd x_eager": 1.15, "mlp fwd+bwd x_compile": 1.0, "fc fused vs_cublas": 0.9},
        "results": results})
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}; {DTYPE}, {ROWS} rows; "
          f"cuBLAS bf16 peak {peak:.0f} TFLOP/s; raw times in {path}")
    print_table(results, ["shape", "case", "impl", "ms", "tflops", "x_eager", "x_compile", "vs_cublas",
                       "saved_MB", "peak_MB"])


if __name__ == "__main__":
    main()
