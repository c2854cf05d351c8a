"""Run under torchrun by tests/test_fsdp.py: one optimizer step of a small GPT under FSDP2 several ways, each from
the same weights on the same micro-batches, with what each rank holds of its training state. Rank 0 prints one
line, RESULT followed by JSON."""
import functools
import json
import math
import os

import torch
from torch.distributed.tensor import DTensor

from tritongpt import distributed
from tritongpt.checkpoint import nonfinite_weights
from tritongpt.loop import train_step
from tritongpt.model import GPT, GPTConfig
from tritongpt.model.config import OP_FIELDS
from tritongpt.optim import adamw

# 401 tokens and 24 positions: first dimensions that 2 ranks cannot split evenly.
CONFIG = GPTConfig(vocab_size=401, block_size=24, n_layer=2, n_head=2, n_embd=32)
MICRO_STEPS, BATCH = 2, 2  # micro-batches per rank: the first one's backward skips the reduction


def local_bytes(tensors) -> int:
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in tensors)


def one_step(world: distributed.World, ops: str, compile: bool = False, replicate: int = 1,
             reshard_after_forward: bool = True) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**CONFIG.__dict__, **{op: ops for op in OP_FIELDS}}))
    _, net = distributed.wrap_model(model, world, compile, replicate, reshard_after_forward)
    optimizer = adamw(model.parameters(), 0.1, 1e-3, (0.9, 0.95), "cpu")
    held = {}
    optimizer.register_step_pre_hook(  # the gradients exist between the backward and the step
        lambda *_: held.update(gradients=local_bytes(p.grad for p in model.parameters())))
    reductions = []  # FSDP's gradient reductions: one per unit and step, on the last micro-batch alone
    reduce_scatter = torch.distributed.reduce_scatter_single
    torch.distributed.reduce_scatter_single = lambda *a, **k: reductions.append(1) or reduce_scatter(*a, **k)
    data = torch.Generator().manual_seed(1 + world.rank)  # each rank its own micro-batches
    tokens = torch.randint(0, CONFIG.vocab_size, (MICRO_STEPS, BATCH, CONFIG.block_size + 1), generator=data)
    no_scaling, no_autocast = torch.amp.GradScaler("cpu", enabled=False), torch.autocast("cpu", enabled=False)
    loss, grad_norm = train_step(model, net, [optimizer], no_scaling, [(t[:, :-1], t[:, 1:]) for t in tokens],
                                 MICRO_STEPS, no_autocast, grad_clip=1.0)
    torch.distributed.reduce_scatter_single = reduce_scatter
    held.update(weights=local_bytes(model.parameters()),
                optimizer=local_bytes(s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")))
    loss = distributed.sum_across_ranks(loss, world).item() / world.size
    # train.py's divergence guard before a checkpoint: a nan in one rank's shard alone stops every rank.
    if world.rank == world.size - 1:
        with torch.no_grad():
            model.transformer.wpe.weight.to_local()[-1, 0] = math.nan
    nan_seen = distributed.max_on_host(len(nonfinite_weights(model.state_dict())), world) > 0
    with torch.device("meta"):
        whole = GPT(CONFIG)
    return {"loss": loss, "grad_norm": grad_norm.item(), "held": distributed.gather_objects(held, world),
            "reductions": len(reductions), "nan_seen": nan_seen,
            "computed": {"ddp": distributed.training_state_bytes(whole),
                         "fsdp": distributed.training_state_bytes(whole, world.size)}}


def main():
    world = distributed.World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), torch.device("cpu"), "fsdp")
    distributed.join(world)
    # aot_eager: the graphs around FSDP's hooks and the ops, without Inductor's minutes of C++ compilation on a CPU.
    torch.compile = functools.partial(torch.compile, backend="aot_eager")
    result = {"torch": one_step(world, "torch"),
              "triton": one_step(world, "triton"),
              "compiled": one_step(world, "torch", compile=True),
              "hsdp": one_step(world, "torch", replicate=world.size, reshard_after_forward=False)}
    distributed.barrier(world)
    distributed.leave(world)
    if world.is_main:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
