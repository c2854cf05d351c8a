"""GPT-2 training throughput on one GPU, bf16, seq_len 1024: the same model, data and batch trained four ways.

    python -m bench.train_throughput                        # GPT-2 124M, variants a, b, c, d
    python -m bench.train_throughput --models gpt2-medium   # 350M: a separate run (see the time budget below)
    python -m bench.train_throughput --variants a,c --largest-batch 512 --steps 5 --warmup 2
                                                            # each at the largest micro-batch that fits
    python -m bench.train_throughput --quick                # b against c and d, 3 warm-up and 5 timed steps
    python -m bench.train_throughput --quick --parallel fsdp  # the same, each model under FSDP2 (a world of one)
    TRITON_INTERPRET=1 python -m bench.train_throughput --device cpu --models tiny --batch-size 2 --steps 3 --warmup 1

Variants (a and b run attention on PyTorch's SDPA and the other ops on their eager PyTorch references):
  a  eager PyTorch, SDPA attention               b  a + torch.compile of the model: the nanoGPT recipe
  c  every op on this project's Triton kernels   d  c + torch.compile of the rest

Each variant starts from the same weights (one model built with a fixed seed, its state_dict loaded into each) and
trains on the same batches (tokens drawn from a Zipf distribution over the 50257-token vocabulary with a fixed
generator, so that the loss falls as the model learns the token frequencies and the variants are compared while it
moves, not on a plateau). The step is train.py's own (tritongpt.loop.train_step): bf16 autocast, backward, gradient
clipping at 1.0, AdamW (fused on CUDA, GPT-2's lr 6e-4, betas (0.9, 0.95), weight decay 0.1). Each step is timed with
CUDA events and ends with a synchronize, so a step's time is honest; compilation and autotuning fall in the warm-up
steps. Per variant: tokens/s from the median steady-state step, MFU against the measured cuBLAS bf16 matmul peak
and against the datasheet peak (tritongpt.metrics.peak_bf16_flops), peak memory, the loss at every step, the raw step
times, the graph breaks of a compiled variant, and its error text if it failed (an OOM, a compile or Triton error
is recorded and the next variant runs: one bad variant must not cost the rest of a GPU session). The final losses
must agree with variant (a)'s (PASS/FAIL per variant). Writes bench/results/train_throughput-<models>-<device>.json
after every variant, so a run cut short keeps what it finished.

--largest-batch MAX runs each variant at --batch-size, then at twice that, and so on up to MAX, until a step fails
(out of memory), and reports it at the largest batch that ran, with every attempt's outcome: the Triton loss never
holds the N x V logits, which at GPT-2's vocabulary are the largest activations of eager PyTorch's step. The loss
check then compares only variants that ran the same batch.

Targets on an H100 (a benchmark's, not a test's): (c) or (d) at least 1.1x (b) in tokens/s; MFU at least 50% of the
datasheet peak.

Time budget (estimates from FLOP counts, not measurements). GPT-2 124M at batch 16 is 16K tokens a
step, ~0.86 GFLOP a token, so a step takes ~30-80 ms and 40 steps x 4 variants ~10 s; the rest is start-up: cuBLAS
peak ~5 s, torch.compile of (b) and (d) ~1-2 min each on a fresh machine (no Inductor cache), the Triton autotuning
of (c) ~1 min. About 5 min for gpt2 on an H100. gpt2-medium (350M) is ~3x the FLOPs and compiles twice the layers:
~6 min more, so it is not in the default; run it on its own (memory is no issue: it fits an 80 GB GPU at batch 16).

--parallel fsdp wraps each variant's model as train.py's --parallel fsdp does (FSDP2's fully_shard on each Block and
the model, bf16 weights gathered for compute, float32 gradient reduction), in a world of one: on one GPU it measures
what FSDP2's machinery costs in tokens/s and peak memory against the same variant without it (the shards' savings
need several GPUs; the README computes them). Its results go to train_throughput-<models>-fsdp-<device>.json.

--device cpu is a smoke run of the logic (fp32, as the project computes on CPU; meaningless numbers, nothing
written to bench/results). Variants (c) and (d) then need TRITON_INTERPRET=1 set before Python starts (the kernels
read it when they are defined); without it they are skipped with that reason.
"""
import argparse
import gc
import json
import math
import statistics
import time
import traceback
from dataclasses import replace
from typing import NamedTuple

import torch

from bench.common import (bench_args, environment, matmul_peak_tflops, print_table, require_cuda, results_name,
                          write_results)
from tritongpt import distributed
from tritongpt.kernels._common import interpreting
from tritongpt.model.config import OP_FIELDS, preset
from tritongpt.metrics import mfu, peak_bf16_flops
from tritongpt.model.gpt import GPT
from tritongpt.device import autocast
from tritongpt.loop import train_step as trainer_step
from tritongpt.optim import adamw

VOCAB_SIZE = 50257
SEED = 1337
LEARNING_RATE, BETAS, WEIGHT_DECAY, GRAD_CLIP = 6e-4, (0.9, 0.95), 0.1, 1.0
# The variants round differently (bf16 has 8 significant bits; fused kernels and Inductor round at other points than
# eager ops), and the difference compounds over the optimizer steps. The loss is a mean over B·T tokens, so per-token
# rounding averages out and what remains is a slow drift of the trajectories: eager vs compiled bf16 GPT-2 runs drift
# by ~1e-3..1e-2 in tens of steps. 0.02 absolute + 1% relative covers that drift; a wrong gradient in any op moves
# the loss further within 30 steps (and the parity tests hold each op to its twin in any case).
LOSS_ATOL, LOSS_RTOL = 0.02, 0.01
VS_B_TARGET, MFU_TARGET = 1.1, 0.5  # the project's targets on an H100, for (c) or (d)
STEPS, WARMUP = 30, 10
QUICK_STEPS, QUICK_WARMUP, QUICK_VARIANTS = 5, 3, "b,c,d"


class Variant(NamedTuple):
    label: str
    ops: dict[str, str]  # each op field of the model's config and its implementation
    compile: bool        # torch.compile the model


EAGER_OPS = {**{op: "torch" for op in OP_FIELDS}, "attention": "sdpa"}
TRITON_OPS = {op: "triton" for op in OP_FIELDS}
VARIANTS = {
    "a": Variant("eager, SDPA", EAGER_OPS, False),
    "b": Variant("SDPA + torch.compile (nanoGPT)", EAGER_OPS, True),
    "c": Variant("Triton kernels", TRITON_OPS, False),
    "d": Variant("Triton kernels + torch.compile", TRITON_OPS, True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="gpt2",
                   help="comma-separated presets (model/config.py): gpt2, gpt2-medium, ...; tiny for a smoke run")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (of the preset's block_size)")
    p.add_argument("--steps", type=int,
                   help=f"timed steps after the warm-up (default {STEPS}; {QUICK_STEPS} with --quick)")
    p.add_argument("--warmup", type=int, help="untimed steps first, for compilation and autotuning "
                                              f"(default {WARMUP}; {QUICK_WARMUP} with --quick)")
    p.add_argument("--variants",
                   help="comma-separated, from: " + "; ".join(f"{k} = {v.label}" for k, v in VARIANTS.items())
                   + f" (default {','.join(VARIANTS)}; {QUICK_VARIANTS} with --quick)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run of the logic")
    p.add_argument("--parallel", choices=distributed.PARALLELISMS, default="ddp",
                   help="fsdp: each model under FSDP2, in a world of one (ddp: the model as it is, on one GPU)")
    p.add_argument("--largest-batch", type=int, metavar="MAX",
                   help="double each variant's batch from --batch-size up to MAX until a step fails; report the "
                        "largest that ran")
    args = bench_args(__doc__, f"nanoGPT's recipe (b) against the Triton kernels (c, d): variants {QUICK_VARIANTS}, "
                               f"{QUICK_WARMUP} warm-up and {QUICK_STEPS} timed steps", argv, parser=p)
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else STEPS
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else WARMUP
    args.models = args.models.split(",")
    args.variants = (args.variants or (QUICK_VARIANTS if args.quick else ",".join(VARIANTS))).split(",")
    for name in args.models:
        try:
            preset(name)  # fail here, with the list of presets, rather than after minutes of GPU time
        except ValueError as e:
            p.error(str(e))
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.warmup < 1 or args.steps < 1 or args.batch_size < 1:
        p.error("--warmup, --steps and --batch-size must be at least 1 (compilation must fall in the warm-up)")
    if args.largest_batch is not None and args.largest_batch < args.batch_size:
        p.error(f"--largest-batch {args.largest_batch} is below --batch-size {args.batch_size}; give a larger MAX")
    return args


def resolve_device(option: str) -> torch.device:
    if option == "cpu":
        return torch.device("cpu")
    device = require_cuda()
    if interpreting():
        raise SystemExit("error: TRITON_INTERPRET is set, so the Triton kernels would run in the CPU interpreter; "
                         "unset it for a GPU run")
    return device


def make_batches(block_size: int, batch_size: int, n_steps: int, device: torch.device) -> torch.Tensor:
    """(n_steps, batch_size, block_size + 1) token ids, Zipf-distributed (p ∝ 1/rank), from a fixed generator."""
    generator = torch.Generator().manual_seed(SEED)
    probs = 1.0 / torch.arange(1, VOCAB_SIZE + 1, dtype=torch.float64)
    tokens = torch.multinomial(probs, n_steps * batch_size * (block_size + 1), replacement=True, generator=generator)
    return tokens.view(n_steps, batch_size, block_size + 1).to(device)


def build(config, state: dict, variant: Variant, device: torch.device, parallel: str = "ddp",
          dtype: torch.dtype = torch.bfloat16):
    """(model, what to call, optimizer) for one variant, starting from the reference weights in state, wrapped as
    train.py wraps it alone (compiled; under FSDP, sharded in a world of one, computing in dtype)."""
    world = distributed.World(0, 1, device, parallel)
    with torch.device(device):  # initialise on the device (fast), then overwrite with the shared weights
        model = GPT(replace(config, **variant.ops))
    model.load_state_dict(state)
    _, runner = distributed.wrap_model(model, world, variant.compile, dtype=dtype)
    optimizer = adamw(model.parameters(), WEIGHT_DECAY, LEARNING_RATE, BETAS, device.type)
    return model, runner, optimizer


def train_step(model, runner, optimizer, batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """train.py's own optimizer step (tritongpt.loop.train_step) on one micro-batch, bf16 needing no gradient
    scaling; returns the loss (on the device). The step labels its phases for a profile (bench/profile_step.py)."""
    no_scaling = torch.amp.GradScaler(batch.device.type, enabled=False)
    loss, _ = trainer_step(model, runner, [optimizer], no_scaling, [(batch[:, :-1], batch[:, 1:])], 1,
                           autocast(dtype, batch.device), GRAD_CLIP)
    return loss


class StepTimer:
    """Milliseconds of one step: CUDA events around it and a synchronize after, so the step's queued kernels are
    all counted in it; wall-clock time on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def skip_reason(variant: Variant, device: torch.device) -> str | None:
    """Why a variant cannot run here, or None."""
    if "triton" in variant.ops.values() and device.type == "cpu" and not interpreting():
        return "skipped: the Triton kernels on CPU need TRITON_INTERPRET=1 set before Python starts"
    return None


def error_line(e: Exception) -> str:
    return f"{type(e).__name__}: {next(iter(str(e).strip().splitlines()), '')[:300]}"


def free_device_memory(device: torch.device) -> None:
    torch._dynamo.reset()  # compiled graphs hold on to the last variant's model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(config, state, variant: Variant, batches: torch.Tensor, warmup: int, dtype, device, parallel) -> dict:
    """Train one variant for len(batches) steps; its step times, losses and peak memory."""
    model, runner, optimizer = build(config, state, variant, device, parallel, dtype)
    step_ms, losses = [], []
    started = time.perf_counter()
    for i, batch in enumerate(batches):
        with StepTimer(device) as timer:
            loss = train_step(model, runner, optimizer, batch, dtype)
        step_ms.append(timer.ms)
        losses.append(loss.item())
        if i == warmup - 1:
            warmup_s = time.perf_counter() - started
    return {"step_ms": step_ms, "losses": losses, "warmup_s": warmup_s,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def run_variant(name: str, reference: GPT, state: dict, batches, args, dtype, device, peak_tflops) -> dict:
    """One variant's record: its measurements and the rates derived from them, or the error that stopped it."""
    variant, config = VARIANTS[name], reference.config
    row = {"variant": name, "label": variant.label, "ops": variant.ops, "compile": variant.compile,
           "batch_size": batches.shape[1], "error": skip_reason(variant, device)}
    if row["error"] is not None:
        return row
    free_device_memory(device)
    torch._dynamo.utils.counters.clear()
    try:
        row.update(measure(config, state, variant, batches, args.warmup, dtype, device, args.parallel))
    except Exception as e:  # an OOM, a compile or Triton error: record it, free the memory, run the next variant
        row["error"] = error_line(e)
        row["traceback"] = traceback.format_exc()[-6000:]
    if variant.compile:  # a break splits the graph: the kernels on either side of it are not fused across it
        breaks = torch._dynamo.utils.counters["graph_break"]
        row["graph_breaks"] = sum(breaks.values())
        row["graph_break_reasons"] = {reason[:300]: n for reason, n in breaks.most_common(10)}
    free_device_memory(device)
    if row["error"] is None:
        row["median_step_ms"] = statistics.median(row["step_ms"][args.warmup:])
        row["tokens_per_sec"] = row["batch_size"] * config.block_size / (row["median_step_ms"] * 1e-3)
        flops_per_sec = reference.flops_per_token() * row["tokens_per_sec"]
        row["mfu_measured_peak"] = None if peak_tflops is None else flops_per_sec / (peak_tflops * 1e12)
        row["mfu_datasheet"] = mfu(reference.flops_per_token(), row["tokens_per_sec"], device)
        row["final_loss"] = row["losses"][-1]
    return row


def run_largest_batch(name: str, reference: GPT, state: dict, args, dtype, device, peak_tflops) -> dict:
    """One variant's record at the largest batch that ran (--batch-size doubled up to --largest-batch until a step
    failed), with every attempt's batch size, tokens/s, peak memory and error under "attempts"."""
    attempts, last_ran, batch_size = [], None, args.batch_size
    while batch_size <= args.largest_batch:
        batches = make_batches(reference.config.block_size, batch_size, args.warmup + args.steps, device)
        row = run_variant(name, reference, state, batches, args, dtype, device, peak_tflops)
        del batches
        attempts.append({key: row.get(key) for key in ("batch_size", "tokens_per_sec", "peak_mem_gib", "error")})
        peak = "" if row.get("peak_mem_gib") is None else f", peak {row['peak_mem_gib']:.1f} GiB"
        print(f"  batch {batch_size}: " + (row["error"] or f"{row['tokens_per_sec']:,.0f} tokens/s{peak}"), flush=True)
        if row["error"] is not None:
            break
        last_ran, batch_size = row, 2 * batch_size
    record = last_ran or row
    record["attempts"] = attempts
    return record


def compare(rows: list[dict]) -> None:
    """Fill in each finished variant's speed relative to (b) and its loss check against (a) (else the first that
    ran): rows are one model's."""
    done = {r["variant"]: r for r in rows if r["error"] is None}
    if not done:
        return
    reference = done.get("a", next(iter(done.values())))
    for r in done.values():
        r["vs_b"] = r["tokens_per_sec"] / done["b"]["tokens_per_sec"] if "b" in done else None
        if r["batch_size"] != reference["batch_size"]:
            r.update(loss_reference=reference["variant"], loss_diff=None, loss_check="other batch")
            continue
        diff = abs(r["final_loss"] - reference["final_loss"])
        within = math.isfinite(diff) and diff <= LOSS_ATOL + LOSS_RTOL * abs(reference["final_loss"])
        r.update(loss_reference=reference["variant"], loss_diff=diff, loss_check="PASS" if within else "FAIL")


def targets(rows: list[dict]) -> list[dict]:
    """The targets, for the faster of (c) and (d): one model's rows."""
    ours = [r for r in rows if r["variant"] in ("c", "d") and r["error"] is None]
    if not ours:
        return []
    best = max(ours, key=lambda r: r["tokens_per_sec"])
    out = []
    for target, value, need in ((f"tokens/s >= {VS_B_TARGET}x (b)", best["vs_b"], VS_B_TARGET),
                                (f"MFU >= {MFU_TARGET:.0%} of the datasheet peak", best["mfu_datasheet"], MFU_TARGET)):
        if value is not None:
            out.append({"variant": best["variant"], "target": target, "value": value, "met": value >= need})
    return out


def table_row(model_name: str, r: dict) -> dict:
    def pct(x):
        return None if x is None else f"{100 * x:.1f}%"
    ok = r["error"] is None
    return {"variant": f"({r['variant']}) {r['label']}", "model": model_name, "batch": r["batch_size"],
            "tokens/s": f"{r['tokens_per_sec']:,.0f}" if ok else None,
            "x (b)": f"{r['vs_b']:.2f}" if ok and r["vs_b"] is not None else None,
            "MFU meas. peak": pct(r.get("mfu_measured_peak")), "MFU datasheet": pct(r.get("mfu_datasheet")),
            "peak GiB": r.get("peak_mem_gib"), "final loss": f"{r['final_loss']:.4f}" if ok else None,
            "loss": r.get("loss_check"), "graph breaks": r.get("graph_breaks"), "error": r["error"] and r["error"][:80]}


def main(argv=None):
    args = parse_args(argv)
    print(f"{', '.join(args.models)}: variants {', '.join(f'({v}) {VARIANTS[v].label}' for v in args.variants)}; "
          f"batch {args.batch_size}" + (f" doubling up to {args.largest_batch}" if args.largest_batch else "")
          + f", {args.warmup} warm-up and {args.steps} timed steps"
          + (", each model under FSDP2 (a world of one)" if args.parallel == "fsdp" else ""), flush=True)
    if args.dry_run:
        return
    device = resolve_device(args.device)
    world = distributed.World(0, 1, device, args.parallel)
    distributed.join(world)  # FSDP's process group of one
    try:
        run_all(args, device)
    finally:
        distributed.leave(world)


def run_all(args, device: torch.device) -> None:
    smoke = device.type == "cpu"
    dtype = torch.float32 if smoke else torch.bfloat16  # GPU training runs in bf16; the project computes in fp32 on CPU
    env = environment()
    peak_tflops = None if smoke else matmul_peak_tflops()
    datasheet = peak_bf16_flops(device)
    print(f"{env['device']}: torch {env['torch']}, triton {env['triton']}; measured bf16 matmul peak "
          f"{'-' if peak_tflops is None else f'{peak_tflops:.0f}'} TFLOP/s, datasheet "
          f"{'unknown' if datasheet is None else f'{datasheet / 1e12:.0f}'} TFLOP/s", flush=True)
    results = {}
    payload = {"environment": env, "smoke_run": smoke, "matmul_peak_tflops": peak_tflops,
               "datasheet_peak_tflops": None if datasheet is None else datasheet / 1e12,
               "dtype": str(dtype), "parallel": args.parallel, "batch_size": args.batch_size,
               "largest_batch": args.largest_batch, "steps": args.steps, "warmup": args.warmup,
               "data": f"Zipf(1) token ids over a {VOCAB_SIZE}-token vocabulary, torch.Generator seed {SEED}",
               "optimizer": {"name": "AdamW", "fused": not smoke, "lr": LEARNING_RATE, "betas": BETAS,
                             "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP},
               "loss_tolerance": {"atol": LOSS_ATOL, "rtol": LOSS_RTOL, "at": "the last step",
                                  "against": "variant a, else the first variant that ran"},
               "targets": {"tokens/s of c or d over b": VS_B_TARGET, "mfu_datasheet": MFU_TARGET}, "targets_met": {},
               "variants": {k: v._asdict() for k, v in VARIANTS.items()}, "results": results}
    name = results_name("train_throughput-" + "_".join(args.models) + ("-fsdp" if args.parallel == "fsdp" else ""),
                        args.quick)
    for model_name in args.models:
        config = preset(model_name, vocab_size=VOCAB_SIZE)
        torch.manual_seed(SEED)
        reference = GPT(config)  # on the CPU: the weights every variant starts from
        state = reference.state_dict()
        batches = None if args.largest_batch else make_batches(config.block_size, args.batch_size,
                                                               args.warmup + args.steps, device)
        rows = results[model_name] = []
        for v in args.variants:
            print(f"{model_name} ({v}) {VARIANTS[v].label} ...", flush=True)
            if args.largest_batch:
                rows.append(run_largest_batch(v, reference, state, args, dtype, device, peak_tflops))
            else:
                rows.append(run_variant(v, reference, state, batches, args, dtype, device, peak_tflops))
            compare(rows)
            payload["targets_met"][model_name] = targets(rows)
            r = rows[-1]
            print("  " + (r["error"] or f"batch {r['batch_size']}: {r['tokens_per_sec']:,.0f} tokens/s, step "
                                        f"{r['median_step_ms']:.1f} ms, warm-up {r['warmup_s']:.0f} s, final loss "
                                        f"{r['final_loss']:.4f}"), flush=True)
            if smoke:
                json.dumps(payload)  # what a GPU run writes must serialise: find out here, not there
            else:
                write_results(name, payload)
        del reference, state, batches

    print()
    if smoke:
        print("SMOKE RUN on CPU (fp32, tiny shapes): the numbers below mean nothing, and nothing was written")
    else:
        print(f"results in {write_results(name, payload)}")
    for model_name, rows in results.items():
        for r in rows:
            if r["error"] is None and r["loss_diff"] is not None:
                print(f"loss {model_name} ({r['variant']}): {r['loss_check']}: final {r['final_loss']:.4f}, "
                      f"|diff| {r['loss_diff']:.4f} vs ({r['loss_reference']})")
        for t in payload["targets_met"][model_name]:
            print(f"target {model_name} ({t['variant']}) {t['target']}: {'met' if t['met'] else 'MISSED'} "
                  f"({t['value']:.2f})")
    print_table([table_row(m, r) for m, rows in results.items() for r in rows],
                ["variant", "model", "batch", "tokens/s", "x (b)", "MFU meas. peak", "MFU datasheet", "peak GiB",
                 "final loss", "loss", "graph breaks", "error"])


if __name__ == "__main__":
    main()
