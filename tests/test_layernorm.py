"""The Triton LayerNorm and add+LayerNorm against their references, by the parity rule in tests/parity.py.

Each parity check runs three times on the same inputs and upstream gradients: the reference on inputs upcast to
the reference dtype, the reference in the test dtype, and the kernel with every torch.empty* poisoned with NaN.
Under the interpreter the kernel's largest whole-row block is 1024 wide, so width 4097 takes the chunked path.
"""
import pytest
import torch

from tritongpt.kernels import add_layer_norm, add_layer_norm_reference, layer_norm, layer_norm_reference
from tests.parity import (GRAD_FACTOR, OUTPUT_FACTOR, assert_deterministic, assert_parity, check_parity,
                          forward_backward)


def _leading_shape(width: int, dims: int) -> tuple[int, ...]:
    # Narrow rows: enough of them that a backward program takes several row blocks; wide rows are slow to
    # interpret, so few of them.
    if width > 1024:
        return (6,) if dims == 2 else (2, 3)
    return (37,) if dims == 2 else (3, 11)


def _inputs(shape, dtype, device, with_residual, with_bias=True):
    """Fresh random arguments by name: {x, residual, weight, bias} for add_layer_norm, {x, weight, bias} for layer_norm
    (without residual); bias is None when left out."""
    width = shape[-1]
    inputs = {"x": torch.randn(shape, dtype=dtype, device=device)}
    if with_residual:
        inputs["residual"] = torch.randn(shape, dtype=dtype, device=device)
    inputs["weight"] = (1 + 0.5 * torch.randn(width, device=device)).to(dtype)
    inputs["bias"] = (0.5 * torch.randn(width, device=device)).to(dtype) if with_bias else None
    return inputs


def _layer_norm_parity(shape, dtype, device, with_bias):
    inputs = _inputs(shape, dtype, device, False, with_bias)
    check_parity(layer_norm, layer_norm_reference, inputs, [torch.randn_like(inputs["x"])], dtype, ("normed",))


def _add_layer_norm_parity(shape, dtype, device, with_bias):
    inputs = _inputs(shape, dtype, device, True, with_bias)
    upstream = [torch.randn_like(inputs["x"]) for _ in range(2)]
    check_parity(add_layer_norm, add_layer_norm_reference, inputs, upstream, dtype, ("normed", "summed"))


# Every width in both dtypes and both layouts (2-D with bias, 3-D without), each dtype taking the other layout
# from the other dtype: the whole product is too slow to interpret.
_LAYOUTS = ((2, True), (3, False))  # (dims, with_bias)
_CASES = [(width, dtype, *_LAYOUTS[(i + j) % 2])
          for i, width in enumerate((1, 7, 768, 1000, 4097))
          for j, dtype in enumerate((torch.float32, torch.float16))]


@pytest.mark.parametrize("width,dtype,dims,with_bias", _CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_layer_norm_parity(width, dtype, dims, with_bias, device):
    torch.manual_seed(width * 10 + dims)
    _layer_norm_parity((*_leading_shape(width, dims), width), dtype, device, with_bias)


@pytest.mark.parametrize("width,dtype,dims,with_bias", _CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_add_layer_norm_parity(width, dtype, dims, with_bias, device):
    torch.manual_seed(width * 10 + dims + 1)
    _add_layer_norm_parity((*_leading_shape(width, dims), width), dtype, device, with_bias)


def test_chunked_rows_several_row_blocks_per_program(device):
    """Rows wider than a block, and enough of them that a backward program sums dweight and dbias over several row
    blocks chunk by chunk (under the interpreter: 16-row blocks, two programs)."""
    torch.manual_seed(5)
    _add_layer_norm_parity((40, 4097), torch.float32, device, with_bias=True)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_dtypes_parity(low, device):
    """As under autocast: a low-precision update added to an fp32 stream, the normed output written in low precision
    for the next matmul. summed stays fp32, and each input's gradient comes in its own dtype. The reference runs in
    fp64 (truth) and in the same dtypes (PyTorch's own error, by which the tolerance scales)."""
    torch.manual_seed(11)
    shape = (37, 768)
    inputs = _inputs(shape, torch.float32, device, True)
    inputs["x"] = inputs["x"].to(low)  # the update
    upstream = [torch.randn(shape, device=device).to(low), torch.randn(shape, device=device)]
    ours = forward_backward(add_layer_norm, inputs, upstream, out_dtype=low)
    same = forward_backward(add_layer_norm_reference, inputs, upstream, out_dtype=low)
    truth = forward_backward(add_layer_norm_reference, {k: v.double() for k, v in inputs.items()},
                             [g.double() for g in upstream], out_dtype=torch.float64)
    assert [t.dtype for t in ours[0]] == [low, torch.float32]
    assert {k: g.dtype for k, g in ours[1].items()} == {k: v.dtype for k, v in inputs.items()}
    for name, a, b, c in zip(("normed", "summed"), ours[0], same[0], truth[0]):
        assert_parity(name, a, b, c, OUTPUT_FACTOR, low)
    for name in truth[1]:
        assert_parity(f"d{name}", ours[1][name], same[1][name], truth[1][name], GRAD_FACTOR, low)


def test_layer_norm_out_dtype(device):
    torch.manual_seed(12)
    inputs = _inputs((37, 768), torch.float32, device, False)
    upstream = [torch.randn(37, 768, device=device).to(torch.bfloat16)]
    ours = forward_backward(layer_norm, inputs, upstream, out_dtype=torch.bfloat16)
    same = forward_backward(layer_norm_reference, inputs, upstream, out_dtype=torch.bfloat16)
    truth = forward_backward(layer_norm_reference, {k: v.double() for k, v in inputs.items()},
                             [upstream[0].double()], out_dtype=torch.float64)
    assert ours[0][0].dtype == torch.bfloat16
    assert_parity("normed", ours[0][0], same[0][0], truth[0][0], OUTPUT_FACTOR, torch.bfloat16)
    for name in truth[1]:
        assert ours[1][name].dtype == torch.float32
        assert_parity(f"d{name}", ours[1][name], same[1][name], truth[1][name], GRAD_FACTOR, torch.bfloat16)


def test_add_layer_norm_normalises_the_rounded_sum(device):
    """normed is LayerNorm of the fp16 `summed` it returns, not of the unrounded fp32 sum."""
    torch.manual_seed(1)
    x, residual, weight, bias = _inputs((9, 300), torch.float16, device, True).values()
    normed, summed = add_layer_norm(x, residual, weight, bias)
    assert torch.equal(summed, x + residual)
    torch.testing.assert_close(normed, layer_norm(summed, weight, bias), rtol=0, atol=0)


def test_add_layer_norm_only_summed_used(device):
    torch.manual_seed(2)
    x, residual, weight, bias = (t.requires_grad_() for t in _inputs((5, 33), torch.float32, device, True).values())
    _, summed = add_layer_norm(x, residual, weight, bias)
    ds = torch.randn_like(summed)
    dx, dr = torch.autograd.grad(summed, (x, residual), ds)
    assert torch.equal(dx, ds) and torch.equal(dr, ds)


def test_non_contiguous_inputs(device):
    """A transposed input (reshaped by copy), a column slice of a wider tensor (read in place through its row
    stride), a strided weight."""
    torch.manual_seed(3)
    width = 40
    x = torch.randn(width, 3, 9, device=device).transpose(0, 2)  # (9, 3, 40), last-dim stride 27
    residual = torch.randn(9, 3, width + 24, device=device)[..., 5:5 + width]
    weight = torch.randn(2 * width, device=device)[::2]
    bias = torch.randn(width, device=device)
    assert not x.is_contiguous() and not residual.is_contiguous() and not weight.is_contiguous()
    check_parity(add_layer_norm, add_layer_norm_reference,
                 {"x": x, "residual": residual, "weight": weight, "bias": bias},
                 [torch.randn_like(x), torch.randn_like(x)], torch.float32, ("normed", "summed"))
    check_parity(layer_norm, layer_norm_reference, {"x": residual, "weight": weight, "bias": bias},
                 [torch.randn_like(residual)], torch.float32, ("normed",))


def test_broadcast_upstream_gradient(device):
    """y.sum().backward() hands the backward an expanded gradient whose strides are all zero."""
    torch.manual_seed(4)
    inputs = _inputs((6, 50), torch.float32, device, True)
    _, ours = forward_backward(lambda *t: add_layer_norm(*t)[0].sum(), inputs, [None])
    _, reference = forward_backward(lambda *t: add_layer_norm_reference(*t)[0].sum(), inputs, [None])
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_no_rows(device):
    x = torch.randn(0, 3, 16, device=device, requires_grad=True)
    weight = torch.randn(16, device=device, requires_grad=True)
    y = layer_norm(x, weight)
    assert y.shape == x.shape
    dx, dw = torch.autograd.grad(y, (x, weight), torch.randn_like(y))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(dw))


def _assert_deterministic(shape, dtype, device):
    inputs = _inputs(shape, dtype, device, True)
    dy, ds = torch.randn_like(inputs["x"]), torch.randn_like(inputs["x"])
    assert_deterministic(layer_norm, {name: inputs[name] for name in ("x", "weight", "bias")}, [dy])
    assert_deterministic(add_layer_norm, inputs, [dy, ds])


def test_backward_is_deterministic(device):
    torch.manual_seed(5)
    _assert_deterministic((37, 768), torch.float32, device)


def _valid(device):
    return (torch.randn(4, 8, device=device), torch.randn(4, 8, device=device), torch.randn(8, device=device),
            torch.randn(8, device=device))


def test_rejects_weight_of_wrong_width(device):
    x, _, _, bias = _valid(device)
    with pytest.raises(ValueError, match="weight has shape"):
        layer_norm(x, torch.randn(7, device=device), bias)


def test_rejects_bias_of_wrong_width(device):
    x, _, weight, _ = _valid(device)
    with pytest.raises(ValueError, match="bias has shape"):
        layer_norm(x, weight, torch.randn(4, 8, device=device))


def test_rejects_residual_of_other_shape(device):
    x, _, weight, bias = _valid(device)
    with pytest.raises(ValueError, match="update has shape"):
        add_layer_norm(x, torch.randn(2, 8, device=device), weight, bias)


def test_rejects_mixed_dtypes(device):
    x, residual, weight, bias = _valid(device)
    with pytest.raises(ValueError, match="weight is torch.float16"):
        add_layer_norm(x, residual, weight.half(), bias)


def test_rejects_unsupported_out_dtype(device):
    x, _, weight, bias = _valid(device)
    with pytest.raises(ValueError, match="out_dtype is torch.float64"):
        layer_norm(x, weight, bias, out_dtype=torch.float64)


def test_rejects_mixed_devices(device):
    x, _, weight, bias = _valid(device)
    with pytest.raises(ValueError, match="bias is on meta"):
        layer_norm(x, weight, bias.to("meta"))


def test_rejects_unsupported_dtype(device):
    x, _, weight, bias = _valid(device)
    with pytest.raises(ValueError, match="float64"):
        layer_norm(x.double(), weight.double(), bias.double())


def test_rejects_scalar_input(device):
    with pytest.raises(ValueError, match="at least one dimension"):
        layer_norm(torch.tensor(1.0, device=device), torch.randn(1, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("width,rows", [(768, 16384), (1600, 4099), (4097, 1024), (8192, 1024),
                                        (8193, 257), (16384, 512), (65536, 64)])
def test_bf16_parity_on_gpu(width, rows, device):
    torch.manual_seed(width)
    _layer_norm_parity((rows, width), torch.bfloat16, device, True)
    _add_layer_norm_parity((rows // 4, 4, width), torch.bfloat16, device, False)


@pytest.mark.gpu
@pytest.mark.parametrize("width", [1, 7, 1000, 65536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_many_rows_on_gpu(width, dtype, device):
    torch.manual_seed(width + 1)
    rows = max(64, 2**22 // width)
    _add_layer_norm_parity((rows, width), dtype, device, True)


@pytest.mark.gpu
@pytest.mark.parametrize("width", [768, 4097, 65536])
def test_backward_is_deterministic_on_gpu(width, device):
    torch.manual_seed(6)
    _assert_deterministic((max(64, 2**23 // width), width), torch.bfloat16, device)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_model_norm_under_autocast_writes_the_autocast_dtype(impl, device):
    """The model's AddLayerNorm under autocast: the bf16 update is added to the fp32 stream without a cast of its
    own, the stream stays fp32, and the normed output comes in bf16, the dtype the next matmul reads."""
    from tritongpt.model.gpt import AddLayerNorm
    norm = AddLayerNorm(64, bias=True, impl=impl).to(device)
    stream = torch.randn(3, 64, device=device, requires_grad=True)
    update = torch.randn(3, 64, device=device).to(torch.bfloat16).requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        normed, summed = norm(stream, update)
        alone, _ = norm(stream)
    assert (normed.dtype, summed.dtype, alone.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    d_stream, d_update = torch.autograd.grad(normed.float().sum() + summed.sum(), (stream, update))
    assert (d_stream.dtype, d_update.dtype) == (torch.float32, torch.bfloat16)
