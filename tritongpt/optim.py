"""The optimizers: AdamW on every parameter, or Muon on the hidden matrices and AdamW on the rest.

Muon (torch.optim.Muon) steps each matrix along its gradient's momentum orthogonalised by a few Newton-Schulz
iterations, so that every direction of the matrix moves about as far, where AdamW's steps follow the few directions
that dominate the gradient. As in the modded-nanogpt speedrun, only the 2-D weights inside the blocks take it
(attention's qkv and output projections, the MLP's two matrices); the embeddings (the token embedding is also the
tied LM head), the LayerNorm gains and the biases keep AdamW.

Under FSDP each rank holds a shard of every matrix, as a DTensor: the Newton-Schulz products on it are the whole
matrix's (DTensor gathers what each needs), so Muon takes the step one process would, at the cost of that
communication.

A run's optimizers are a list (AdamW alone, or Muon then AdamW) that the training step steps in turn and the
checkpoint saves one by one. Muon's peak learning rate is --muon-lr, AdamW's --learning-rate; the schedule scales
both by the same factor, read from the options at every step (so a resumed run takes a rate given anew).
"""
from collections.abc import Iterable

import torch
import torch.nn as nn

OPTIMIZERS = ("adamw", "muon")
# torch.optim.Muon's ways of scaling a matrix's step by its shape (A x B): "original" by sqrt(max(1, A / B)), so
# that the step's spectral norm follows sqrt(fan-out / fan-in) at any width; "match_rms_adamw" by
# 0.2 sqrt(max(A, B)), which gives the step the RMS of a typical AdamW step, so that AdamW's rate carries over.
MUON_LR_ADJUSTMENTS = ("original", "match_rms_adamw")


def adamw(params: Iterable[nn.Parameter], weight_decay: float, learning_rate: float, betas: tuple[float, float],
          device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (every 2-D weight, embeddings included) and none on biases and
    LayerNorm gains; the fused CUDA implementation on GPU."""
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


def hidden_matrices(model: nn.Module) -> list[str]:
    """The names of the parameters Muon takes: the 2-D weights inside the transformer's blocks."""
    return [name for name, p in model.named_parameters() if name.startswith("transformer.h.") and p.dim() == 2]


def configure_optimizers(model: nn.Module, opts, device_type: str) -> list[torch.optim.Optimizer]:
    """The optimizers that opts (train.py's options) ask for, over the model's trainable parameters."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}  # the tied weight once
    betas = (opts.beta1, opts.beta2)
    if opts.optimizer == "adamw":
        optimizers = [adamw(params.values(), opts.weight_decay, opts.learning_rate, betas, device_type)]
    else:
        hidden = set(hidden_matrices(model))
        muon = torch.optim.Muon([p for name, p in params.items() if name in hidden], lr=opts.muon_lr,
                                weight_decay=opts.muon_weight_decay, momentum=opts.muon_momentum,
                                ns_steps=opts.muon_ns_steps, adjust_lr_fn=opts.muon_adjust_lr)
        rest = adamw([p for name, p in params.items() if name not in hidden], opts.weight_decay, opts.learning_rate,
                     betas, device_type)
        optimizers = [muon, rest]
    return optimizers


def scale_learning_rates(optimizers: list[torch.optim.Optimizer], factor: float, opts) -> None:
    """Sets every group's learning rate to factor times its optimizer's peak rate in opts."""
    for optimizer in optimizers:
        peak = opts.muon_lr if isinstance(optimizer, torch.optim.Muon) else opts.learning_rate
        for group in optimizer.param_groups:
            group["lr"] = factor * peak
