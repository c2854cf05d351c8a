"""The Triton flash attention, and the SDPA alternative, against the reference by the parity rule of tests/parity.py.

Without a GPU the kernels run in Triton's interpreter, about 2 ms per program per loop step, so the CPU cases are
small (batch 1, 2 heads) and cover each seq_len, head_dim, dtype and causality below without taking their product.
The GPU cases add bf16, long sequences and head_dim 256.
"""
import pytest
import torch

from tritongpt.kernels import (attention_qkvpacked_reference, attention_reference, flash_attention,
                               flash_attention_qkvpacked, sdpa_attention, sdpa_attention_qkvpacked)
from tests.parity import assert_deterministic, check_parity


def _check_parity(attend, inputs, upstream, **kwargs):
    check_parity(attend, attention_reference, inputs, upstream, inputs["q"].dtype, **kwargs)


def _name(value) -> str:
    return str(value).removeprefix("torch.")


def _inputs(batch, heads, seq_len, head_dim, dtype, device, seq_len_q=None):
    """Fresh random ({"q", "k", "v"}, [upstream gradient]); q and the gradient have seq_len_q rows (default seq_len)."""
    seq_len_q = seq_len if seq_len_q is None else seq_len_q
    q, do = (torch.randn(batch, heads, seq_len_q, head_dim, dtype=dtype, device=device) for _ in range(2))
    k, v = (torch.randn(batch, heads, seq_len, head_dim, dtype=dtype, device=device) for _ in range(2))
    return {"q": q, "k": k, "v": v}, [do]


# Each seq_len with a different head_dim, both dtypes and both causalities across the set; seq_len 17, 97 and 200 are
# not multiples of the interpreter's blocks, head_dim 80 is not a power of two.
@pytest.mark.parametrize("seq_len, head_dim, dtype, causal", [
    (1, 64, torch.float16, True),
    (17, 80, torch.float32, False),
    (97, 16, torch.float16, False),
    (128, 128, torch.float16, True),
    (200, 32, torch.float32, True),
    (64, 64, torch.bfloat16, True),  # bf16 tiles go through fp32 dots under the interpreter
], ids=_name)
def test_parity(seq_len, head_dim, dtype, causal, device):
    _check_parity(flash_attention, *_inputs(1, 2, seq_len, head_dim, dtype, device), causal=causal)


# Fewer queries than keys: a decoding step (one query), and offsets seq_len_k − seq_len_q that are not multiples of
# the interpreter's blocks (80, 59, 199, 30), so that the diagonal crosses one key or query block more than it would
# on a block boundary; 70 queries span several query blocks of every kernel.
@pytest.mark.parametrize("seq_len_q, seq_len_k, head_dim, dtype, causal", [
    (1, 64, 32, torch.float16, True),
    (17, 97, 16, torch.float32, True),
    (17, 97, 32, torch.float16, False),
    (5, 64, 16, torch.float16, True),
    (1, 200, 16, torch.float32, True),
    (1, 200, 16, torch.float16, False),
    (70, 100, 16, torch.float16, True),
    (70, 100, 16, torch.float32, False),
], ids=_name)
def test_parity_fewer_queries(seq_len_q, seq_len_k, head_dim, dtype, causal, device):
    _check_parity(flash_attention, *_inputs(1, 2, seq_len_k, head_dim, dtype, device, seq_len_q), causal=causal)


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
    _check_parity(flash_attention, {"q": q, "k": k, "v": v}, [do], causal=True, softmax_scale=0.3)


@pytest.mark.parametrize("seq_len_q, seq_len, head_dim, dtype, causal", [
    (97, 97, 16, torch.float16, False),
    (200, 200, 32, torch.float32, True),
    (17, 97, 32, torch.float32, True),
    (1, 64, 16, torch.float16, True),
], ids=_name)
def test_sdpa_parity(seq_len_q, seq_len, head_dim, dtype, causal, device):
    """The model's "sdpa" attention computes the reference's function too, fewer queries than keys included."""
    _check_parity(sdpa_attention, *_inputs(1, 2, seq_len, head_dim, dtype, device, seq_len_q), causal=causal)


@pytest.mark.parametrize("attend", [attention_reference, sdpa_attention], ids=lambda f: f.__name__)
def test_causal_mask_aligns_to_the_end(attend):
    """With fewer queries than keys, the queries are the last ones of the sequence: their outputs are the last rows
    of the full causal attention, and a single query sees every key."""
    q, k, v = _inputs(1, 2, 23, 16, torch.float64, "cpu")[0].values()
    full = attend(q, k, v, causal=True)
    for seq_len_q in (1, 5, 22):
        torch.testing.assert_close(attend(q[:, :, -seq_len_q:], k, v, causal=True), full[:, :, -seq_len_q:])
    torch.testing.assert_close(attend(q[:, :, -1:], k, v, causal=True), attend(q[:, :, -1:], k, v, causal=False))


def test_output_merges_heads_in_place(device):
    """O is laid out (batch, seq_len, heads, head_dim): merging its heads, as the model does, copies nothing."""
    inputs, _ = _inputs(1, 2, 33, 16, torch.float16, device)
    o = flash_attention(*inputs.values())
    merged = o.transpose(1, 2).reshape(1, 33, 2 * 16)
    assert merged.data_ptr() == o.data_ptr()


def _packed_inputs(batch, seq_len, n_head, head_dim, dtype, device):
    """Fresh random ({"qkv": a fused projection's output}, [upstream gradient of the merged heads])."""
    width = n_head * head_dim
    qkv = torch.randn(batch, seq_len, 3 * width, dtype=dtype, device=device)
    return {"qkv": qkv}, [torch.randn(batch, seq_len, width, dtype=dtype, device=device)]


@pytest.mark.parametrize("attend", [attention_qkvpacked_reference, sdpa_attention_qkvpacked],
                         ids=lambda f: f.__name__)
def test_qkvpacked_splits_and_merges_heads_as_gpt2(attend):
    """The packed form is the attention of GPT-2's heads: q, k, v the thirds of the projection, each cut into n_head
    consecutive head_dim slices, and the heads' outputs concatenated in order."""
    qkv = _packed_inputs(2, 9, 3, 16, torch.float64, "cpu")[0]["qkv"]
    q, k, v = (t.view(2, 9, 3, 16).transpose(1, 2) for t in qkv.split(48, dim=2))
    unpacked = {attention_qkvpacked_reference: attention_reference, sdpa_attention_qkvpacked: sdpa_attention}[attend]
    expected = unpacked(q, k, v, causal=True).transpose(1, 2).reshape(2, 9, 48)
    assert torch.equal(attend(qkv, 3, causal=True), expected)


@pytest.mark.parametrize("seq_len, head_dim, dtype, causal", [
    (33, 16, torch.float16, True),
    (17, 32, torch.float32, False),
], ids=_name)
@pytest.mark.parametrize("attend", [flash_attention_qkvpacked, sdpa_attention_qkvpacked], ids=lambda f: f.__name__)
def test_qkvpacked_parity(attend, seq_len, head_dim, dtype, causal, device):
    inputs, upstream = _packed_inputs(1, seq_len, 2, head_dim, dtype, device)
    check_parity(attend, attention_qkvpacked_reference, inputs, upstream, dtype, n_head=2, causal=causal)


def test_backward_is_deterministic(device):
    assert_deterministic(flash_attention, *_inputs(1, 2, 97, 64, torch.float16, device))


def _bad_inputs(device):
    x = torch.randn(1, 2, 8, 16, device=device)
    return {
        "three dims": ((x[0], x[0], x[0]), "4 dimensions"),
        "k, v shape mismatch": ((x, x, torch.randn(1, 2, 9, 16, device=device)), "one shape"),
        "q, k head_dim mismatch": ((torch.randn(1, 2, 8, 32, device=device), x, x), "same batch, heads and head_dim"),
        "q, k heads mismatch": ((torch.randn(1, 3, 8, 16, device=device), x, x), "same batch, heads and head_dim"),
        "more queries than keys": ((torch.randn(1, 2, 9, 16, device=device), x, x), "more rows"),
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


@pytest.mark.parametrize("attention", [attention_reference, sdpa_attention], ids=["reference", "sdpa"])
def test_eager_causal_attention_refuses_more_queries_than_keys(attention):
    """Causal queries before the first key would see nothing (rows of NaN); without the mask any lengths work."""
    q, kv = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="more rows"):
        attention(q, kv, kv, causal=True)
    assert torch.isfinite(attention(q, kv, kv, causal=False)).all()


@pytest.mark.parametrize("shape, n_head, message", [
    ((1, 8, 3 * 32, 1), 2, "qkv must be"),
    ((1, 8, 3 * 32 + 1), 2, "qkv must be"),
    ((1, 8, 3 * 32), 0, "qkv must be"),
    ((1, 8, 3 * 32), 4, "head_dim"),
])
def test_qkvpacked_bad_input_raises_value_error(shape, n_head, message, device):
    with pytest.raises(ValueError, match=message):
        flash_attention_qkvpacked(torch.randn(shape, device=device), n_head)


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
    _check_parity(flash_attention, *_inputs(2, 3, seq_len, head_dim, dtype, device), causal=causal)


@pytest.mark.gpu
def test_backward_is_deterministic_gpu(device):
    assert_deterministic(flash_attention, *_inputs(4, 8, 4096, 128, torch.bfloat16, device), runs=3)
