"""Bitwise repeatability on a GPU: two processes, one after the other, train GPT-2 124M with every op on the Triton
kernels (train.py's default on a GPU) from the same weights on the same batches, and their losses must be equal bit
for bit at every step.

    python -m bench.repeatability            # writes bench/results/repeatability-<device>.json

This is what `train.py --resume` relies on to continue a run exactly. Each process runs train_throughput's variant (c)
step (bf16 autocast, gradient clipping, fused AdamW) for --steps steps at --batch-size sequences of 1024 tokens.
Nothing in the kernels is atomic or timing-dependent, and the autotuners' choices are cached on disk
(kernels/_common.autotune), so the second process multiplies with the tiles the first chose: any difference is a bug.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import environment, require_cuda, write_results
from bench.train_throughput import SEED, VARIANTS, VOCAB_SIZE, build, make_batches, resolve_device, train_step
from tritongpt.model.config import preset
from tritongpt.model.gpt import GPT

MODEL, VARIANT = "gpt2", "c"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="optimizer steps in each process")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--dry-run", action="store_true", help="print what would run and exit without touching a GPU")
    p.add_argument("--losses-to", type=Path, help=argparse.SUPPRESS)  # set by the parent for each child process
    return p.parse_args(argv)


def train_losses(steps: int, batch_size: int) -> list[float]:
    """One process's losses: the model built from SEED, trained on SEED's batches."""
    device = resolve_device("cuda")
    config = preset(MODEL, vocab_size=VOCAB_SIZE)
    torch.manual_seed(SEED)
    state = GPT(config).state_dict()
    model, runner, optimizer = build(config, state, VARIANTS[VARIANT], device)
    batches = make_batches(config.block_size, batch_size, steps, device)
    return [train_step(model, runner, optimizer, batch, torch.bfloat16).item() for batch in batches]


def main(argv=None):
    args = parse_args(argv)
    if args.losses_to is not None:
        args.losses_to.write_text(json.dumps([loss.hex() for loss in train_losses(args.steps, args.batch_size)]))
        return
    print(f"repeatability: two processes train {MODEL} ({VARIANT}: {VARIANTS[VARIANT].label}) for {args.steps} "
          f"steps of {args.batch_size} x 1024 tokens from seed {SEED}; their losses must be bitwise equal", flush=True)
    if args.dry_run:
        return
    require_cuda()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2):
            out = Path(tmp) / f"losses-{i}.json"
            subprocess.run([sys.executable, "-m", "bench.repeatability", "--steps", str(args.steps),
                            "--batch-size", str(args.batch_size), "--losses-to", str(out)], check=True)
            runs.append([float.fromhex(h) for h in json.loads(out.read_text())])
    first, second = runs
    differing = [i for i, (a, b) in enumerate(zip(first, second)) if a.hex() != b.hex()]
    equal = not differing and len(first) == len(second) == args.steps
    path = write_results("repeatability", {
        "environment": environment(), "model": MODEL, "variant": VARIANT, "steps": args.steps,
        "batch_size": args.batch_size, "seed": SEED, "losses": runs, "bitwise_equal": equal,
        "first_differing_step": differing[0] if differing else None})
    for i, (a, b) in enumerate(zip(first, second)):
        print(f"step {i}: {a!r:<22} {b!r:<22} {'equal' if a.hex() == b.hex() else f'DIFFERENT by {abs(a - b):.3g}'}")
    print(f"{'PASS' if equal else 'FAIL'}: losses of two processes are "
          f"{'bitwise equal' if equal else 'not bitwise equal'} over {args.steps} steps; results in {path}")
    sys.exit(0 if equal else 1)


if __name__ == "__main__":
    main()
