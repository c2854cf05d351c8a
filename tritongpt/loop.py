"""The two things a training loop repeats: one optimizer step, and a loss estimate. train.py runs them; the
throughput benchmark times the very same step."""
import math
from collections.abc import Iterable

import torch
from torch.profiler import record_function

from tritongpt import distributed


def train_step(model: torch.nn.Module, net: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
               scaler: torch.amp.GradScaler, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               micro_steps: int, autocast, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over micro_steps (x, y) micro-batches: the gradients of their mean loss, all-reduced
    across ranks on the last one only, clipped to norm grad_clip (0: no clipping), then each optimizer's update.

    model is the bare model (its parameters are clipped), net what the forward calls (compiled and/or DDP-wrapped).
    Returns (mean loss, gradient norm before clipping), both left on the device so the step does not wait for it.
    The record_function labels name the phases in a profile and cost nothing measurable outside one.
    """
    loss_sum = None
    for i, (x, y) in enumerate(micro_batches):
        with distributed.gradient_sync(net, sync=i == micro_steps - 1):
            with record_function("forward"), autocast:
                _, loss = net(x, y)
                loss = loss / micro_steps
            with record_function("backward"):
                scaler.scale(loss).backward()
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
    with record_function("clip_grad_norm"):
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
        grad_norm = distributed.whole(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf))
    with record_function("optimizer"):
        for optimizer in optimizers:
            scaler.step(optimizer)  # (skipped, with fp16, when any gradient is inf or nan)
        scaler.update()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], autocast,
                  world: distributed.World) -> float:
    """The mean loss over (x, y) batches, this rank's share of them, averaged over every rank's batches (ranks
    may hold unequal shares, so sums and counts are added up rather than means averaged).

    A sharded model's forward is a collective, so there a rank with fewer batches than another runs its last one
    again, uncounted, until each has run as many (one with none runs a single token)."""
    owed = 0
    if world.sharded:
        batches = list(batches)
        owed = distributed.max_on_host(len(batches), world) - len(batches)
    model.eval()
    total = torch.zeros(2, device=world.device)
    batch = (torch.zeros(1, 1, dtype=torch.long, device=world.device),)
    for batch in batches:
        with autocast:
            total[0] += model(*batch)[1].float()
        total[1] += 1
    for _ in range(owed):
        with autocast:
            model(*batch)
    model.train()
    loss_sum, count = distributed.sum_across_ranks(total, world).tolist()
    return loss_sum / count
