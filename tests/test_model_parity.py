"""The whole GPT with each op on its Triton kernel (or another implementation from kernels.OPS) matches the GPT on
the ops' eager PyTorch references (llm.c's whole-model test): logits, loss, every parameter's gradient (the tied
embedding's included), and, every op on Triton, the losses over several AdamW steps.

The rule is the kernels' (tests/parity.py): against a float64 eager reference, the tested model's error may be at
most 2x (outputs) or 3x (gradients) the eager float32 model's own error, plus a small atol. On CPU the kernels run
in Triton's interpreter, so the model is tiny.
"""
import copy
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tritongpt.model import GPT, GPTConfig
from tritongpt.model.config import OP_FIELDS, implementations
from tritongpt.optim import adamw
from tests.parity import ATOL, GRAD_FACTOR, OUTPUT_FACTOR, assert_parity

ALL_TRITON = {op: "triton" for op in OP_FIELDS}
# Each implementation other than the reference ("torch"), one op at a time, then every op on its Triton kernel.
VARIANTS = [{op: impl} for op in OP_FIELDS for impl in implementations(op) if impl != "torch"] + [ALL_TRITON]


def models(config: GPTConfig, ops: dict[str, str], device):
    """(reference in float64, eager float32, the tested model: float32 with the ops on the implementations named)
    sharing one set of weights."""
    torch.manual_seed(0)
    eager = GPT(config).to(device)
    tested = GPT(replace(config, **ops)).to(device)
    tested.load_state_dict(eager.state_dict())
    reference = copy.deepcopy(eager).double()
    return reference, eager, tested


def forward_backward(model, idx, targets):
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets, return_logits=True)
    loss.backward()
    return logits, loss, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("ops", VARIANTS, ids=lambda ops: ",".join(f"{op}={impl}" for op, impl in ops.items()))
def test_logits_loss_and_every_gradient_match(ops, device):
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    reference, eager, tested = models(config, ops, device)
    idx = torch.randint(0, 64, (2, 16), device=device)
    targets = torch.randint(0, 64, (2, 16), device=device)
    targets[0, :5] = -1  # ignored

    ref = forward_backward(reference, idx, targets)
    base = forward_backward(eager, idx, targets)
    ours = forward_backward(tested, idx, targets)
    assert_parity("logits", ours[0], base[0], ref[0], OUTPUT_FACTOR, torch.float32)
    assert_parity("loss", ours[1], base[1], ref[1], OUTPUT_FACTOR, torch.float32)
    assert set(ours[2]) == set(ref[2])
    for name in ref[2]:
        assert_parity(f"grad {name}", ours[2][name], base[2][name], ref[2][name], GRAD_FACTOR, torch.float32)


def test_adamw_steps_track_the_eager_model(device):
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    reference, eager, tested = models(config, ALL_TRITON, device)
    idx = torch.randint(0, 64, (4, 16), device=device)
    targets = torch.randint(0, 64, (4, 16), device=device)
    optimizers = [adamw(m.parameters(), 0.1, 1e-2, (0.9, 0.95), device.type) for m in (reference, eager, tested)]
    for step in range(4):
        losses = []
        for model, optimizer in zip((reference, eager, tested), optimizers):
            _, loss, _ = forward_backward(model, idx, targets)
            optimizer.step()
            losses.append(loss)
        ref, base, ours = losses
        # Each step's loss depends on all earlier updates: gradient tolerance, and atol for Adam's 1/sqrt(v).
        assert_parity(f"loss at step {step}", ours, base, ref, GRAD_FACTOR, torch.float32, atol=10 * ATOL[torch.float32])
    ref_params, eager_params = dict(reference.named_parameters()), dict(eager.named_parameters())
    for name, p in tested.named_parameters():
        assert_parity(f"{name} after the steps", p, eager_params[name], ref_params[name], GRAD_FACTOR, torch.float32,
                      atol=10 * ATOL[torch.float32])


def test_fused_loss_forms_no_logits(device):
    """With the Triton loss, a step given targets returns the loss alone, and the LM head never runs."""
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, loss="triton")
    torch.manual_seed(0)
    model = GPT(config).to(device)
    head_calls = []
    model.lm_head.register_forward_hook(lambda *args: head_calls.append(args))
    idx = torch.randint(0, 64, (2, 16), device=device)
    logits, loss = model(idx, idx)
    assert logits is None and loss.isfinite() and not head_calls
    logits, loss = model(idx)
    assert logits.shape == (2, 16, 64) and loss is None and len(head_calls) == 1


class _OpLog(TorchDispatchMode):
    """Records the name of every ATen operator called inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_triton_attention_layer_copies_nothing(device):
    """With the Triton attention, the sub-layer from its input projection to its output projection runs no copy, in
    the forward or the backward: the heads are split and merged by views of the projection and of the kernel's output,
    and the kernel's backward writes the gradient of the fused projection whole (autograd would otherwise concatenate
    the three gradients of q, k and v into it)."""
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, attention="triton")
    attention = GPT(config).to(device).transformer.h[0].attn
    x = torch.randn(2, 16, 32, device=device, requires_grad=True)
    with _OpLog() as forward:
        y = attention(x)
    with _OpLog() as backward:
        y.backward(torch.randn_like(y))
    for log, kernel in ((forward, "forward"), (backward, "backward")):
        copies = [name for name in log.names if name.startswith(("aten.clone", "aten.copy", "aten.cat"))]
        assert f"tritongpt.flash_attention_qkvpacked_{kernel}.default" in log.names and not copies, log.names


@pytest.mark.gpu
def test_bf16_autocast_training_step_matches_eager():
    device = torch.device("cuda")
    config = GPTConfig(vocab_size=512, block_size=256, n_layer=4, n_head=4, n_embd=256, dropout=0.0)
    reference, eager, tested = models(config, ALL_TRITON, device)
    reference.float()  # under autocast the reference is the fp32 model
    idx = torch.randint(0, 512, (4, 256), device=device)
    targets = torch.randint(0, 512, (4, 256), device=device)
    ref = forward_backward(reference, idx, targets)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        base = forward_backward(eager, idx, targets)
        ours = forward_backward(tested, idx, targets)
    assert_parity("logits", ours[0], base[0], ref[0], OUTPUT_FACTOR, torch.bfloat16)
    assert_parity("loss", ours[1], base[1], ref[1], OUTPUT_FACTOR, torch.bfloat16)
    for name in ref[2]:
        assert_parity(f"grad {name}", ours[2][name], base[2][name], ref[2][name], GRAD_FACTOR, torch.bfloat16)
