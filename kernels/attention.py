"""Causal multi-head attention: the eager PyTorch twin (reference and CPU path).

The Triton flash-attention kernel and its autograd Function go here beside it.
"""
import torch
import torch.nn.functional as F


def attention_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(q @ k^T * scale [+ causal mask]) @ v for q, k, v of shape (batch, heads, seq_len, head_dim)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale)


def flash_attention(q, k, v, causal=True, softmax_scale=None):
    raise NotImplementedError("the Triton flash attention is not written yet; use attention='torch'")
