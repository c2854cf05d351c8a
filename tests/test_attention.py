"""The Triton flash attention against its reference, by the parity rule of tests/parity.py.

Without a GPU the kernels run in Triton's interpreter, about 2 ms per program per loop step, so the CPU cases are
small (batch 1, 2 heads) and cover every seq_len, head_dim, dtype and causality of the plan without taking their
product. The GPU cases add bf16, long sequences and head_dim 256.
"""
import pytest
import torch

from kernels import attention_reference, flash_attention
from tests.parity import GRAD_FACTOR, OUTPUT_FACTOR, assert_parity, poisoned_allocations, reference_dtype

FACTORS = {"out": OUTPUT_FACTOR, "dq": GRAD_FACTOR, "dk": GRAD_FACTOR, "dv": GRAD_FACTOR}


def _forward_backward(attend, q, k, v, do, **kwargs):
    """(out, dq, dk, dv) of attend on fresh leaves made from q, k, v (their strides kept), with upstream grad do."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def _check_parity(q, k, v, do, **kwargs):
    """Ours against PyTorch at the same precision, both measured against PyTorch in higher precision."""
    dtype = q.dtype
    ref_dtype = reference_dtype(dtype)
    reference = _forward_backward(attention_reference, *(t.to(ref_dtype) for t in (q, k, v, do)), **kwargs)
    torch_same_dtype = _forward_backward(attention_reference, q, k, v, do, **kwargs)
    with poisoned_allocations():
        ours = _forward_backward(flash_attention, q, k, v, do, **kwargs)
    for name, a, b, c in zip(FACTORS, ours, torch_same_dtype, reference):
        assert_parity(name, a, b, c, FACTORS[name], dtype)


def _name(value) -> str:
    return str(value).removeprefix("torch.")


def _inputs(batch, heads, seq_len, head_dim, dtype, device):
    return [torch.randn(batch, heads, seq_len, head_dim, dtype=dtype, device=device) for _ in range(4)]


# Each seq_len of the plan with a different head_dim, both dtypes and both causalities across the set; seq_len 17,
# 97 and 200 are not multiples of the interpreter's blocks, head_dim 80 is not a power of two.
@pytest.mark.parametrize("seq_len, head_dim, dtype, causal", [
    (1, 64, torch.float16, True),
    (17, 80, torch.float32, False),
    (97, 16, torch.float16, False),
    (128, 128, torch.float16, True),
    (200, 32, torch.float32, True),
    (64, 64, torch.bfloat16, True),  # bf16 tiles go through fp32 dots under the interpreter
], ids=_name)
def test_parity(seq_len, head_dim, dtype, causal, device):
    _check_parity(*_inputs(1, 2, seq_len, head_dim, dtype, device), causal=causal)


def test_strided_inputs(device):
    """q as the model makes it (a view into one fused (batch, seq, 3·heads·head_dim) projection), k with head_dim
    not innermost, v with padded rows, and a transposed upstream gradient; also an explicit softmax scale."""
    batch, heads, seq_len, head_dim = 1, 2, 33, 48
    dtype = torch.float16
    qkv = torch.randn(batch, seq_len, 3 * heads * head_dim, dtype=dtype, device=device)
    q = qkv[..., :heads * head_dim].view(batch, seq_len, heads, head_dim).transpose(1, 2)
    k = torch.randn(batch, heads, head_dim, seq_len, dtype=dtype, device=device).transpose(2, 3)
    v = torch.randn(batch, heads, seq_len, head_dim + 16, dtype=dtype, device=device)[..., :head_dim]
    do = torch.randn(batch, seq_len, heads, head_dim, dtype=dtype, device=device).transpose(1, 2)
    assert len({q.stride(), k.stride(), v.stride(), do.stride()}) == 4
    assert not any(t.is_contiguous() for t in (q, k, v, do))
    _check_parity(q, k, v, do, causal=True, softmax_scale=0.3)


def test_backward_is_deterministic(device):
    q, k, v, do = _inputs(1, 2, 97, 64, torch.float16, device)
    first = _forward_backward(flash_attention, q, k, v, do)
    second = _forward_backward(flash_attention, q, k, v, do)
    for name, a, b in zip(FACTORS, first, second):
        assert torch.equal(a, b), f"{name} differs between two runs on the same inputs"


def _bad_inputs(device):
    x = torch.randn(1, 2, 8, 16, device=device)
    return {
        "three dims": ((x[0], x[0], x[0]), "4 dimensions"),
        "shape mismatch": ((x, x, torch.randn(1, 2, 9, 16, device=device)), "one shape"),
        "float64": ((x.double(), x.double(), x.double()), "dtype"),
        "mixed dtypes": ((x, x.half(), x), "one dtype"),
        "head_dim 8": ((x[..., :8],) * 3, "head_dim"),
        "head_dim 512": ((torch.randn(1, 2, 8, 512, device=device),) * 3, "head_dim"),
        "seq_len 0": ((x[:, :, :0],) * 3, "seq_len"),
        "two devices": ((x, x.to("meta"), x), "device"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs("cpu")))
def test_bad_input_raises_value_error(case, device):
    (q, k, v), message = _bad_inputs(device)[case]
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, seq_len, head_dim, causal", [
    (torch.bfloat16, 1024, 64, True),  # the GPT-2 124M shape
    (torch.bfloat16, 4096, 128, True),
    (torch.bfloat16, 4096, 64, False),
    (torch.bfloat16, 1024, 256, True),
    (torch.bfloat16, 2048, 256, False),
    (torch.float16, 4096, 128, False),
    (torch.float16, 1000, 80, True),
    (torch.float32, 512, 64, True),
], ids=_name)
def test_parity_gpu(dtype, seq_len, head_dim, causal, device):
    _check_parity(*_inputs(2, 3, seq_len, head_dim, dtype, device), causal=causal)


@pytest.mark.gpu
def test_backward_is_deterministic_gpu(device):
    q, k, v, do = _inputs(4, 8, 4096, 128, torch.bfloat16, device)
    first = _forward_backward(flash_attention, q, k, v, do)
    for _ in range(2):
        again = _forward_backward(flash_attention, q, k, v, do)
        for name, a, b in zip(FACTORS, first, again):
            assert torch.equal(a, b), f"{name} differs between runs on the same inputs"
