"""The parity rule every kernel test uses (FlashAttention's): a kernel passes when its error against a
high-precision reference is at most `factor` times PyTorch's own error at the same precision, plus a small atol.

    max|ours - ref| <= factor * max|torch_same_dtype - ref| + atol

factor is 2 for outputs and 3 for gradients. The reference is fp32 for fp16/bf16 inputs and fp64 for fp32 inputs
(so that PyTorch's own fp32 error is measured rather than zero).
"""
import contextlib
from unittest import mock

import torch

OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def assert_parity(name: str, ours: torch.Tensor, torch_same_dtype: torch.Tensor, reference: torch.Tensor,
                  factor: float, dtype: torch.dtype, atol: float | None = None) -> None:
    assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    assert ours.dtype == torch_same_dtype.dtype, f"{name}: dtype {ours.dtype} != {torch_same_dtype.dtype}"
    ours64, torch64, ref64 = (t.detach().double().cpu() for t in (ours, torch_same_dtype, reference))
    assert torch.isfinite(ours64).all(), f"{name}: non-finite values (an output element left unwritten?)"
    err = (ours64 - ref64).abs().max().item() if ours64.numel() else 0.0
    torch_err = (torch64 - ref64).abs().max().item() if torch64.numel() else 0.0
    bound = factor * torch_err + (ATOL[dtype] if atol is None else atol)
    assert err <= bound, f"{name}: max error {err:.3e} > {factor} x torch's {torch_err:.3e} + atol = {bound:.3e}"


def _poisoned(factory):
    def make(*args, **kwargs):
        t = factory(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1234567)
    return make


@contextlib.contextmanager
def poisoned_allocations():
    """Inside this block torch.empty* return tensors full of NaN (ints: garbage), so any output element a kernel
    forgets to write shows up as a failure instead of passing on a lucky zero."""
    with mock.patch("torch.empty", _poisoned(torch.empty)), \
            mock.patch("torch.empty_like", _poisoned(torch.empty_like)), \
            mock.patch("torch.empty_strided", _poisoned(torch.empty_strided)):
        yield
