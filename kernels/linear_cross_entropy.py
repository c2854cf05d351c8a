"""The LM head's linear layer and the cross-entropy after it, fused so that the logits are never written to memory:
Triton kernels, their autograd Function, and the reference.

Notation: x is (N, D) after flattening its leading dimensions, W = weight is (V, D) (nn.Linear layout, or a tied
token embedding), t (N,) the targets, z = x @ W^T the (N, V) logits, c the number of counted targets (those not
equal to ignore_index), and counted(n) says whether row n's target counts.

    forward   m_n     = max_v z_nv,  l_n = log sum_v exp(z_nv - m_n)      online over blocks of V, fp32
              loss    = sum over counted n of ((m_n - z_n,t_n) + l_n) / c
    backward  G_nv    = counted(n) * (exp((z_nv - m_n) - l_n) - [v = t_n])   (softmax minus one-hot)
              dx      = (g / c) * G @ W,   dW = (g / c) * G^T @ x          (g: the loss's upstream gradient)

Each kernel recomputes its (rows x vocabulary) tiles of z from x and W, so nothing of size N x V is ever stored:
besides the gradients themselves, the op keeps m, l and the per-row losses, fp32 vectors of length N. (m and l
are kept apart rather than as the log-sum-exp m + l: with large logits that sum would round to the ulp of m, while
z - m and m - z are exact where the softmax is not negligible, as in PyTorch's log-softmax.)
Every tile of z is a dot over D in chunks, accumulated in fp32.

No atomics: dx is written by a kernel whose programs each own a block of rows (and a chunk of D's columns), looping
over the whole vocabulary; dW by a kernel whose programs each own a block of the vocabulary (and a chunk of D),
looping over every row. The price is recomputing z: once in the forward, and in each backward kernel once per
chunk of D its programs split D into. The tile sizes depend only on the shape and dtype (no autotuning), and each
sum runs in a fixed order, so the results are bitwise identical from run to run.

Cost, by counting (bench/bench_linear_cross_entropy.py measures it). Memory: at GPT-2's head in bf16 (N = 16,384
tokens, V = 50,257, D = 768) the op adds 192 KiB to its inputs and gradients, where eager PyTorch holds the logits
(1.6 GB), their fp32 log-softmax (3.3 GB) and the logits' gradient. Work: with k chunks of D in the backward, the op
computes (3 + 2k) N V D multiply-adds, eager 3 N V D (one matmul forward, two backward): 9 against 3 at D = 768
(k = 3), all in tensor-core dots, while eager's softmax passes over the N x V logits are bound by memory.
"""
from typing import List

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritongpt.kernels._common import check_tensors, interpreting, kernel_op


def linear_cross_entropy_reference(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -1) -> torch.Tensor:
    return F.cross_entropy(F.linear(x, weight).flatten(0, -2), targets.flatten(), ignore_index=ignore_index)


@triton.jit
def _logits_tile(X, W, rows, cols, row_mask, col_mask, stride_x, D,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """z[rows, cols] = x[rows] @ W[cols]^T in fp32, summed over D in BLOCK_D chunks (zero for rows or columns
    outside the masks)."""
    offs_d = tl.arange(0, BLOCK_D)
    z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d in range(0, D, BLOCK_D):
        d_mask = d + offs_d < D
        x = tl.load(X + rows[:, None] * stride_x + (d + offs_d)[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(W + cols[None, :] * D + (d + offs_d)[:, None],  # W^T's (BLOCK_D, BLOCK_V) tile
                    mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        z = tl.dot(x, w, z, input_precision=PRECISION)
    return z


@triton.jit
def _softmax_minus_onehot(z, row_max, log_sum, targets, cols, counted, col_mask):
    """G's tile: exp((z - m) - l) - [col = target] on counted rows and real columns, zero elsewhere."""
    g = tl.exp((z - row_max[:, None]) - log_sum[:, None]) - tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
    return tl.where(counted[:, None] & col_mask[None, :], g, 0.0)


# Forward. Each program takes BLOCK_N rows and sweeps the vocabulary block by block, keeping per row the running
# maximum m and the sum s of exp(z - m): a new block with maximum m' updates them to max(m, m') and
# s * exp(m - max(m, m')) + sum exp(z - max(m, m')), which never overflows; l = log(s). The target's logit is
# picked out of whichever block holds it. Stores m, l and each row's loss (zero for an ignored target).
@triton.jit
def _forward_kernel(X, W, Targets, RowMax, LogSum, RowLoss, stride_x, N, V, D, ignore_index,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, INDEX_64: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    if INDEX_64:
        rows = rows.to(tl.int64)
    targets = tl.load(Targets + rows, mask=row_mask, other=ignore_index)
    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v in range(0, V, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        if INDEX_64:
            cols = cols.to(tl.int64)
        z = _logits_tile(X, W, rows, cols, row_mask, col_mask, stride_x, D,
                         BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, PRECISION)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))  # finite: every block holds a real column
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        running_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    log_sum = tl.log(running_sum)
    tl.store(RowMax + rows, running_max, mask=row_mask)
    tl.store(LogSum + rows, log_sum, mask=row_mask)
    row_loss = (running_max - target_logit) + log_sum
    tl.store(RowLoss + rows, tl.where(targets != ignore_index, row_loss, 0.0), mask=row_mask)


# dx = (g / c) * G @ W. Program (i, j) owns rows block i and columns chunk j of dx: it sweeps the vocabulary,
# recomputing each tile of z over all of D, turning it into G's tile with the saved m and l, and accumulating
# G_tile @ W[tile, chunk j] in fp32. G is rounded to the input dtype for the dot, as PyTorch's own gradient of the
# logits is; the scale g / c is applied once at the end, so small factors cannot underflow in float16.
@triton.jit
def _grad_x_kernel(X, W, Targets, RowMax, LogSum, GradScale, DX, stride_x, N, V, D, ignore_index,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr,
                   DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, INDEX_64: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    if INDEX_64:
        rows = rows.to(tl.int64)
    targets = tl.load(Targets + rows, mask=row_mask, other=ignore_index)
    row_max = tl.load(RowMax + rows, mask=row_mask, other=0.0)
    log_sum = tl.load(LogSum + rows, mask=row_mask, other=0.0)
    counted = row_mask & (targets != ignore_index)
    out_cols = tl.program_id(1) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    out_mask = out_cols < D
    dx = tl.zeros((BLOCK_N, BLOCK_DOUT), dtype=tl.float32)
    for v in range(0, V, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        if INDEX_64:
            cols = cols.to(tl.int64)
        z = _logits_tile(X, W, rows, cols, row_mask, col_mask, stride_x, D,
                         BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, PRECISION)
        g = _softmax_minus_onehot(z, row_max, log_sum, targets, cols, counted, col_mask).to(W.dtype.element_ty)
        w = tl.load(W + cols[:, None] * D + out_cols[None, :], mask=col_mask[:, None] & out_mask[None, :], other=0.0)
        if DOT_FP32:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        dx = tl.dot(g, w, dx, input_precision=PRECISION)
    dx *= tl.load(GradScale)
    tl.store(DX + rows[:, None] * D + out_cols[None, :], dx.to(DX.dtype.element_ty),
             mask=row_mask[:, None] & out_mask[None, :])


# dW = (g / c) * G^T @ x. Program (i, j) owns vocabulary block i and columns chunk j of dW: it sweeps the rows,
# recomputing each tile of z over all of D and accumulating G_tile^T @ x[rows, chunk j] in fp32, as above.
@triton.jit
def _grad_weight_kernel(X, W, Targets, RowMax, LogSum, GradScale, DW, stride_x, N, V, D, ignore_index,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DOUT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                        INDEX_64: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    if INDEX_64:
        cols = cols.to(tl.int64)
    out_cols = tl.program_id(1) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    out_mask = out_cols < D
    dw = tl.zeros((BLOCK_V, BLOCK_DOUT), dtype=tl.float32)
    for n in range(0, N, BLOCK_N):
        rows = n + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        if INDEX_64:
            rows = rows.to(tl.int64)
        targets = tl.load(Targets + rows, mask=row_mask, other=ignore_index)
        row_max = tl.load(RowMax + rows, mask=row_mask, other=0.0)
        log_sum = tl.load(LogSum + rows, mask=row_mask, other=0.0)
        counted = row_mask & (targets != ignore_index)
        z = _logits_tile(X, W, rows, cols, row_mask, col_mask, stride_x, D,
                         BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, PRECISION)
        g = _softmax_minus_onehot(z, row_max, log_sum, targets, cols, counted, col_mask).to(X.dtype.element_ty)
        x = tl.load(X + rows[:, None] * stride_x + out_cols[None, :], mask=row_mask[:, None] & out_mask[None, :],
                    other=0.0)
        if DOT_FP32:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        dw = tl.dot(tl.trans(g), x, dw, input_precision=PRECISION)
    dw *= tl.load(GradScale)
    tl.store(DW + cols[:, None] * D + out_cols[None, :], dw.to(DW.dtype.element_ty),
             mask=col_mask[:, None] & out_mask[None, :])


def _launch_config(x: torch.Tensor, weight: torch.Tensor, on_gpu: bool) -> dict:
    """Tile sizes, fixed by the shape and dtype so that every run sums in the same order; on_gpu: for a GPU rather
    than the interpreter (bench/gpu_compile.py asks for a GPU's with stand-in CPU tensors).

    On a GPU: 64 rows x 64 vocabulary entries per tile of z, 8 warps, and the backward's outputs in chunks of 256
    columns of D, which bounds the fp32 accumulators at any D at the cost of recomputing z once per chunk: 3 times at
    GPT-2's D = 768. Float32, whose exact dots run on CUDA cores and take twice the registers, gets 32 x 32 tiles, 2
    stages and 64-column chunks: larger ones spilled registers on sm_90 or sm_80 with triton 3.6 or 3.9. Compiled
    for both with these sizes, the kernels spill no registers (bench/gpu_compile.py checks it); with D a multiple of
    16 (aligned rows) their loads are also pipelined. Under the interpreter, whose cost is per operation rather than
    per element, small tiles, so that the tests' small shapes still span several blocks of rows, vocabulary and D.
    Offsets are 32-bit (fewer registers per pointer) unless some element, counting the blocks' overhang, lies 2**31
    or more away."""
    (N, D), V = x.shape, weight.shape[0]
    if on_gpu:
        wide = x.dtype == torch.float32
        blocks = dict(BLOCK_N=32 if wide else 64, BLOCK_V=32 if wide else 64, BLOCK_D=32 if wide else 64,
                      BLOCK_DOUT=min(64 if wide else 256, max(16, triton.next_power_of_2(D))), num_warps=8,
                      num_stages=2 if wide else 3)
    else:
        blocks = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, BLOCK_DOUT=32, num_warps=4, num_stages=1)
    rows, vocab = N + blocks["BLOCK_N"], V + blocks["BLOCK_V"]
    index_64 = max(rows * max(x.stride(0), D), vocab * D) + D >= 2**31
    return dict(**blocks, DOT_FP32=interpreting() and x.dtype == torch.bfloat16,
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32", INDEX_64=index_64)


# Operators rather than an autograd Function, so that torch.compile keeps the kernels in its graph (kernel_op says why
# custom_op). x (N, D) with unit column stride, weight (V, D) contiguous, targets (N,) contiguous int64.

def _forward_outputs(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                     loss_dtype: torch.dtype):
    """(loss, row_max, log_sum, count), unwritten: the loss in loss_dtype, the per-row fp32 statistics the backward
    recomputes the softmax from, and the number of counted targets."""
    row_max = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    return (torch.empty((), dtype=loss_dtype, device=x.device), row_max, torch.empty_like(row_max),
            torch.empty((), dtype=torch.int64, device=x.device))


def _run_forward(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                 loss_dtype: torch.dtype,
                 on_gpu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward operator's work, launched with the configuration for a GPU (on_gpu) or the interpreter."""
    N, D = x.shape
    V = weight.shape[0]
    _, row_max, log_sum, _ = _forward_outputs(x, weight, targets, ignore_index, loss_dtype)
    row_loss = torch.empty(N, dtype=torch.float32, device=x.device)
    if N:
        fwd = {k: v for k, v in _launch_config(x, weight, on_gpu).items() if k != "BLOCK_DOUT"}
        _forward_kernel[(triton.cdiv(N, fwd["BLOCK_N"]),)](
            x, weight, targets, row_max, log_sum, row_loss, x.stride(0), N, V, D, ignore_index, **fwd)
    count = (targets != ignore_index).sum()
    # With every target ignored this is 0 / 0 = nan, as F.cross_entropy's mean.
    return (row_loss.sum() / count).to(loss_dtype), row_max, log_sum, count


@kernel_op("linear_cross_entropy_forward", fake=_forward_outputs)
def _forward(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
             loss_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run_forward(x, weight, targets, ignore_index, loss_dtype, x.is_cuda)


def _backward_outputs(grad_loss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      row_max: torch.Tensor, log_sum: torch.Tensor, count: torch.Tensor, ignore_index: int,
                      want_x: bool, want_weight: bool) -> List[torch.Tensor]:
    """[dx if want_x, then dweight if want_weight], unwritten. (typing.List: the annotation torch.library's schema
    inference reads as Tensor[] in every version since torch 2.4.)"""
    outputs = []
    if want_x:
        outputs.append(torch.empty_like(x, memory_format=torch.contiguous_format))
    if want_weight:
        outputs.append(torch.empty_like(weight))
    return outputs


def _run_backward(grad_loss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  row_max: torch.Tensor, log_sum: torch.Tensor, count: torch.Tensor, ignore_index: int, want_x: bool,
                  want_weight: bool, on_gpu: bool) -> List[torch.Tensor]:
    """The backward operator's work, launched with the configuration for a GPU (on_gpu) or the interpreter."""
    N, D = x.shape
    V = weight.shape[0]
    cfg = _launch_config(x, weight, on_gpu)
    outputs = _backward_outputs(grad_loss, x, weight, targets, row_max, log_sum, count, ignore_index, want_x,
                                want_weight)
    # g / c on the device (no synchronisation); with no counted target G is zero and so are the gradients.
    grad_scale = (grad_loss.float() / count.clamp(min=1)).reshape(1)
    args = (x, weight, targets, row_max, log_sum, grad_scale)
    grads = iter(outputs)
    if want_x:
        dx = next(grads)
        if N:
            grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(D, cfg["BLOCK_DOUT"]))
            _grad_x_kernel[grid](*args, dx, x.stride(0), N, V, D, ignore_index, **cfg)
    if want_weight:
        grid = (triton.cdiv(V, cfg["BLOCK_V"]), triton.cdiv(D, cfg["BLOCK_DOUT"]))
        _grad_weight_kernel[grid](*args, next(grads), x.stride(0), N, V, D, ignore_index, **cfg)
    return outputs


@kernel_op("linear_cross_entropy_backward", fake=_backward_outputs)
def _backward(grad_loss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              row_max: torch.Tensor, log_sum: torch.Tensor, count: torch.Tensor, ignore_index: int, want_x: bool,
              want_weight: bool) -> List[torch.Tensor]:
    return _run_backward(grad_loss, x, weight, targets, row_max, log_sum, count, ignore_index, want_x, want_weight,
                         x.is_cuda)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, targets, ignore_index, _ = inputs
    _, row_max, log_sum, count = output
    ctx.save_for_backward(x, weight, targets, row_max, log_sum, count)
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(row_max, log_sum, count)


def _autograd(ctx, grad_loss, _drow_max, _dlog_sum, _dcount):
    want_x, want_weight = ctx.needs_input_grad[:2]
    grads = iter(_backward(grad_loss, *ctx.saved_tensors, ctx.ignore_index, want_x, want_weight))
    return (next(grads) if want_x else None), (next(grads) if want_weight else None), None, None, None


_forward.register_autograd(_autograd, setup_context=_setup_context)


def _validate(x, weight, targets) -> None:
    op = "linear_cross_entropy"
    check_tensors(op, x=x, weight=weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (vocabulary, D), got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x's last dimension must equal weight.shape[1] = {weight.shape[1]}, "
                         f"got x of shape {tuple(x.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight has an empty vocabulary (shape {tuple(weight.shape)})")
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64:
        kind = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"{op}: targets must be an int64 tensor, got {kind}")
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"{op}: targets has shape {tuple(targets.shape)} but x's leading shape is "
                         f"{tuple(x.shape[:-1])}")
    if targets.device != x.device:
        raise ValueError(f"{op}: targets is on {targets.device} but x is on {x.device}; move them to one device")


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -1) -> torch.Tensor:
    """The mean cross-entropy of the logits x @ weight^T against targets, through the Triton kernels, without ever
    storing the logits; differentiable in x and weight.

    x: (..., D); weight: (V, D); targets: (...) int64, each in [0, V) or equal to ignore_index (ignored: it neither
    adds to the loss nor counts in the mean). Equals F.cross_entropy(F.linear(x, weight).flatten(0, -2),
    targets.flatten(), ignore_index=ignore_index), nan included when every target is ignored (the gradients are
    zero then). Float16, bfloat16 or float32, on one CUDA device (or the CPU under TRITON_INTERPRET=1). Under
    torch.autocast, float32 inputs are cast to the autocast dtype first, as F.linear would, and the loss is float32,
    as autocast's F.cross_entropy; otherwise the loss has x's dtype. Raises ValueError on bad input."""
    device_type = x.device.type if isinstance(x, torch.Tensor) else None
    autocasting = device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type)
    if autocasting:
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = (t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t
                     for t in (x, weight))
    _validate(x, weight, targets)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    loss, _, _, _ = _forward(x2, weight.contiguous(), targets.reshape(-1).contiguous(), int(ignore_index),
                             torch.float32 if autocasting else x.dtype)
    return loss
