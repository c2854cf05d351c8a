"""The Triton GELU-MLP (kernels.mlp) against its reference, by the parity rule of tests/parity.py: output and
every gradient (x, both weights, both biases), both GELU forms, odd and GPT-2-like sizes, with and without biases,
2-D and 3-D inputs, determinism, and one test per ValueError. Without a GPU the kernels run in Triton's interpreter
(fp32 and fp16: its bf16 dot is wrong); bf16 and the large shapes run on a GPU only."""
import contextlib
import functools
import re

import pytest
import torch

import tritongpt.kernels.mlp as mlp_module  # the module: its kernel launcher
from tritongpt.kernels import MLPOptions, WeightCasts, gelu_mlp, gelu_mlp_reference
from tests.parity import (GRAD_FACTOR, OUTPUT_FACTOR, assert_deterministic, assert_parity, check_parity,
                          forward_backward, poisoned_allocations, reference_dtype)

ODD = ((33,), 65, 130, 65)              # (leading shape of x, D, H, D_out): nothing a multiple of a block
GPT2_LIKE = ((2, 32), 96, 384, 96)      # 3-D x, H = 4 D


def make_inputs(lead, d_in, hidden, d_out, device, fc_bias=True, proj_bias=True):
    """Fresh fp32 {x, fc_weight, fc_bias, proj_weight, proj_bias} (a bias left out is None) and [upstream gradient],
    scaled so that the pre-activation is O(1): the GELU's curved part is exercised."""
    x = torch.randn(*lead, d_in, device=device)
    w1 = torch.randn(hidden, d_in, device=device) / d_in ** 0.5
    b1 = 0.5 * torch.randn(hidden, device=device) if fc_bias else None
    w2 = torch.randn(d_out, hidden, device=device) / hidden ** 0.5
    b2 = 0.5 * torch.randn(d_out, device=device) if proj_bias else None
    dy = torch.randn(*lead, d_out, device=device)
    return {"x": x, "fc_weight": w1, "fc_bias": b1, "proj_weight": w2, "proj_bias": b2}, [dy]


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """Let cuBLAS run fp32 matmuls as TF32, as our kernels' fp32 dots do on a GPU: compare like with like."""
    if not enabled:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _check_parity(device, dtype, shape=ODD, approximate="tanh", fc_bias=True, proj_bias=True, requires_grad=None,
                  options=MLPOptions()):
    """gelu_mlp with options against the reference, on fresh inputs of the shape; requires_grad names the inputs whose
    gradients are checked (default: all)."""
    check_parity(functools.partial(gelu_mlp, options=options), gelu_mlp_reference,
                 *make_inputs(*shape, device, fc_bias=fc_bias, proj_bias=proj_bias), dtype, requires_grad=requires_grad,
                 torch_context=lambda: tf32_matmuls(device.type == "cuda" and dtype == torch.float32),
                 approximate=approximate)


# --- parity under the interpreter (or on the GPU when there is one) ----------------------------------------------

@pytest.mark.parametrize("shape", [ODD, GPT2_LIKE], ids=["odd", "gpt2_like_3d"])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_parity(device, dtype, approximate, shape):
    _check_parity(device, dtype, shape, approximate)


@pytest.mark.parametrize("fc_bias,proj_bias", [(False, False), (True, False), (False, True)],
                         ids=["no_biases", "fc_bias_only", "proj_bias_only"])
def test_parity_without_biases(device, fc_bias, proj_bias):
    _check_parity(device, torch.float16, fc_bias=fc_bias, proj_bias=proj_bias)


@pytest.mark.parametrize("dtype,approximate", [(torch.float32, "tanh"), (torch.float16, "none")],
                         ids=["fp32-tanh", "fp16-erf"])
def test_parity_triton_matmuls(device, dtype, approximate):
    """The alternative the benchmark measures: the unfused matmuls in Triton."""
    _check_parity(device, dtype, approximate=approximate, options=MLPOptions(plain_matmul="triton"))


@pytest.mark.parametrize("lead", [(), (0,)], ids=["1d_x", "zero_rows"])
def test_parity_degenerate_rows(device, lead):
    _check_parity(device, torch.float16, (lead, 65, 130, 65))


@pytest.mark.parametrize("requires_grad", [("x",), ("fc_weight", "fc_bias", "proj_weight", "proj_bias"),
                                           ("proj_weight",)], ids=["x_only", "weights_only", "proj_weight_only"])
def test_parity_some_gradients(device, requires_grad):
    _check_parity(device, torch.float16, requires_grad=requires_grad)


def test_autotuner_key_buckets_rows(device, monkeypatch):
    """Generating text grows M by one row per token: the matmul's autotuning key must not, or the autotuner would
    benchmark its tiles again at every length. M = 17..32 share one key; 33 starts the next."""
    kernel = mlp_module._matmul_kernel
    keys = {}
    run = kernel.run

    def record(*args, **kwargs):
        named = {**dict(zip(kernel.arg_names, args)), **kwargs}
        keys[named["M"]] = tuple(named[name] for name in kernel.keys)
        return run(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", record)
    params, _ = make_inputs((33,), 8, 16, 8, device)
    for rows in range(17, 34):
        gelu_mlp(params["x"][:rows], *list(params.values())[1:])
    assert len({keys[rows] for rows in range(17, 33)}) == 1
    assert keys[33] != keys[32]


def test_options_take_effect(device, monkeypatch):
    """The variant's parity holds only if the option reaches the implementation: plain_matmul="triton" sends the four
    unfused matmuls through the Triton kernel too; either way the forward saves pre and h."""
    launches = []
    launch = mlp_module._launch
    monkeypatch.setattr(mlp_module, "_launch", lambda *args, **kwargs: launches.append(1) or launch(*args, **kwargs))
    inputs, (dy,) = make_inputs((3,), 8, 32, 8, device)
    params = [t.requires_grad_() for t in inputs.values()]
    for options, saved_hidden, matmuls in ((MLPOptions(), 2, 2), (MLPOptions(plain_matmul="triton"), 2, 6)):
        saved = []
        launches.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            y = gelu_mlp(*params, options=options)
        torch.autograd.grad(y, params, dy)
        assert saved.count((3, 32)) == saved_hidden, options
        assert len(launches) == matmuls, options


def test_parity_inference(device):
    """Nothing requires grad: the forward skips storing pre."""
    _check_parity(device, torch.float16, GPT2_LIKE, requires_grad=())


def test_autocast_matches_eager(device):
    """Under autocast, fp32 inputs run in the autocast dtype, as F.linear's would; gradients reach the fp32 leaves."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16  # (the interpreter's bf16 dot is wrong)
    inputs, upstream = make_inputs(*ODD, device)
    (ref_out,), ref_grads = forward_backward(gelu_mlp_reference, inputs, upstream)
    with torch.autocast(device.type, dtype=dtype):
        (torch_out,), torch_grads = forward_backward(gelu_mlp_reference, inputs, upstream)
        (out,), grads = forward_backward(gelu_mlp, inputs, upstream)
    assert out.dtype == torch_out.dtype == dtype
    assert_parity("output", out, torch_out, ref_out, OUTPUT_FACTOR, dtype)
    assert grads.keys() == ref_grads.keys() == inputs.keys()
    for name in ref_grads:
        assert grads[name].dtype == torch.float32
        assert_parity(f"d{name}", grads[name].to(dtype), torch_grads[name].to(dtype), ref_grads[name], GRAD_FACTOR,
                      dtype)


def test_weight_casts_reuse_each_cast_until_the_weight_changes(device):
    """Inside WeightCasts, without gradients, autocast's weight casts are made once and reused, and an in-place
    update of a weight is seen at the next call; the outputs are those of the calls outside the scope."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    inputs, _ = make_inputs(*ODD, device)
    w1 = inputs["fc_weight"]
    casts = WeightCasts()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        unscoped = gelu_mlp(**inputs)
        with casts:
            first = gelu_mlp(**inputs)
            assert len(casts) == 4  # both weights and both biases, not x
            held = casts.cast(w1, dtype)
            second = gelu_mlp(**inputs)
            assert casts.cast(w1, dtype) is held
            w1.mul_(0.5)
            updated = gelu_mlp(**inputs)
            assert casts.cast(w1, dtype) is not held
        unscoped_updated = gelu_mlp(**inputs)
    assert torch.equal(first, unscoped) and torch.equal(second, unscoped)
    assert torch.equal(updated, unscoped_updated) and not torch.equal(updated, unscoped)


def test_weight_casts_step_aside_when_gradients_are_recorded(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    inputs, upstream = make_inputs(*ODD, device)
    casts = WeightCasts()
    with torch.autocast(device.type, dtype=dtype), casts:
        (out,), grads = forward_backward(gelu_mlp, inputs, upstream)
    assert len(casts) == 0
    assert grads.keys() == inputs.keys() and all(g.dtype == torch.float32 for g in grads.values())


def test_deterministic(device):
    assert_deterministic(gelu_mlp, *make_inputs(*GPT2_LIKE, device), dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matmul_kernel_strided_operands(device, dtype):
    """The generic kernel alone on transposed (non-contiguous) operands, with enough row tiles for a ragged last
    group of the grouped program order, and ragged M, N and K."""
    M, N, K = 300, 70, 40
    a = torch.randn(K, M, device=device).t()   # (M, K), column-major
    b = torch.randn(N, K, device=device).t()   # (K, N), column-major
    bias = torch.randn(N, device=device)
    ref = torch.addmm(bias.to(reference_dtype(dtype)), a.to(reference_dtype(dtype)), b.to(reference_dtype(dtype)))
    with tf32_matmuls(device.type == "cuda" and dtype == torch.float32):
        expected = torch.addmm(bias.to(dtype), a.to(dtype), b.to(dtype))
    a, b = a.to(dtype).t().contiguous().t(), b.to(dtype).t().contiguous().t()  # keep the column-major layout
    assert not a.is_contiguous() and not b.is_contiguous()
    with poisoned_allocations():
        c = torch.empty((M, N), device=device, dtype=dtype)
        mlp_module._launch(a, b, c, mlp_module._NONE, bias=bias.to(dtype))
    assert_parity("a @ b + bias", c, expected, ref, OUTPUT_FACTOR, dtype)


# --- bad input: one ValueError each --------------------------------------------------------------------------------

def _bad(case, device):
    x, w1, b1, w2, b2 = make_inputs((3, 5), 8, 32, 8, device)[0].values()
    approximate = "tanh"
    if case == "approximate":
        approximate = "erf"
    elif case == "dtype":
        x = x.double()
    elif case == "mixed_dtypes":
        w1 = w1.half()
    elif case == "mixed_devices":
        w2 = w2.to("meta")
    elif case == "not_a_tensor":
        w1 = w1.tolist()
    elif case == "x_width":
        x = x[..., :7]
    elif case == "scalar_x":
        x = x[0, 0, 0]
    elif case == "fc_weight_3d":
        w1 = w1[None]
    elif case == "proj_weight_width":
        w2 = w2[:, :31]
    elif case == "fc_bias_length":
        b1 = b1[:31]
    elif case == "proj_bias_length":
        b2 = b2[:, None]
    return x, w1, b1, w2, b2, approximate


@pytest.mark.parametrize("case,message", [
    ("approximate", "approximate must be 'tanh' or 'none'"),
    ("dtype", "supported: float16, bfloat16, float32"),
    ("mixed_dtypes", "cast them to one dtype"),
    ("mixed_devices", "move them to one device"),
    ("not_a_tensor", "fc_weight must be a torch.Tensor"),
    ("x_width", "x's last dimension must equal fc_weight.shape[1]"),
    ("scalar_x", "x's last dimension must equal fc_weight.shape[1]"),
    ("fc_weight_3d", "fc_weight must be 2-D"),
    ("proj_weight_width", "proj_weight.shape[1] must equal fc_weight.shape[0]"),
    ("fc_bias_length", "fc_bias must have shape (32,)"),
    ("proj_bias_length", "proj_bias must have shape (8,)"),
])
def test_bad_input_raises(device, case, message):
    x, w1, b1, w2, b2, approximate = _bad(case, device)
    with pytest.raises(ValueError, match=re.escape(message)):
        gelu_mlp(x, w1, b1, w2, b2, approximate=approximate)


def test_unknown_plain_matmul_raises():
    with pytest.raises(ValueError, match="plain_matmul must be 'torch' or 'triton'"):
        MLPOptions(plain_matmul="cublas")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal, which needs no GPU present")
def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs, _ = make_inputs((3,), 8, 32, 8, "cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        gelu_mlp(*inputs.values())


# --- GPU only: bf16, and GPT-2 sizes --------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("shape", [ODD, GPT2_LIKE, ((4, 1024), 768, 3072, 768), ((2, 1024), 1600, 6400, 1600)],
                         ids=["odd", "gpt2_like_3d", "gpt2_small", "gpt2_xl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_parity_gpu(device, dtype, shape, approximate):
    _check_parity(device, dtype, shape, approximate)


@pytest.mark.gpu
def test_parity_triton_matmuls_gpu(device):
    options = MLPOptions(plain_matmul="triton")
    _check_parity(device, torch.bfloat16, ((4, 1024), 768, 3072, 768), options=options)
    _check_parity(device, torch.bfloat16, ODD, options=options)


@pytest.mark.gpu
def test_deterministic_gpu(device):
    assert_deterministic(gelu_mlp, *make_inputs((4, 1024), 1024, 4096, 1024, device), dtype=torch.bfloat16)
