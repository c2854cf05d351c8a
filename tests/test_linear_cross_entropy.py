"""The fused linear + cross-entropy against its reference (F.linear, then F.cross_entropy), by the parity rule in
tests/parity.py: the loss, dx and dweight, with fresh random inputs and the kernel's allocations poisoned.

Under the interpreter the kernels' tiles are 16 rows x 64 vocabulary entries x 32 columns of D (32 x 32 x 32 in
the backward's matmuls), and the backward takes the vocabulary 128 entries at a time, so the shapes below span
several blocks of each and several chunks, with partial blocks and chunks at every edge.
"""
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from tritongpt.kernels import linear_cross_entropy, linear_cross_entropy_reference
from tritongpt.kernels.linear_cross_entropy import _VOCAB_CHUNK
from tests.parity import GRAD_FACTOR, OUTPUT_FACTOR, assert_deterministic, assert_parity, check_parity, forward_backward


def _inputs(leading, vocab, width, dtype, device, logit_scale=3.0):
    """{x, weight} with logits of standard deviation about logit_scale."""
    return {"x": torch.randn(*leading, width, device=device).to(dtype),
            "weight": (logit_scale / width ** 0.5 * torch.randn(vocab, width, device=device)).to(dtype)}


def _targets(leading, vocab, device, ignored_fraction=0.2, ignore_index=-1):
    targets = torch.randint(0, vocab, leading, device=device)
    return targets.masked_fill(torch.rand(leading, device=device) < ignored_fraction, ignore_index)


def _check(inputs, targets, dtype, ignore_index=-1):
    # The upstream gradient is not 1, so the gradients' scale (upstream / counted targets) is tested too.
    check_parity(linear_cross_entropy, linear_cross_entropy_reference, inputs, [torch.tensor(-1.7)], dtype,
                 ("loss",), targets=targets, ignore_index=ignore_index)


@pytest.mark.parametrize("leading,vocab,width,dtype", [
    ((37,), 301, 48, torch.float32),
    ((3, 13), 257, 40, torch.float16),
    ((2, 11), 129, 16, torch.bfloat16),
    ((21,), 65, 72, torch.float16),
    ((4, 5), 200, 64, torch.float32),
], ids=lambda v: str(v).replace("torch.", ""))
def test_parity(leading, vocab, width, dtype, device):
    torch.manual_seed(vocab + width)
    _check(_inputs(leading, vocab, width, dtype, device), _targets(leading, vocab, device), dtype)


@pytest.mark.parametrize("wanted", [("x",), ("weight",)])
def test_one_gradient(wanted, device):
    """A frozen head (dx alone) or a frozen input (dW alone): the backward computes only what is asked for."""
    torch.manual_seed(11)
    inputs = _inputs((3, 11), 290, 40, torch.bfloat16, device)
    check_parity(linear_cross_entropy, linear_cross_entropy_reference, inputs, [torch.tensor(0.6)], torch.bfloat16,
                 ("loss",), requires_grad=wanted, targets=_targets((3, 11), 290, device))


def test_memory_bounded_by_a_vocabulary_chunk(device):
    """No tensor the op's launchers allocate (all through torch.empty*) holds the N x V logits or their gradient: the
    largest is G's block of one chunk of the vocabulary (N x _VOCAB_CHUNK); the rest are O(N), O(N x D) or the
    gradients themselves."""
    torch.manual_seed(12)
    rows, vocab, width = 40, 5 * _VOCAB_CHUNK + 3, 24
    inputs, targets = _inputs((rows,), vocab, width, torch.float16, device), _targets((rows,), vocab, device)
    sizes = []

    def recording(factory):
        def make(*args, **kwargs):
            t = factory(*args, **kwargs)
            sizes.append(t.numel())
            return t
        return make

    with mock.patch("torch.empty", recording(torch.empty)), \
            mock.patch("torch.empty_like", recording(torch.empty_like)):
        forward_backward(linear_cross_entropy, inputs, [None], targets=targets)
    gradients = {rows * width, vocab * width}
    assert max(n for n in sizes if n not in gradients) <= rows * _VOCAB_CHUNK < rows * vocab


def test_large_logits(device):
    """Every logit shifted by 100, where exp overflows float32: the online log-sum-exp must not (the shift comes from
    one column of x and weight, so the loss and the gradients keep their usual scale)."""
    torch.manual_seed(1)
    inputs = _inputs((19,), 150, 32, torch.float32, device)
    inputs["x"][:, 0], inputs["weight"][:, 0] = 10.0, 10.0
    _check(inputs, _targets((19,), 150, device), torch.float32)


def test_other_ignore_index(device):
    """ignore_index may be a real class: those targets are dropped, the class's logits still count in the
    log-sum-exp."""
    torch.manual_seed(2)
    targets = torch.randint(0, 10, (40,), device=device)
    assert (targets == 7).any()
    _check(_inputs((40,), 10, 24, torch.float32, device), targets, torch.float32, ignore_index=7)


def test_all_but_one_target_ignored(device):
    torch.manual_seed(3)
    targets = torch.full((2, 17), -1, device=device)
    targets[1, 9] = 33
    _check(_inputs((2, 17), 111, 40, torch.float16, device), targets, torch.float16)


def test_every_target_ignored_gives_nan_and_zero_gradients(device):
    """As F.cross_entropy: the mean over no targets is 0 / 0 = nan, and the gradients are zero."""
    torch.manual_seed(4)
    inputs = _inputs((9,), 70, 16, torch.float32, device)
    targets = torch.full((9,), -1, device=device)
    (loss,), grads = forward_backward(linear_cross_entropy, inputs, [None], targets=targets)
    (expected,), expected_grads = forward_backward(linear_cross_entropy_reference, inputs, [None], targets=targets)
    assert loss.isnan() and expected.isnan()
    for name, grad in grads.items():
        assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(grad, expected_grads[name])


def test_no_rows(device):
    inputs = _inputs((0, 3), 50, 16, torch.float32, device)
    (loss,), grads = forward_backward(linear_cross_entropy, inputs, [None],
                                      targets=torch.zeros(0, 3, dtype=torch.long, device=device))
    assert loss.isnan()
    assert grads["x"].shape == (0, 3, 16) and torch.equal(grads["weight"], torch.zeros(50, 16, device=device))


def test_non_contiguous_x(device):
    """A column slice of a wider tensor (read in place through its row stride) and a transposed input (copied)."""
    torch.manual_seed(5)
    weight = _inputs((1,), 130, 40, torch.float32, device)["weight"]
    sliced = torch.randn(3, 7, 40 + 9, device=device)[..., 4:44]
    transposed = torch.randn(40, 7, 3, device=device).transpose(0, 2)
    for x in (sliced, transposed):
        assert not x.is_contiguous()
        _check({"x": x, "weight": weight}, _targets((3, 7), 130, device), torch.float32)


def test_tied_weight_gradients_add_up(device):
    """The weight as both the token embedding and the head: its gradient is the sum of both uses'."""
    torch.manual_seed(6)
    weight = _inputs((1,), 90, 32, torch.float16, device)["weight"]
    idx, targets = torch.randint(0, 90, (2, 12), device=device), _targets((2, 12), 90, device)

    def tied(op):
        return lambda weight, idx, targets: op(F.embedding(idx, weight), weight, targets)

    check_parity(tied(linear_cross_entropy), tied(linear_cross_entropy_reference), {"weight": weight},
                 [torch.tensor(0.8)], torch.float16, ("loss",), idx=idx, targets=targets)


def test_autocast(device):
    """Under autocast, float32 inputs run in the autocast dtype and the loss is float32, as with F.linear and
    F.cross_entropy; the gradients reach the float32 leaves."""
    torch.manual_seed(10)
    inputs, targets = _inputs((2, 15), 99, 32, torch.float32, device), _targets((2, 15), 99, device)
    truth = forward_backward(linear_cross_entropy_reference, inputs, [None], targets=targets)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        eager = forward_backward(linear_cross_entropy_reference, inputs, [None], targets=targets)
        ours = forward_backward(linear_cross_entropy, inputs, [None], targets=targets)
    assert ours[0][0].dtype == eager[0][0].dtype == torch.float32
    assert_parity("loss", ours[0][0], eager[0][0], truth[0][0], OUTPUT_FACTOR, torch.bfloat16)
    for name in inputs:
        assert ours[1][name].dtype == torch.float32
        assert_parity(f"d{name}", ours[1][name], eager[1][name], truth[1][name], GRAD_FACTOR, torch.bfloat16)


def test_deterministic(device):
    torch.manual_seed(7)
    assert_deterministic(linear_cross_entropy, _inputs((45,), 200, 48, torch.float16, device), [None],
                         targets=_targets((45,), 200, device))


def _valid(device):
    return torch.randn(4, 8, device=device), torch.randn(10, 8, device=device), torch.randint(0, 10, (4,),
                                                                                              device=device)


@pytest.mark.parametrize("change,message", [
    (lambda x, w, t: (x, w[0], t), "weight must be 2-D"),
    (lambda x, w, t: (x[:, :7], w, t), "last dimension must equal weight.shape"),
    (lambda x, w, t: (x, w[:0], t), "empty vocabulary"),
    (lambda x, w, t: (x, w, t[:3]), "targets has shape"),
    (lambda x, w, t: (x, w, t.int()), "targets must be an int64 tensor"),
    (lambda x, w, t: (x, w, t.tolist()), "targets must be an int64 tensor"),
    (lambda x, w, t: (x, w.half(), t), "weight is torch.float16"),
    (lambda x, w, t: (x.double(), w.double(), t), "float64"),
    (lambda x, w, t: (x, w.to("meta"), t), "weight is on meta"),
    (lambda x, w, t: (x, w, t.to("meta")), "targets is on meta"),
], ids=["weight 1-D", "width", "empty vocabulary", "targets shape", "targets int32", "targets list", "mixed dtypes",
        "float64", "weight device", "targets device"])
def test_rejects(change, message, device):
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(*change(*_valid(device)))


@pytest.mark.gpu
@pytest.mark.parametrize("rows,vocab,width", [(4096, 50257, 768), (1000, 50257, 1600), (257, 32003, 8192)])
def test_bf16_parity_on_gpu(rows, vocab, width, device):
    torch.manual_seed(width)
    _check(_inputs((rows,), vocab, width, torch.bfloat16, device), _targets((rows,), vocab, device), torch.bfloat16)


@pytest.mark.gpu
def test_bf16_gpt2_batch_on_gpu(device):
    """A GPT-2 micro-batch (4 x 1024 tokens), 3-D, a sliced (non-contiguous) x."""
    torch.manual_seed(8)
    x = torch.randn(4, 1024, 800, device=device).to(torch.bfloat16)[..., 16:784]
    weight = _inputs((1,), 50257, 768, torch.bfloat16, device)["weight"]
    _check({"x": x, "weight": weight}, _targets((4, 1024), 50257, device), torch.bfloat16)


@pytest.mark.gpu
def test_extra_memory_on_gpu(device):
    """GPT-2's head at 8 x 1024 tokens in bf16: beyond its inputs and the two gradients, the op needs at most G's
    block of one vocabulary chunk, dx's fp32 sums and 16 MiB of statistics and slack; eager PyTorch holds three
    N x V tensors (2.4 GiB)."""
    torch.manual_seed(13)
    rows, vocab, width = 8192, 50257, 768
    inputs = {name: t.requires_grad_() for name, t in _inputs((rows,), vocab, width, torch.bfloat16, device).items()}
    targets = _targets((rows,), vocab, device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = torch.autograd.grad(linear_cross_entropy(*inputs.values(), targets), list(inputs.values()))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - sum(g.numel() * g.element_size() for g in grads)
    assert extra <= rows * _VOCAB_CHUNK * 2 + rows * width * 4 + 16 * 2**20 < rows * vocab * 2 * 3 / 10


@pytest.mark.gpu
def test_deterministic_on_gpu(device):
    torch.manual_seed(9)
    assert_deterministic(linear_cross_entropy, _inputs((8192,), 50257, 768, torch.bfloat16, device), [None],
                         runs=3, targets=_targets((8192,), 50257, device))
