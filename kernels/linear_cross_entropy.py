"""The LM head's linear layer and the cross-entropy after it, fused so that the logits are never written to memory:
Triton kernels, their autograd Function, and the reference.

Notation: x is (N, D) after flattening its leading dimensions, W = weight is (V, D) (nn.Linear layout, or a tied
token embedding), t (N,) the targets, z = x @ W^T the (N, V) logits, c the number of counted targets (those not
equal to ignore_index), and counted(n) says whether row n's target counts.

    forward   m_n     = max_v z_nv,  l_n = log sum_v exp(z_nv - m_n)      online over blocks of V, fp32
              loss    = sum over counted n of ((m_n - z_n,t_n) + l_n) / c
    backward  G_nv    = counted(n) * (exp((z_nv - m_n) - l_n) - [v = t_n])   (softmax minus one-hot)
              dx      = (g / c) * G @ W,   dW = (g / c) * G^T @ x          (g: the loss's upstream gradient)

The forward stores nothing of size N x V: each program sweeps a split of the vocabulary for a block of rows,
computing z tile by tile (a dot over D in fp32) and keeping the running statistics, a second kernel merges the
splits' statistics, and the op saves m and l, fp32 vectors of length N. (m and l are kept apart rather than as the
log-sum-exp m + l: with large logits that sum would round to the ulp of m, while z - m and m - z are exact where the
softmax is not negligible, as in PyTorch's log-softmax.)

The backward takes the vocabulary in chunks of _VOCAB_CHUNK entries, in order. For each chunk it recomputes the
chunk's logits and writes G's (N, chunk) block, in the inputs' dtype as PyTorch's gradient of the logits is; then two
matmuls use it: dW's rows for the chunk = G_block^T @ x, complete in one pass over all N rows, and dx += G_block @
W_chunk, an fp32 sum over the chunks kept in an (N, D) buffer. No atomics, no autotuning: the tile sizes depend only
on the shape and dtype and every sum runs in a fixed order, so results are bitwise identical from run to run.

Cost, by counting (bench/bench_linear_cross_entropy.py measures it). Work: 4 N V D multiply-adds (the forward's z,
the backward's z again, dx and dW), against eager PyTorch's 3, all in tensor-core dots; the fourth is traded for
eager's passes over N x V tensors in memory (the logits written and read, their log-softmax and gradient likewise).
Memory: at GPT-2's head in bf16 (N = 16,384 tokens, V = 50,257, D = 768), G's block of 16,384 x 8,192 (256 MiB) and
dx's fp32 sums (48 MiB) on top of the inputs and gradients, where eager PyTorch holds N x V tensors of 1.6 GB each:
the logits, their log-softmax and their gradient. The block grows with N but not with V; the forward alone
(evaluation) needs only the O(N) statistics.

Rejected: chunking the rows instead, each chunk's logits computed once and turned into its loss and G in the forward
(as Liger-Kernel does), 3 N V D in all. Then dW is a sum over the row chunks: in bf16 it rounds at every chunk; in an
fp32 (V, D) buffer it costs 154 MB at GPT-2's head, and a tenth of eager's memory at N = 8,192 (247 MB) leaves the
chunk under 1,000 rows, where dx's matmul for a chunk has 24 output tiles of 128 x 128 for an H100's 132 SMs.
"""
from typing import List

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritongpt.kernels._common import check_tensors, dot_tile, interpreting, kernel_op


def linear_cross_entropy_reference(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -1) -> torch.Tensor:
    return F.cross_entropy(F.linear(x, weight).flatten(0, -2), targets.flatten(), ignore_index=ignore_index)


# Forward, step 1. Program (i, j) takes rows block i and sweeps split j of the vocabulary (span entries, a whole
# number of blocks) block by block, keeping per row the running maximum m and the sum s of exp(z - m): a new block
# with maximum m' updates them to max(m, m') and s * exp(m - max(m, m')) + sum exp(z - max(m, m')), which never
# overflows. The target's logit is picked out of whichever block holds it (zero when the split has none). Splitting
# the vocabulary keeps every SM busy when there are few row blocks; each split stores its (m, s, target logit).
@triton.jit
def _forward_kernel(X, W, Targets, PartMax, PartSum, PartTarget, stride_x, N, V, D, span,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, INDEX_64: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    if INDEX_64:
        rows = rows.to(tl.int64)
    real_rows = rows % N
    targets = tl.load(Targets + real_rows)
    v_start = tl.program_id(1) * span
    v_end = tl.minimum(v_start + span, V)
    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v in range(v_start, v_end, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        if INDEX_64:
            cols = cols.to(tl.int64)
        z = dot_tile(X, W, real_rows, cols % V, stride_x, 1, 1, D, D, tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32),
                      BLOCK_D, EVEN_D, DOT_FP32, PRECISION)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))  # finite: every block holds a real column
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        running_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    out = tl.program_id(1) * N + rows
    tl.store(PartMax + out, running_max, mask=row_mask)
    tl.store(PartSum + out, running_sum, mask=row_mask)
    tl.store(PartTarget + out, target_logit, mask=row_mask)


# Forward, step 2: per row, the splits' (m, s) merged in order by the same update, l = log(s), and the loss
# (m - z_t) + l (zero for an ignored target). Rows past N read stand-ins whose logarithm is finite, and are not stored.
@triton.jit
def _forward_merge_kernel(PartMax, PartSum, PartTarget, Targets, RowMax, LogSum, RowLoss, N, splits, ignore_index,
                          BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < N
    row_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(0, splits):
        split_max = tl.load(PartMax + split * N + rows, mask=row_mask, other=0.0)
        new_max = tl.maximum(row_max, split_max)
        row_sum = (row_sum * tl.exp(row_max - new_max)
                   + tl.load(PartSum + split * N + rows, mask=row_mask, other=1.0) * tl.exp(split_max - new_max))
        row_max = new_max
        target_logit += tl.load(PartTarget + split * N + rows, mask=row_mask, other=0.0)
    log_sum = tl.log(row_sum)
    targets = tl.load(Targets + rows, mask=row_mask, other=ignore_index)
    tl.store(RowMax + rows, row_max, mask=row_mask)
    tl.store(LogSum + rows, log_sum, mask=row_mask)
    tl.store(RowLoss + rows, tl.where(targets != ignore_index, (row_max - target_logit) + log_sum, 0.0), mask=row_mask)


# Backward, step 1 for one chunk of the vocabulary, columns [v0, v0 + width) (WChunk: those rows of W): G's
# (N, width) block, written in the inputs' dtype (as PyTorch's gradient of the logits is). Program (i, j) recomputes
# the logits of rows block i and chunk columns block j over all of D, then G from them and the saved m and l.
@triton.jit
def _softmax_grad_kernel(X, WChunk, Targets, RowMax, LogSum, G, stride_x, stride_g, N, width, v0, D, ignore_index,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                         DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, INDEX_64: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk_cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = chunk_cols < width
    if INDEX_64:
        rows = rows.to(tl.int64)
        chunk_cols = chunk_cols.to(tl.int64)
    real_rows = rows % N
    targets = tl.load(Targets + real_rows)
    row_max = tl.load(RowMax + real_rows)
    log_sum = tl.load(LogSum + real_rows)
    z = dot_tile(X, WChunk, real_rows, chunk_cols % width, stride_x, 1, 1, D, D,
                  tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32), BLOCK_D, EVEN_D, DOT_FP32, PRECISION)
    is_target = (v0 + chunk_cols)[None, :] == targets[:, None]
    g = tl.exp((z - row_max[:, None]) - log_sum[:, None]) - tl.where(is_target, 1.0, 0.0)
    g = tl.where((targets != ignore_index)[:, None], g, 0.0)
    tl.store(G + rows[:, None] * stride_g + chunk_cols[None, :], g.to(G.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


# Backward, step 2: the gradients' matmuls, C (M, K') = A (M, K) @ B (K, K') with any strides, fp32 accumulator.
#   dW's rows of the chunk:  A = G^T, B = x, K = N     written once: FINAL, C = (g / c) * acc in dW's dtype
#   dx:                      A = G,   B = W's rows of the chunk, K = width   summed over the chunks in order:
#                            acc starts from the fp32 Partial sums unless FIRST, and is stored back into Partial
#                            unless FINAL (the last chunk), where C = (g / c) * acc in dx's dtype
# The scale g / c comes last, so that small factors cannot underflow G in float16. Not the MLP's matmul kernel, whose
# main loop (dot_tile) it shares: that one autotunes, so the tile, and with it the order of the sums, could differ
# from one process to the next, and its trial launches may only write their outputs, never add to them.
@triton.jit
def _grad_matmul_kernel(A, B, C, Partial, GradScale, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                        FIRST: tl.constexpr, FINAL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, INDEX_64: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    c_offs = offs_m[:, None] * N + offs_n[None, :]
    if FIRST:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.load(Partial + c_offs, mask=mask, other=0.0)
    acc = dot_tile(A, B, offs_m % M, offs_n % N, stride_am, stride_ak, stride_bk, stride_bn, K, acc,
                    BLOCK_K, EVEN_K, DOT_FP32, PRECISION)
    if FINAL:
        tl.store(C + c_offs, (acc * tl.load(GradScale)).to(C.dtype.element_ty), mask=mask)
    else:
        tl.store(Partial + c_offs, acc, mask=mask)


# Programs the forward aims for: it splits the vocabulary into as many parts as it takes for its rows blocks to
# number this many, a few waves on any GPU (an H100 has 132 SMs), with the vocabulary's blocks as the limit. Its
# merge kernel takes _MERGE_ROWS rows a program. Under the interpreter, few, so that the tests' shapes get splits
# of several blocks each.
_FORWARD_PROGRAMS = 4 if interpreting() else 1024
_MERGE_ROWS = 16 if interpreting() else 512

# Vocabulary entries per chunk of the backward: N x this many elements of G are stored at a time. On a GPU 8192: dW's
# matmul for a chunk then has (8192 / 128) x (D / 128) output tiles, 384 at D = 768, nearly three full waves over an
# H100's 132 SMs (4096 would give 192, and the second of two waves would leave more than half the SMs idle), while
# G's block costs N x 16 KiB in bf16: 256 MiB at N = 16,384, against the 1.6 GB of each N x V tensor eager PyTorch
# keeps. Under the interpreter 128, so that the tests' vocabularies span several chunks with a narrower last one.
_VOCAB_CHUNK = 128 if interpreting() else 8192


def _launch_config(x: torch.Tensor, weight: torch.Tensor, on_gpu: bool) -> dict:
    """Tile sizes, fixed by the shape and dtype so that every run sums in the same order; on_gpu: for a GPU rather
    than the interpreter (bench/gpu_compile.py asks for a GPU's with stand-in CPU tensors). Returns one keyword
    dictionary per kernel ("forward", "softmax_grad", "matmul"); the matmul's launcher adds EVEN_K.

    On a GPU, in 16-bit: 128 x 128 tiles in every kernel, D (or K) in steps of 64, 8 warps. Float32, whose exact
    dots run on CUDA cores and take twice the registers and shared memory, gets the forward 32 x 32 tiles in 2
    stages, G's kernel 128 x 64 and the matmuls 64 x 128, stepping by 32. Compiled for sm_90 and sm_80 with these
    sizes, no kernel spills registers or overflows shared memory (bench/gpu_compile.py checks it). Under the
    interpreter, whose cost is per operation rather than per element, small tiles, so that the tests' small shapes
    still span several blocks of each dimension. Offsets are 32-bit (fewer registers per pointer) unless some
    element, counting the blocks' overhang, lies 2**31 or more away."""
    (N, D), V = x.shape, weight.shape[0]
    wide = x.dtype == torch.float32
    if not on_gpu:
        tiles = {"forward": (16, 64, 32, 4, 1), "softmax_grad": (16, 64, 32, 4, 1), "matmul": (32, 32, 32, 4, 1)}
    elif wide:
        tiles = {"forward": (32, 32, 32, 8, 2), "softmax_grad": (128, 64, 32, 8, 3), "matmul": (64, 128, 32, 8, 4)}
    else:
        tiles = {"forward": (128, 128, 64, 8, 3), "softmax_grad": (128, 128, 64, 8, 3), "matmul": (128, 128, 64, 8, 4)}
    longest_row = max(x.stride(0), D, min(V, _VOCAB_CHUNK))
    index_64 = (max(N, V) + 128) * longest_row + D >= 2**31
    common = dict(DOT_FP32=interpreting() and x.dtype == torch.bfloat16,
                  PRECISION="ieee" if wide else "tf32", INDEX_64=index_64)
    config = {}
    for kernel, (rows, cols, depth, warps, stages) in tiles.items():
        if kernel == "matmul":
            blocks = dict(BLOCK_M=rows, BLOCK_N=cols, BLOCK_K=depth)
        else:
            blocks = dict(BLOCK_N=rows, BLOCK_V=cols, BLOCK_D=depth, EVEN_D=D % depth == 0)
        config[kernel] = dict(**blocks, **common, num_warps=warps, num_stages=stages)
    return config


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
        cfg = _launch_config(x, weight, on_gpu)["forward"]
        row_blocks, vocab_blocks = triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"])
        span = triton.cdiv(vocab_blocks, min(vocab_blocks, triton.cdiv(_FORWARD_PROGRAMS, row_blocks)))
        splits = triton.cdiv(vocab_blocks, span)  # every split holds at least one block of the vocabulary
        partials = torch.empty(3, splits, N, dtype=torch.float32, device=x.device)
        _forward_kernel[(row_blocks, splits)](x, weight, targets, *partials, x.stride(0), N, V, D,
                                              span * cfg["BLOCK_V"], **cfg)
        _forward_merge_kernel[(triton.cdiv(N, _MERGE_ROWS),)](*partials, targets, row_max, log_sum, row_loss, N,
                                                               splits, ignore_index, BLOCK=_MERGE_ROWS)
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
    """The backward operator's work, launched with the configuration for a GPU (on_gpu) or the interpreter: for each
    chunk of the vocabulary in order, G's block, then its share of dW and of dx."""
    N, D = x.shape
    V = weight.shape[0]
    outputs = _backward_outputs(grad_loss, x, weight, targets, row_max, log_sum, count, ignore_index, want_x,
                                want_weight)
    grads = iter(outputs)
    dx, dweight = (next(grads) if want_x else None), (next(grads) if want_weight else None)
    if N == 0:
        if dweight is not None:
            dweight.zero_()
        return outputs
    cfg = _launch_config(x, weight, on_gpu)
    # g / c on the device (no synchronisation); with no counted target G is zero and so are the gradients.
    grad_scale = (grad_loss.float() / count.clamp(min=1)).reshape(1)
    chunk = min(V, _VOCAB_CHUNK)
    g = torch.empty(N, chunk, dtype=x.dtype, device=x.device)
    partial = None  # dx's fp32 sums over the chunks so far, when there is more than one
    if dx is not None and V > chunk:
        partial = dx if dx.dtype == torch.float32 else torch.empty(N, D, dtype=torch.float32, device=x.device)
    softmax_grad = cfg["softmax_grad"]
    for v0 in range(0, V, chunk):
        width = min(chunk, V - v0)
        weight_chunk = weight[v0:v0 + width]
        grid = (triton.cdiv(N, softmax_grad["BLOCK_N"]), triton.cdiv(width, softmax_grad["BLOCK_V"]))
        _softmax_grad_kernel[grid](x, weight_chunk, targets, row_max, log_sum, g, x.stride(0), chunk, N, width, v0, D,
                                   ignore_index, **softmax_grad)
        if dweight is not None:
            _grad_matmul(g.T[:width], x, dweight[v0:v0 + width], None, grad_scale, True, True, cfg["matmul"])
        if dx is not None:
            _grad_matmul(g[:, :width], weight_chunk, dx, partial, grad_scale, v0 == 0, v0 + width == V,
                         cfg["matmul"])
    return outputs


def _grad_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, partial: torch.Tensor | None,
                 grad_scale: torch.Tensor, first: bool, final: bool, cfg: dict) -> None:
    """_grad_matmul_kernel's launch for out (M, K') from a @ b, a (M, K) and b (K, K') as views with any strides."""
    (M, K), n = a.shape, b.shape[1]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _grad_matmul_kernel[grid](a, b, out, out if partial is None else partial, grad_scale, M, n, K, a.stride(0),
                              a.stride(1), b.stride(0), b.stride(1), FIRST=first, FINAL=final,
                              EVEN_K=K % cfg["BLOCK_K"] == 0, **cfg)


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
