"""Is an op bound by the GPU or by the host? For each op at GPT-2 124M's training shapes (bf16, 16 x 1024 tokens), and
for the whole model's forward+backward: the CPU time one forward+backward call costs Python and the launches, against
the time its kernels keep the GPU busy.

    python -m bench.host_overhead        # writes bench/results/host_overhead-<device>.json

Host ms: wall-clock time to issue --calls calls back to back (the GPU runs them asynchronously, so this is what the CPU
spends; the launch queue holds far more kernels than the calls queue), per call. GPU ms: the summed durations of the
kernels those calls ran, from the profiler, per call. Where host ms exceeds GPU ms the GPU waits on the CPU and a
faster kernel gains nothing; the cure is fewer launches or less Python per launch (a CUDA graph, torch.compile's
own). The same inputs serve every call: this measures launch cost, not memory traffic (the kernel benchmarks do that).
"""
import argparse
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from bench.common import environment, print_table, require_cuda, write_results
from bench.train_throughput import EAGER_OPS, TRITON_OPS, VOCAB_SIZE
from tritongpt.kernels import add_layer_norm, flash_attention, gelu_mlp, layer_norm, linear_cross_entropy
from tritongpt.kernels.linear_cross_entropy import linear_cross_entropy_reference
from tritongpt.kernels.mlp import gelu_mlp_reference
from tritongpt.model.config import preset
from tritongpt.model.gpt import GPT

BATCH, SEQ_LEN, WIDTH, HEADS = 16, 1024, 768, 12
TOKENS = BATCH * SEQ_LEN
DTYPE = torch.bfloat16


def op_cases(device) -> dict:
    """name -> (implementation -> fn, leaves): each fn runs one forward+backward on its leaves."""
    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=device)).to(DTYPE).requires_grad_()

    def step(out):
        loss = out.float().square().mean() if out.dim() else out
        loss.backward()

    q, k, v = (leaf(BATCH, HEADS, SEQ_LEN, WIDTH // HEADS) for _ in range(3))
    x, r = leaf(TOKENS, WIDTH), leaf(TOKENS, WIDTH)
    w, b = leaf(WIDTH, scale=0.1), leaf(WIDTH, scale=0.1)
    fc_w, fc_b = leaf(4 * WIDTH, WIDTH, scale=0.02), leaf(4 * WIDTH, scale=0.02)
    proj_w, proj_b = leaf(WIDTH, 4 * WIDTH, scale=0.02), leaf(WIDTH, scale=0.02)
    head = leaf(VOCAB_SIZE, WIDTH, scale=0.02)
    targets = torch.randint(0, VOCAB_SIZE, (TOKENS // 2,), device=device)
    x_half = leaf(TOKENS // 2, WIDTH)
    return {
        "attention": {"triton": lambda: step(flash_attention(q, k, v, causal=True)),
                      "sdpa": lambda: step(F.scaled_dot_product_attention(q, k, v, is_causal=True))},
        "layer_norm": {"triton": lambda: step(layer_norm(x, w, b, 1e-5)),
                       "eager": lambda: step(F.layer_norm(x, (WIDTH,), w, b, 1e-5))},
        "add_layer_norm": {"triton": lambda: step(add_layer_norm(x, r, w, b, 1e-5)[0]),
                           "eager": lambda: step(F.layer_norm(x + r, (WIDTH,), w, b, 1e-5))},
        "mlp": {"triton": lambda: step(gelu_mlp(x, fc_w, fc_b, proj_w, proj_b, approximate="tanh")),
                "eager": lambda: step(gelu_mlp_reference(x, fc_w, fc_b, proj_w, proj_b, approximate="tanh"))},
        "loss (8192 tokens)": {"triton": lambda: step(linear_cross_entropy(x_half, head, targets)),
                               "eager": lambda: step(linear_cross_entropy_reference(x_half, head, targets))},
    }


def model_cases(device) -> dict:
    """GPT-2 124M's forward+backward under bf16 autocast, every op on Triton and every op eager (SDPA attention)."""
    config = preset("gpt2", vocab_size=VOCAB_SIZE)
    idx = torch.randint(0, VOCAB_SIZE, (BATCH, SEQ_LEN + 1), device=device)
    cases = {}
    for impl, ops in (("triton", TRITON_OPS), ("eager", EAGER_OPS)):
        with torch.device(device):
            model = GPT(replace(config, **ops))

        def run(model=model):
            with torch.autocast("cuda", dtype=DTYPE):
                _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
        cases[impl] = run
    return {"GPT-2 124M fwd+bwd": cases}


def host_and_gpu_ms(fn, calls: int) -> tuple[float, float]:
    for _ in range(3):  # compile, autotune, allocate
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - started) * 1e3 / calls
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    gpu_us = sum(event.self_device_time_total for event in prof.key_averages()
                 if event.device_type == torch.autograd.DeviceType.CUDA)
    return host, gpu_us / 1e3 / calls


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=20, help="calls timed per case")
    p.add_argument("--dry-run", action="store_true", help="print what would be measured and exit")
    args = p.parse_args(argv)
    print(f"host vs GPU time per forward+backward, bf16, {BATCH} x {SEQ_LEN} tokens, width {WIDTH}: attention, "
          f"layer_norm, add_layer_norm, mlp, the loss, and GPT-2 124M; {args.calls} calls each", flush=True)
    if args.dry_run:
        return
    device = require_cuda()
    torch.manual_seed(0)
    rows = []
    for cases in (op_cases(device), model_cases(device)):
        for op, impls in cases.items():
            for impl, fn in impls.items():
                host, gpu = host_and_gpu_ms(fn, args.calls)
                rows.append({"op": op, "impl": impl, "host ms": host, "GPU ms": gpu,
                             "bound by": "host" if host > gpu else "GPU"})
                print(f"  {op} {impl}: host {host:.3f} ms, GPU {gpu:.3f} ms", flush=True)
        del cases
        torch.cuda.empty_cache()
    path = write_results("host_overhead", {"environment": environment(), "batch": BATCH, "seq_len": SEQ_LEN,
                                           "width": WIDTH, "dtype": str(DTYPE), "calls": args.calls, "results": rows})
    print(f"results in {path}")
    print_table(rows, ["op", "impl", "host ms", "GPU ms", "bound by"])


if __name__ == "__main__":
    main()
