"""torch.compile over the GPT with every op on its Triton kernels, and each kernel's PyTorch operator on its own.

The kernels are PyTorch custom operators (tritongpt::*, see kernels/_common.kernel_op), opaque to the compiler: it
traces their fake implementations for shapes and calls them as they stand. So a compiled model runs the very same
kernels as the eager one, on CPU under Triton's interpreter too, and the "aot_eager" backend (AOTAutograd's forward
and backward graphs, run op by op without code generation) must reproduce the eager model exactly: it runs the same
ATen kernels on the same inputs, and the one freedom it has, the order in which a tensor's gradient contributions are
summed, does not show here, since no tensor of this model receives more than two, and a sum of two does not depend
on its order. Inductor would generate its own code for the rest of the model, with its own rounding, and compile it
for about a minute on a CPU: aot_eager isolates what is tested here, the graph around the kernels.

One layer suffices: it calls every op (ln_1 is layer_norm, ln_2 and ln_f add_layer_norm).
"""
import copy

import pytest
import torch

from tritongpt.model import GPT, GPTConfig
from tritongpt.model.config import OP_FIELDS

CONFIG = GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0,
                   **{op: "triton" for op in OP_FIELDS})


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batch(seq_len: int, device):
    return (torch.randint(0, CONFIG.vocab_size, (2, seq_len), device=device),
            torch.randint(0, CONFIG.vocab_size, (2, seq_len), device=device))


def test_no_graph_breaks(device):
    torch.manual_seed(0)
    explanation = torch._dynamo.explain(GPT(CONFIG).to(device))(*batch(16, device))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def loss_and_grads(model: GPT, idx, targets, forward=None):
    """The loss of model on a batch through forward (the model itself by default) and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    _, loss = (model if forward is None else forward)(idx, targets)
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("dynamic, autocast", [(False, False), (False, True), (True, True)],
                         ids=["static-fp32", "static-bf16_autocast", "dynamic_seq_len-bf16_autocast"])
def test_compiled_model_matches_eager(dynamic, autocast, device):
    """fullgraph=True, forward and backward, in fp32 and under bf16 autocast (the trainer's GPU dtype); dynamic: one
    graph, with seq_len symbolic, serves two lengths without recompiling."""
    torch.manual_seed(0)
    model = GPT(CONFIG).to(device)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True, dynamic=None if dynamic else False)
    torch.manual_seed(1)
    for step, seq_len in enumerate((16, 24) if dynamic else (16,)):
        idx, targets = batch(seq_len, device)
        if dynamic:
            torch._dynamo.mark_dynamic(idx, 1)
            torch._dynamo.mark_dynamic(targets, 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), \
                torch._dynamo.config.patch(error_on_recompile=step > 0):
            loss, grads = loss_and_grads(model, idx, targets)
            compiled_loss, compiled_grads = loss_and_grads(twin, idx, targets, forward=compiled)
        assert torch.equal(compiled_loss, loss), f"seq_len {seq_len}: loss {compiled_loss.item()} != {loss.item()}"
        assert compiled_grads.keys() == grads.keys()
        for name, grad in grads.items():
            assert torch.equal(compiled_grads[name], grad), f"seq_len {seq_len}: grad {name} differs"


def test_compiled_inference_matches_eager(device):
    """Without gradients the MLP runs its inference operator (it writes no pre-activation): logits as eager's."""
    torch.manual_seed(0)
    model = GPT(CONFIG).to(device)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    idx, _ = batch(16, device)
    with torch.no_grad():
        assert torch.equal(compiled(idx)[0], model(idx)[0])


OPERATORS = ("flash_attention_forward", "flash_attention_backward", "flash_attention_qkvpacked_forward",
             "flash_attention_qkvpacked_backward", "layer_norm_forward", "add_layer_norm_forward",
             "layer_norm_backward", "gelu_mlp_forward", "gelu_mlp_inference", "gelu_grad_matmul", "matmul",
             "linear_cross_entropy_forward", "linear_cross_entropy_backward")


def operator_cases(device) -> dict[str, tuple]:
    """Small arguments for each tritongpt operator, by name. The float inputs of a forward operator require grad, so
    that opcheck runs its registered autograd, and with it the backward operator; a backward operator's own case takes
    what its forward saves."""
    def rand(*shape, scale=1.0, grad=False):
        return (scale * torch.randn(*shape, device=device)).requires_grad_(grad)

    # Fewer queries than keys, as in a decoding step.
    q, k, v = rand(1, 2, 8, 16, grad=True), rand(1, 2, 11, 16, grad=True), rand(1, 2, 11, 16, grad=True)
    o, lse = torch.ops.tritongpt.flash_attention_forward(q.detach(), k.detach(), v.detach(), True, 0.25)
    qkv = rand(1, 8, 3 * 32, grad=True)  # 2 heads of 16
    packed_o, packed_lse = torch.ops.tritongpt.flash_attention_qkvpacked_forward(qkv.detach(), 2, True, 0.25)
    x, residual = rand(2, 3, 16, grad=True), rand(2, 3, 16, grad=True)
    weight, bias = rand(16, grad=True), rand(16, grad=True)
    _, mean, rstd = torch.ops.tritongpt.layer_norm_forward(x.detach(), weight.detach(), bias.detach(), 1e-5,
                                                           torch.float32)
    update = rand(2, 3, 16).half().requires_grad_()  # as under autocast: a low-precision update to an fp32 stream
    # Weights scaled so that the GELU's input is O(1).
    mlp_x, fc_weight, fc_bias = rand(5, 8, grad=True), rand(32, 8, scale=8 ** -0.5, grad=True), rand(32, grad=True)
    proj_weight, proj_bias = rand(8, 32, scale=32 ** -0.5, grad=True), rand(8, grad=True)
    # An odd vocabulary, and one ignored target.
    ce_x, head = rand(6, 16, grad=True), rand(37, 16, scale=0.25, grad=True)
    targets = torch.tensor([3, -1, 36, 0, 17, 5], device=device)
    _, row_max, log_sum, count = torch.ops.tritongpt.linear_cross_entropy_forward(
        ce_x.detach(), head.detach(), targets, -1, torch.float32)
    return {
        "flash_attention_forward": (q, k, v, True, 0.25),
        "flash_attention_backward": (q.detach(), k.detach(), v.detach(), o, lse, rand(1, 2, 8, 16), True, 0.25),
        "flash_attention_qkvpacked_forward": (qkv, 2, True, 0.25),
        "flash_attention_qkvpacked_backward": (qkv.detach(), packed_o, packed_lse, rand(1, 8, 32), 2, True, 0.25),
        "layer_norm_forward": (x, weight, bias, 1e-5, torch.bfloat16),
        "add_layer_norm_forward": (update, residual, weight, bias, 1e-5, torch.float16),
        "layer_norm_backward": (rand(2, 3, 16), rand(2, 3, 16), x.detach(), weight.detach(), mean, rstd),
        "gelu_mlp_forward": (mlp_x, fc_weight, fc_bias, proj_weight, proj_bias, True, "torch"),
        "gelu_mlp_inference": (mlp_x.detach(), fc_weight.detach(), None, proj_weight.detach(), proj_bias.detach(),
                               False, "triton"),
        "gelu_grad_matmul": (rand(5, 8), proj_weight.detach(), rand(5, 32), True, True),
        "matmul": (rand(5, 8), rand(16, 8).t(), rand(16)),
        "linear_cross_entropy_forward": (ce_x, head, targets, -1, torch.float32),
        "linear_cross_entropy_backward": (rand(()), ce_x.detach(), head.detach(), targets, row_max, log_sum, count, -1,
                                          True, True),
    }


def test_every_operator_is_checked():
    """Every operator registered under tritongpt:: has its case above: a new op cannot skip opcheck."""
    registered = {schema.name.removeprefix("tritongpt::") for schema in torch._C._jit_get_all_schemas()
                  if schema.name.startswith("tritongpt::")}
    assert registered == set(OPERATORS)


@pytest.mark.parametrize("name", OPERATORS)
def test_opcheck(name, device):
    """All of opcheck's tests: the schema (no input mutated or aliased by an output), the autograd registration, the
    fake implementation against the real one (shapes, dtypes, strides), and AOTAutograd with dynamic shapes against
    eager, gradients included."""
    torch.manual_seed(2)
    torch.library.opcheck(getattr(torch.ops.tritongpt, name), operator_cases(device)[name])


def test_inductor_meets_the_operators_as_declared_fallbacks(device, monkeypatch):
    """Inductor finds each operator declared as a kernel it calls as it stands, so it never takes the path on which
    it creates such a fallback itself and logs every argument's whole expression (which PyTorch 2.11 renders even
    with the log off: minutes at GPT-2's depth)."""
    import torch._inductor.graph
    from tritongpt.kernels import layer_norm
    logged = []
    monkeypatch.setattr(torch._inductor.graph.log, "info", lambda message, *args, **kwargs: logged.append(
        message % tuple(str(a) for a in args) if args else message))
    x = torch.randn(4, 8, device=device, requires_grad=True)
    weight, bias = torch.randn(8, device=device), torch.randn(8, device=device)
    compiled = torch.compile(lambda x: layer_norm(2 * x, weight, bias).sin())
    with torch._inductor.config.patch(force_disable_caches=True):  # a cached graph would not be lowered again
        out = compiled(x)
        out.sum().backward()
    torch.testing.assert_close(out, layer_norm(2 * x, weight, bias).sin())
    implicit = [m for m in logged if "implicit fallback" in m and "tritongpt" in m]
    assert not implicit, implicit[0][:300]
