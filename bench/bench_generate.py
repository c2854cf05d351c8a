"""Text generation: tokens/s with the KV cache and without it (each new token then runs its whole context through
the model again), and for the cached decoding steps the bandwidth achieved reading the weights.

    python -m bench.bench_generate                  # GPU: GPT-2 124M, bf16 autocast; bench/results/generate-<device>.json
    python -m bench.bench_generate --device cpu     # the `small` preset in float32, printed only

A 16-token prompt and 200 new tokens, batch 1 and 8, sampled as sample.py samples by default (temperature 0.8, top-k
200) from random weights (speed does not depend on them); the ops are sample.py's (the Triton kernels on a GPU, the
PyTorch references on a CPU, over weights in column-major order there) unless chosen with --attention, --layernorm,
--mlp. Each case runs once to warm up (Triton's autotuning, allocator and cast caches), then --runs times; the median
is reported:
  tokens/s      every row's new tokens over the whole call, the first pass over the prompt included
  decode ms     one step after the first token (with the cache: one position through the model)
  weight GB/s   the weights' bytes in the compute dtype (every parameter but the position table, which a step reads
                one row of) over a decode step's time: a step must read them all, so this is the bandwidth a step
                achieves, to hold against the device's measured copy bandwidth on a GPU (bytes read plus written)

Target (a benchmark's, not a test's): cached at least 4x uncached in tokens/s on the CPU with the `small` preset.
"""
import argparse
import os
import statistics
import time
import traceback

import torch

from bench.common import copy_bandwidth_gbps, environment, print_table, write_results
from tritongpt.device import autocast, compute_dtype, impl_choices, resolve_ops
from tritongpt.model import GPT, preset

VOCAB_SIZE = 50257
PROMPT_TOKENS, NEW_TOKENS, BATCH_SIZES = 16, 200, (1, 8)
SAMPLING = dict(temperature=0.8, top_k=200)
SEED = 1337
CPU_SPEEDUP_TARGET = 4.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda when there is one")
    p.add_argument("--model", help="preset (model/config.py); default gpt2 on a GPU, small on a CPU")
    p.add_argument("--runs", type=int, default=5, help="timed calls per case, after one to warm up")
    for op in ("attention", "layernorm", "mlp"):
        p.add_argument(f"--{op}", choices=impl_choices(op), default="auto", help="auto: as sample.py chooses")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible")
    args.model = args.model or ("gpt2" if args.device == "cuda" else "small")
    try:
        preset(args.model)
    except ValueError as e:
        p.error(str(e))
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(model: GPT, prompt: torch.Tensor, use_cache: bool, dtype: torch.dtype) -> tuple[float, float]:
    """(seconds for the whole call, seconds for the steps after its first token) of one generation."""
    device = prompt.device
    generator = torch.Generator(device).manual_seed(SEED)
    with autocast(dtype, device):  # one region for the whole call, as in sample.py: weights are cast once
        synchronize(device)
        start = time.perf_counter()
        tokens = model.generate_tokens(prompt, NEW_TOKENS, use_cache=use_cache, generator=generator, **SAMPLING)
        next(tokens)
        synchronize(device)
        first = time.perf_counter()
        for _ in tokens:
            pass
        synchronize(device)
        end = time.perf_counter()
    return end - start, end - first


def measure(model: GPT, batch_size: int, use_cache: bool, dtype: torch.dtype, runs: int) -> dict:
    device = model.lm_head.weight.device
    prompt = torch.randint(0, VOCAB_SIZE, (batch_size, PROMPT_TOKENS), device=device,
                           generator=torch.Generator(device).manual_seed(SEED))
    time_call(model, prompt, use_cache, dtype)  # warm-up
    calls = [time_call(model, prompt, use_cache, dtype) for _ in range(runs)]
    total = statistics.median(t for t, _ in calls)
    step = statistics.median(d for _, d in calls) / (NEW_TOKENS - 1)
    row = {"batch": batch_size, "cache": use_cache, "tokens_per_s": batch_size * NEW_TOKENS / total, "call_s": total,
           "decode_ms": step * 1e3, "call_s_each": [t for t, _ in calls]}
    if use_cache:  # a step without the cache runs its whole context: its time is not one read of the weights
        row["weight_gbps"] = model.num_params() * dtype.itemsize / step / 1e9
    return row


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = compute_dtype("auto", device)
    ops = resolve_ops(args, device)
    torch.manual_seed(SEED)
    with device:
        model = GPT(preset(args.model, vocab_size=VOCAB_SIZE, **ops)).eval()
    if device.type == "cpu":
        model.column_major_()  # as sample.py
    copy_gbps = copy_bandwidth_gbps() if device.type == "cuda" else None
    print(f"{args.model} ({model.num_params() / 1e6:.1f}M parameters), {dtype}, ops {ops}, "
          f"{PROMPT_TOKENS}-token prompt + {NEW_TOKENS} new tokens, median of {args.runs}"
          + (f"; copy bandwidth {copy_gbps:.0f} GB/s" if copy_gbps else
             f"; {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"))

    rows = []
    for batch_size in BATCH_SIZES:
        for use_cache in (True, False):
            try:
                row = measure(model, batch_size, use_cache, dtype, args.runs)
            except Exception as e:  # e.g. an attention implementation that cannot take fewer queries than keys
                traceback.print_exc()
                row = {"batch": batch_size, "cache": use_cache, "error": f"{type(e).__name__}: {e}"}
            if copy_gbps and "weight_gbps" in row:
                row["copy_share"] = row["weight_gbps"] / copy_gbps
            rows.append(row)
        cached, uncached = rows[-2:]
        if "tokens_per_s" in cached and "tokens_per_s" in uncached:
            cached["speedup"] = cached["tokens_per_s"] / uncached["tokens_per_s"]
    print_table(rows, ["batch", "cache", "tokens_per_s", "call_s", "decode_ms", "weight_gbps", "copy_share",
                       "speedup", "error"])
    speedups = [r["speedup"] for r in rows if "speedup" in r]
    if device.type == "cpu":
        met = bool(speedups) and min(speedups) >= CPU_SPEEDUP_TARGET
        print(f"target: cached >= {CPU_SPEEDUP_TARGET}x uncached on CPU: {'met' if met else 'NOT met'}")
        return
    payload = {"environment": environment(), "model": args.model, "dtype": str(dtype), "ops": ops,
               "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "sampling": SAMPLING, "runs": args.runs,
               "copy_gbps": copy_gbps, "rows": rows}
    print(f"results in {write_results('generate', payload)}")


if __name__ == "__main__":
    main()
