"""Triton kernels for a GPT's hot paths, each beside the eager PyTorch twin it is tested against.

This package knows nothing of the model: every op takes plain tensors.
"""
from kernels.attention import attention_eager, flash_attention
from kernels.mlp import MLPOptions, gelu_mlp, gelu_mlp_eager
from kernels.layernorm import add_layer_norm, add_layer_norm_eager, layer_norm, layer_norm_eager

__all__ = [
    "flash_attention", "attention_eager",
    "layer_norm", "layer_norm_eager", "add_layer_norm", "add_layer_norm_eager",
    "gelu_mlp", "gelu_mlp_eager", "MLPOptions",
]
