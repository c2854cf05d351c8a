"""Where a GPT-2 training step's GPU time goes: torch.profiler over a few steps of bench/train_throughput.py's
training step (same model, data, optimizer), each kernel's time per step, grouped into categories, for the Triton
variant (c) beside the nanoGPT recipe (b) that it is measured against.

    python -m bench.profile_step                          # gpt2, batch 16, variants c and b
    python -m bench.profile_step --variant c --trace DIR  # also DIR/trace-c-<device>.json.gz (chrome://tracing)
    TRITON_INTERPRET=1 python -m bench.profile_step --device cpu --model tiny --batch-size 2 --variant c,a

Per variant: warm-up steps (compilation, autotuning), then --steps unprofiled steps timed with CUDA events (the
step time the percentages are of: the profiler slows the CPU side, not the kernels), then --steps profiled steps.
Each kernel is attributed to the op that launched it and that op's ancestors (the phase labels of the training
step, autograd nodes, the kernels' operators tritongpt::*), which places it in a category: attention fwd / bwd,
layernorm (with its fused residual add), the MLP's fused Triton matmuls, the MLP's cuBLAS matmuls (seen only where
the MLP runs as this project's operators: variant (c)), other matmuls (QKV and output projections, LM head;
and the eager MLP's), the loss, optimizer + gradient clipping, memcpy/memset, elementwise/other. GPU idle is the
step time less the kernel time: launch gaps, where the GPU waits on the CPU.

Writes bench/results/profile-<device>.md (a short markdown table, to commit). Chrome traces are large: they go only
where --trace says (bench/gpu_run.sh: ARCHIVE_DIR), never into the repository. --device cpu is a smoke run (CPU
activity, each op's own CPU time in place of kernels; nothing written unless --trace).
"""
import argparse
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.common import RESULTS_DIR, environment
from bench.train_throughput import (SEED, VARIANTS, VOCAB_SIZE, StepTimer, build, error_line, free_device_memory,
                                    make_batches, resolve_device, skip_reason, train_step)
from tritongpt.model.config import preset
from tritongpt.model.gpt import GPT

TOP_KERNELS = 15
GEMM = re.compile(r"gemm|nvjet|xmma|cutlass|cublas|wgmma|^sm\d+_|splitk|^aten::(mm|addmm|bmm|matmul|linear)$", re.I)


def category(name: str, context: tuple[str, ...]) -> str:
    """The category of a kernel given its name and the names of the op that launched it and its ancestors."""
    where = " | ".join(context)
    if {"optimizer", "clip_grad_norm"} & set(context):
        return "optimizer + grad clip"
    if re.search(r"layer_?norm|GammaBeta", f"{name} | {where}", re.I):
        return "layernorm (+ residual add)"
    if re.search(r"_attn_|flash|fmha|sdpa|scaled_dot_product|attention|[fb]prop", f"{name} | {where}", re.I):
        backward = re.search(r"bwd|backward|bprop|dot_do_o|convert_dq", f"{name} | {where}", re.I)
        return "attention bwd" if backward else "attention fwd"
    if "_matmul_kernel" in name:
        return "mlp: Triton fused matmul"
    if re.search(r"gelu_mlp|gelu_grad", where) or "gelu" in name.lower():  # inside the Triton MLP, or a GELU kernel
        return "mlp: cuBLAS matmul" if GEMM.search(name) else "mlp: other"
    if GEMM.search(name):
        return "other matmul (cuBLAS)"
    if re.search(r"softmax|nll_loss|cross_entropy", f"{name} | {where}", re.I):
        return "loss (log-softmax + NLL)"
    if re.search(r"memcpy|memset", name, re.I):
        return "memcpy / memset"
    return "elementwise / other"


def short(name: str) -> str:
    """A kernel's name without its C++ return type, anonymous namespaces, template arguments and parameters."""
    bare = re.sub(r"^void |\(anonymous namespace\)::", "", name).split("<")[0].split("(")[0].strip()
    return (bare or name)[:70]


def lineage(event) -> tuple[str, ...]:
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return tuple(names)


def kernel_times(prof, cuda: bool) -> list[tuple[str, float, tuple[str, ...]]]:
    """(kernel name, µs, the launching op and its ancestors) for every kernel run under prof; on the CPU, every op's
    own CPU time stands in for kernels."""
    events = prof.events()
    if not cuda:
        return [(e.name, e.self_cpu_time_total, lineage(e)) for e in events if e.self_cpu_time_total > 0]
    # The GPU side of a record_function range is a device event too, spanning all its kernels: not a kernel.
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    annotations = {e.name for e in events if e.device_type == DeviceType.CUDA and e.is_user_annotation}
    records = [(k.name, k.duration, lineage(e)) for e in events if e.device_type == DeviceType.CPU
               for k in e.kernels if k.name not in annotations]
    # A kernel the profiler could not link to an op still counts, by its name alone.
    linked = Counter(name for name, _, _ in records)
    for e in kernels:
        if linked[e.name] > 0:
            linked[e.name] -= 1
        else:
            records.append((e.name, e.time_range.elapsed_us(), ()))
    return records


def profile_variant(name: str, config, state, args, dtype, device) -> dict:
    variant = VARIANTS[name]
    batches = make_batches(config.block_size, args.batch_size, args.warmup + 2 * args.steps, device)
    model, runner, optimizer = build(config, state, variant, device)
    for batch in batches[:args.warmup]:
        train_step(model, runner, optimizer, batch, dtype)
    step_ms = []
    for batch in batches[args.warmup:args.warmup + args.steps]:
        with StepTimer(device) as timer:
            train_step(model, runner, optimizer, batch, dtype)
        step_ms.append(timer.ms)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for batch in batches[args.warmup + args.steps:]:
            train_step(model, runner, optimizer, batch, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize()  # the profiled steps end with their kernels, as the timed ones do
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.trace) / f"trace-{name}-{device_slug(device)}.json.gz"))
    kernels = defaultdict(lambda: [0, 0.0])  # (short name, category) -> [calls, µs]
    for kernel, us, context in kernel_times(prof, device.type == "cuda"):
        entry = kernels[short(kernel), category(kernel, context)]
        entry[0] += 1
        entry[1] += us
    # Per step: the profiled steps are alike.
    return {"step_ms": statistics.median(step_ms),
            "kernels": {key: (calls / args.steps, us / 1e3 / args.steps) for key, (calls, us) in kernels.items()}}


def device_slug(device: torch.device) -> str:
    """The device's name as bench.common.write_results puts it in file names."""
    return environment()["device"].replace(" ", "-")


def markdown(header: str, results: dict[str, dict], cuda: bool) -> str:
    unit = "kernels" if cuda else "ops (CPU self time)"
    ran = {v: r for v, r in results.items() if "error" not in r}
    by_category = {v: defaultdict(float) for v in ran}
    for v, r in ran.items():
        for (_, cat), (_, ms) in r["kernels"].items():
            by_category[v][cat] += ms
    lines = [header, "", "## By category, ms per step", "",
             "| category | " + " | ".join(f"({v}) ms | ({v}) % of step" for v in ran) + " |",
             "|---|" + "---:|---:|" * len(ran)]
    categories = sorted({c for cats in by_category.values() for c in cats},
                        key=lambda c: -max(cats.get(c, 0.0) for cats in by_category.values()))
    for cat in categories:
        lines.append(f"| {cat} | " + " | ".join(
            f"{by_category[v].get(cat, 0.0):.2f} | {100 * by_category[v].get(cat, 0.0) / r['step_ms']:.1f}%"
            for v, r in ran.items()) + " |")
    totals = {v: sum(cats.values()) for v, cats in by_category.items()}
    lines.append(f"| **{unit}, total** | " + " | ".join(
        f"**{totals[v]:.2f}** | **{100 * totals[v] / r['step_ms']:.1f}%**" for v, r in ran.items()) + " |")
    if cuda:
        lines.append("| GPU idle (step - kernels) | " + " | ".join(
            f"{max(r['step_ms'] - totals[v], 0.0):.2f} | {100 * max(r['step_ms'] - totals[v], 0.0) / r['step_ms']:.1f}%"
            for v, r in ran.items()) + " |")
    lines.append("| **step (unprofiled median)** | " + " | ".join(
        f"**{r['step_ms']:.2f}** | 100%" for r in ran.values()) + " |")
    if "c" in ran and len(ran) > 1:
        base = next(v for v in ran if v != "c")
        deltas = sorted(((by_category["c"].get(cat, 0.0) - by_category[base].get(cat, 0.0), cat)
                         for cat in categories), reverse=True)
        more = ", ".join(f"{cat} {delta:+.2f}" for delta, cat in deltas if delta > 0)
        lines += ["", f"Where (c) spends more time than ({base}), ms per step: {more or 'nowhere'}."]
    for v, r in ran.items():
        top = sorted(r["kernels"].items(), key=lambda kv: -kv[1][1])[:TOP_KERNELS]
        lines += ["", f"## Top {unit}, ({v}) {VARIANTS[v].label}", "",
                  "| name | category | calls | ms | % of step |", "|---|---|---:|---:|---:|"]
        lines += [f"| `{k}` | {cat} | {calls:g} | {ms:.3f} | {100 * ms / r['step_ms']:.1f}% |"
                  for (k, cat), (calls, ms) in top]
    for v, r in results.items():
        if "error" in r:
            lines += ["", f"({v}) {VARIANTS[v].label}: failed: {r['error']}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2", help="a preset of model/config.py")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--variant", default="c,b", help="comma-separated, from bench/train_throughput.py's a, b, c, d")
    p.add_argument("--warmup", type=int, default=5, help="steps before any timing (compilation, autotuning)")
    p.add_argument("--steps", type=int, default=3, help="steps timed without the profiler, then as many with it")
    p.add_argument("--trace", metavar="DIR", help="also write each variant's chrome trace (gzipped) into DIR")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run of the logic")
    args = p.parse_args(argv)
    variants = args.variant.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.warmup < 1 or args.steps < 1 or args.batch_size < 1:
        p.error("--warmup, --steps and --batch-size must be at least 1 (compilation must fall in the warm-up)")
    try:
        config = preset(args.model, vocab_size=VOCAB_SIZE)
    except ValueError as e:
        p.error(str(e))
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    env = environment()
    torch.manual_seed(SEED)
    state = GPT(config).state_dict()
    results = {}
    for v in variants:
        print(f"profiling ({v}) {VARIANTS[v].label} ...", flush=True)
        if reason := skip_reason(VARIANTS[v], device):
            results[v] = {"error": reason}
            continue
        free_device_memory(device)
        try:
            results[v] = profile_variant(v, config, state, args, dtype, device)
        except Exception as e:  # a variant that fails is reported; the others still run
            results[v] = {"error": error_line(e)}
        free_device_memory(device)

    header = (f"# Training-step profile: {env['device']}\n\n"
              f"{'SMOKE RUN on CPU, fp32: the numbers mean nothing. ' if not cuda else ''}"
              f"`{args.model}` ({config.n_layer} layers, width {config.n_embd}), batch {args.batch_size} x "
              f"{config.block_size} tokens, {str(dtype).removeprefix('torch.')}, torch {env['torch']}, triton "
              f"{env['triton']}, {env['time_utc']}. `python -m bench.profile_step --model {args.model} --batch-size "
              f"{args.batch_size} --variant {args.variant}`: {args.warmup} warm-up steps, the median of {args.steps} "
              f"unprofiled steps as the step, {args.steps} profiled steps (torch.profiler) averaged "
              f"into kernel times per step.")
    text = markdown(header, results, cuda)
    print()
    print(text)
    if cuda:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"profile-{device_slug(device)}.md"
        path.write_text(text)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
