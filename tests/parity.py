"""The parity rule every kernel test uses (FlashAttention's): a kernel passes when its error against a
high-precision reference is at most `factor` times PyTorch's own error at the same precision, plus a small atol.

    max|ours - ref| <= factor * max|torch_same_dtype - ref| + atol

factor is 2 for outputs and 3 for gradients. The reference is fp32 for fp16/bf16 inputs and fp64 for fp32 inputs
(so that PyTorch's own fp32 error is measured rather than zero).

check_parity applies the rule to an op's outputs and every input's gradient, running op and its reference on fresh
leaves with the kernel's allocations poisoned; assert_deterministic checks that two runs agree bit for bit.
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


def forward_backward(fn, inputs: dict, upstream: list, dtype: torch.dtype | None = None,
                     requires_grad: tuple[str, ...] | None = None, **kwargs):
    """(fn's outputs as a tuple, {input name: gradient}) of fn(*inputs.values(), **kwargs) on fresh leaves.

    Each input tensor becomes a new leaf, cast to dtype when one is given (its strides kept otherwise); None stands for
    an optional input left out and is passed on as None. Gradients are taken for upstream (one per output; None for a
    scalar output) with respect to the inputs named in requires_grad (default: all of them); with none, there is no
    backward."""
    wanted = inputs.keys() if requires_grad is None else requires_grad
    leaves = {name: None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(name in wanted)
              for name, t in inputs.items()}
    outputs = fn(*leaves.values(), **kwargs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    wrt = {name: t for name, t in leaves.items() if t is not None and t.requires_grad}
    if not wrt:
        return outputs, {}
    upstream = [g if g is None else g.to(dtype or g.dtype) for g in upstream]
    return outputs, dict(zip(wrt, torch.autograd.grad(outputs, list(wrt.values()), upstream)))


def check_parity(op, reference, inputs: dict, upstream: list, dtype: torch.dtype, outputs: tuple[str, ...] = ("out",),
                 requires_grad: tuple[str, ...] | None = None, torch_context=contextlib.nullcontext, **kwargs) -> None:
    """op against reference by the rule above, on its outputs (named by `outputs`, for the messages) and the gradient
    of each input in requires_grad (default: all). The reference runs on the inputs cast to reference_dtype(dtype),
    and in dtype (inside torch_context()) for PyTorch's own error; op runs in dtype with every torch.empty* poisoned.
    kwargs go to both."""
    truth = forward_backward(reference, inputs, upstream, reference_dtype(dtype), requires_grad, **kwargs)
    with torch_context():
        torch_same_dtype = forward_backward(reference, inputs, upstream, dtype, requires_grad, **kwargs)
    with poisoned_allocations():
        ours = forward_backward(op, inputs, upstream, dtype, requires_grad, **kwargs)
    assert len(ours[0]) == len(truth[0]) == len(outputs), f"{len(ours[0])} outputs, expected {outputs}"
    for name, a, b, c in zip(outputs, ours[0], torch_same_dtype[0], truth[0]):
        assert_parity(name, a, b, c, OUTPUT_FACTOR, dtype)
    assert ours[1].keys() == truth[1].keys()
    for name in truth[1]:
        assert_parity(f"d{name}", ours[1][name], torch_same_dtype[1][name], truth[1][name], GRAD_FACTOR, dtype)


def assert_deterministic(fn, inputs: dict, upstream: list, runs: int = 2, **kwargs) -> None:
    """fn's outputs and gradients are bitwise equal over `runs` runs on the same inputs; kwargs go to
    forward_backward."""
    first_outputs, first_grads = forward_backward(fn, inputs, upstream, **kwargs)
    for _ in range(runs - 1):
        outputs, grads = forward_backward(fn, inputs, upstream, **kwargs)
        for i, (a, b) in enumerate(zip(first_outputs, outputs)):
            assert torch.equal(a, b), f"output {i} differs between runs on the same inputs"
        for name in first_grads:
            assert torch.equal(first_grads[name], grads[name]), f"d{name} differs between runs on the same inputs"
