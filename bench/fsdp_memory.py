"""Bytes per GPU of the weights, gradients and AdamW state of training, under DDP and under FSDP2, computed from the
models' shapes (README's table): float32 weights, float32 gradients and AdamW's two float32 moments, 16 bytes a
parameter. DDP holds all of them on every GPU; FSDP2 cuts each parameter along its first dimension into one piece a
GPU, so a GPU holds 1/N of them (the largest piece: uneven rows round up). Not counted: activations, the weights
of the one or two layers FSDP2 holds gathered (in bf16) while they compute, and the whole gradients of a layer
before their reduction.

    python -m bench.fsdp_memory                 # 8 GPUs
    python -m bench.fsdp_memory --gpus 8,64
"""
import argparse

import torch

from tritongpt.distributed import training_state_bytes
from tritongpt.model import GPT, GPTConfig, preset

# A 7B-parameter GPT-2-style shape: LLaMA-7B's 32 layers of width 4096 with 32 heads, GPT-2's vocabulary.
SHAPES = {name: preset(name) for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
SHAPES["7B (32 x 4096)"] = GPTConfig(n_layer=32, n_head=32, n_embd=4096, block_size=2048)


def table(gpus: list[int]) -> list[dict]:
    """One row a shape: its parameters, and the bytes per GPU under DDP and under FSDP2 on each count of GPUs."""
    rows = []
    for name, config in SHAPES.items():
        with torch.device("meta"):  # shapes alone: nothing is allocated
            model = GPT(config)
        row = {"model": name, "parameters": sum(p.numel() for p in model.parameters()),
               "ddp": training_state_bytes(model)}
        row.update({f"fsdp{n}": training_state_bytes(model, n) for n in gpus})
        rows.append(row)
    return rows


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default="8", help="comma-separated GPU counts for FSDP2 (default 8)")
    gpus = [int(n) for n in p.parse_args(argv).gpus.split(",")]
    print("| model | parameters | DDP, per GPU | " + " | ".join(f"FSDP2 on {n} GPUs, per GPU" for n in gpus) + " |")
    print("|---|---:|---:|" + "---:|" * len(gpus))
    for row in table(gpus):
        print(f"| {row['model']} | {row['parameters'] / 1e6:,.0f}M | {gib(row['ddp'])} | "
              + " | ".join(gib(row[f'fsdp{n}']) for n in gpus) + " |")


if __name__ == "__main__":
    main()
