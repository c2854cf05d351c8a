"""LayerNorm over the last dimension, alone and with the residual add fused in: Triton kernels and references.

`add_layer_norm(update, stream, ...)` returns (LayerNorm(stream + update), stream + update) from one read of each,
so a transformer block's residual stream and its next LayerNorm share one pass over the activations. The update may
have another dtype than the stream (a bf16 sub-layer output added to an fp32 stream under autocast): the sum is
rounded to the stream's dtype, and the normalised output is written in out_dtype (default: the stream's), the dtype
the next matmul reads, so that neither the update nor the output takes a separate cast pass.
`layer_norm` is the same kernels with the residual switched off (a constexpr flag).

Layout: any leading shape is viewed as (rows, N) with `reshape`, which copies only when the rows cannot be
described by one stride (a transposed input, say); the kernels take a row stride, so a row view such as
`x[..., :N]` of a wider tensor is read in place. Outputs are contiguous.

Statistics are fp32, and mean and rstd are saved in fp32 for the backward. dweight and dbias are summed in fp32:
each backward program owns one row of a (programs, N) buffer of partial sums, and torch.sum reduces the buffer
afterwards, so with a fixed configuration the gradients are bitwise identical from run to run.
"""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritongpt.kernels._common import SUPPORTED_DTYPES, check_tensors, kernel_op


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         eps: float = 1e-5, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps).to(out_dtype or x.dtype)


def add_layer_norm_reference(update: torch.Tensor, stream: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None = None, eps: float = 1e-5,
                             out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(LayerNorm(stream + update) in out_dtype (default: stream's), stream + update in stream's dtype)."""
    summed = (stream + update).to(stream.dtype)
    return layer_norm_reference(summed, weight, bias, eps, out_dtype), summed


@triton.jit
def _load_input(X, R, rows, cols, stride_x, stride_r, mask, HAS_RESIDUAL: tl.constexpr):
    """A tile of the LayerNorm's input in fp32: x, or x + residual rounded to the residual's (the stream's) dtype,
    which is the value add_layer_norm returns as `summed`, so that normed == LayerNorm(summed) as the reference
    computes it."""
    s = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (s + r).to(R.dtype.element_ty).to(tl.float32)
    return s


@triton.jit
def _normalize_store(Y, W, B, s, mean, rstd, rows, cols, N, mask, HAS_BIAS: tl.constexpr):
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = (s - mean[:, None]) * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


# Forward, per row, s = x (+ residual):
#   mean = sum(s) / N,  rstd = 1 / sqrt(sum((s - mean)^2) / N + eps),  y = (s - mean) * rstd * w + b
# Each program normalises BLOCK_M rows. A row that fits one block is loaded once and the variance is taken
# about the mean (two-pass, in registers). A wider row is read twice: once for the statistics, merging each
# chunk's own (mean, M2) into the running ones by Chan et al.'s pairwise formula, which stays accurate where
# E[s^2] - E[s]^2 would cancel; and once to normalise.
@triton.jit
def _div(x, n):
    """x / n rounded to nearest, as PyTorch divides: Triton's `/` on fp32 is the approximate div.full.f32 (2 ulp), and
    a row's statistics must not be off by more than rounding (at width 1, s - mean must be exactly 0)."""
    return tl.math.div_rn(x, tl.cast(n, tl.float32))


@triton.jit
def _layer_norm_fwd_kernel(X, R, W, B, Y, S, Mean, Rstd,
                           stride_x, stride_r, n_rows, N, eps,
                           HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)  # rows * stride can pass 2**31 elements
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        mask = row_mask[:, None] & (cols < N)[None, :]
        s = _load_input(X, R, rows, cols, stride_x, stride_r, mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(S + rows[:, None] * N + cols[None, :], s.to(S.dtype.element_ty), mask=mask)
        mean = _div(tl.sum(s, axis=1), N)
        centred = tl.where(mask, s - mean[:, None], 0.0)
        rstd = tl.rsqrt(_div(tl.sum(centred * centred, axis=1), N) + eps)
        _normalize_store(Y, W, B, s, mean, rstd, rows, cols, N, mask, HAS_BIAS)
    else:
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = row_mask[:, None] & (start + cols < N)[None, :]
            s = _load_input(X, R, rows, start + cols, stride_x, stride_r, mask, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(S + rows[:, None] * N + start + cols[None, :], s.to(S.dtype.element_ty), mask=mask)
            seen = tl.cast(start, tl.float32)
            count = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            chunk_mean = _div(tl.sum(s, axis=1), count)
            centred = tl.where(mask, s - chunk_mean[:, None], 0.0)
            delta = chunk_mean - mean
            mean += delta * _div(count, seen + count)
            m2 += tl.sum(centred * centred, axis=1) + delta * delta * _div(seen * count, seen + count)
        rstd = tl.rsqrt(_div(m2, N) + eps)
        for start in range(0, N, BLOCK_N):
            mask = row_mask[:, None] & (start + cols < N)[None, :]
            s = _load_input(X, R, rows, start + cols, stride_x, stride_r, mask, HAS_RESIDUAL)
            _normalize_store(Y, W, B, s, mean, rstd, rows, start + cols, N, mask, HAS_BIAS)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _grad_terms(S, DY, w, rows, cols, stride_s, stride_dy, mean, rstd, mask):
    """xhat = (s - mean) * rstd, dy and g = w * dy for one tile, in fp32 (zero outside the mask)."""
    s = tl.load(S + rows[:, None] * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
    return xhat, dy, w[None, :] * dy


@triton.jit
def _store_dx(DX, DS, xhat, g, c1, c2, rstd, rows, cols, stride_ds, N, mask, HAS_DSUMMED: tl.constexpr):
    dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    if HAS_DSUMMED:  # add_layer_norm: `summed` is both an output and the norm's input; its gradients add
        dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# Backward, per row, with xhat = (s - mean) * rstd and g = w * dy:
#   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))        (+ the gradient arriving at `summed`)
#   dw = sum over rows of dy * xhat,  db = sum over rows of dy
# Program p takes row blocks p, p + P, p + 2P, ... and sums its dw and db in fp32 registers, storing them once into
# row p of DWp and DBp: no two programs touch one address, and no address is read back, so no locks or atomics and
# a fixed summation order. A row that fits one block is read once. A wider row is read twice, in two phases: the
# first sweeps the program's row blocks, chunk by chunk, for mean(g) and mean(g * xhat), which it stores per row
# in C1 and C2; the second sweeps chunk by chunk, and within a chunk over the program's row blocks, writing dx and
# summing that chunk's dw and db in registers. A barrier between them makes every thread's C1 and C2 stores
# visible to all threads of the program.
@triton.jit
def _row_block(Mean, Rstd, first_row, n_rows, BLOCK_M: tl.constexpr):
    """rows (int64), their mask, mean and rstd for the row block starting at first_row."""
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
    rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
    return rows, row_mask, mean, rstd


@triton.jit
def _layer_norm_bwd_kernel(S, W, Mean, Rstd, DY, DS, DX, DWp, DBp, C1, C2,
                           stride_s, stride_dy, stride_ds, n_rows, N,
                           HAS_DSUMMED: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_M
    cols = tl.arange(0, BLOCK_N)
    partial = pid.to(tl.int64) * N + cols
    if SINGLE_BLOCK:
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for first_row in range(pid * BLOCK_M, n_rows, step):
            rows, row_mask, mean, rstd = _row_block(Mean, Rstd, first_row, n_rows, BLOCK_M)
            mask = row_mask[:, None] & (cols < N)[None, :]
            xhat, dy, g = _grad_terms(S, DY, w, rows, cols, stride_s, stride_dy, mean, rstd, mask)
            c1 = _div(tl.sum(xhat * g, axis=1), N)
            c2 = _div(tl.sum(g, axis=1), N)
            _store_dx(DX, DS, xhat, g, c1, c2, rstd, rows, cols, stride_ds, N, mask, HAS_DSUMMED)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
        tl.store(DWp + partial, dw, mask=cols < N)
        tl.store(DBp + partial, db, mask=cols < N)
    else:
        for first_row in range(pid * BLOCK_M, n_rows, step):
            rows, row_mask, mean, rstd = _row_block(Mean, Rstd, first_row, n_rows, BLOCK_M)
            c1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            c2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                col_mask = start + cols < N
                mask = row_mask[:, None] & col_mask[None, :]
                w = tl.load(W + start + cols, mask=col_mask, other=0.0).to(tl.float32)
                xhat, dy, g = _grad_terms(S, DY, w, rows, start + cols, stride_s, stride_dy, mean, rstd, mask)
                c1 += tl.sum(xhat * g, axis=1)
                c2 += tl.sum(g, axis=1)
            tl.store(C1 + rows, _div(c1, N), mask=row_mask)
            tl.store(C2 + rows, _div(c2, N), mask=row_mask)
        tl.debug_barrier()
        for start in range(0, N, BLOCK_N):
            col_mask = start + cols < N
            w = tl.load(W + start + cols, mask=col_mask, other=0.0).to(tl.float32)
            dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
            db = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for first_row in range(pid * BLOCK_M, n_rows, step):
                rows, row_mask, mean, rstd = _row_block(Mean, Rstd, first_row, n_rows, BLOCK_M)
                c1 = tl.load(C1 + rows, mask=row_mask, other=0.0)
                c2 = tl.load(C2 + rows, mask=row_mask, other=0.0)
                mask = row_mask[:, None] & col_mask[None, :]
                xhat, dy, g = _grad_terms(S, DY, w, rows, start + cols, stride_s, stride_dy, mean, rstd, mask)
                _store_dx(DX, DS, xhat, g, c1, c2, rstd, rows, start + cols, stride_ds, N, mask, HAS_DSUMMED)
                dw += tl.sum(dy * xhat, axis=0)
                db += tl.sum(dy, axis=0)
            tl.store(DWp + partial + start, dw, mask=col_mask)
            tl.store(DBp + partial + start, db, mask=col_mask)


@functools.lru_cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache
def _launch_config(N: int, n_rows: int, on_gpu: bool) -> dict:
    """Block shape and warps. A row up to max_block wide is held whole in registers; wider rows go in chunks.
    A tile holds about `tile` elements: several rows per program when rows are narrow, so that each program
    moves enough bytes. Under the interpreter, whose cost is per operation (and per call of a jitted helper)
    rather than per element, tiles are large and whole rows stop at 1024, so the tests' 4097-wide rows take
    the chunked path."""
    max_block, chunk, tile = (8192, 2048, 4096) if on_gpu else (1024, 1024, 16384)
    block_n = triton.next_power_of_2(N) if N <= max_block else chunk
    block_m = max(1, min(tile // block_n, 16, triton.next_power_of_2(n_rows)))
    elements = block_m * block_n
    # Rows held whole from 4096 wide get 16 warps: with 8, a 4096-wide fp16 row spilled registers on sm_80.
    num_warps = 16 if elements >= 8192 or block_n >= 4096 else 8 if elements >= 2048 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_BLOCK=N <= max_block, num_warps=num_warps)


def _backward_programs(device: torch.device, row_blocks: int) -> int:
    """Programs of the backward: a few per SM on a GPU so that each loops over many row blocks and the
    (programs, N) partial sums stay small; two under the interpreter, so that the tests see a program take
    several row blocks and the partial sums of several programs reduced."""
    return max(1, min(row_blocks, 2 * _sm_count(device.index) if device.type == "cuda" else 2))


def _as_rows(t: torch.Tensor, N: int) -> torch.Tensor:
    """t as (rows, N) with unit column stride: a view when one row stride describes it, else a copy."""
    t = t.reshape(-1, N)
    return t if t.stride(-1) == 1 or N == 1 else t.contiguous()


def _normalize(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
               eps: float, y: torch.Tensor, summed: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
               on_gpu: bool) -> None:
    """Write y = LayerNorm(x (+ residual)) and each row's mean and rstd, and summed = x + residual when there is a
    residual, with the launch configuration for a GPU (on_gpu) or the interpreter."""
    N = x.shape[-1]
    x2 = _as_rows(x, N)
    n_rows = x2.shape[0]
    r2 = _as_rows(residual, N) if residual is not None else x2
    if n_rows:
        cfg = _launch_config(N, n_rows, on_gpu)
        _layer_norm_fwd_kernel[(triton.cdiv(n_rows, cfg["BLOCK_M"]),)](
            x2, r2, weight, bias if bias is not None else weight, y, summed if summed is not None else y, mean, rstd,
            x2.stride(0), r2.stride(0), n_rows, N, eps,
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, **cfg)


# Operators rather than an autograd Function, so that torch.compile keeps the kernels in its graph (kernel_op says why
# custom_op: here the launch configuration is cached per shape and the backward's grid is sized by the SM count).
# The forward has two operators, since an operator's outputs never alias its inputs: layer_norm saves its input x for
# the backward, add_layer_norm the sum it returns. Both save fp32 mean and rstd, and share one backward operator.
def _layer_norm_outputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                        out_dtype: torch.dtype):
    """(y in out_dtype, mean, rstd), unwritten."""
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    return torch.empty(x.shape, dtype=out_dtype, device=x.device), mean, torch.empty_like(mean)


@kernel_op("layer_norm_forward", fake=_layer_norm_outputs)
def _layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                        out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd = _layer_norm_outputs(x, weight, bias, eps, out_dtype)
    _normalize(x, None, weight, bias, eps, y, None, mean, rstd, x.is_cuda)
    return y, mean, rstd


def _add_layer_norm_outputs(update: torch.Tensor, stream: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype):
    """(y in out_dtype, summed in stream's dtype, mean, rstd), unwritten."""
    y, mean, rstd = _layer_norm_outputs(stream, weight, bias, eps, out_dtype)
    return y, torch.empty(stream.shape, dtype=stream.dtype, device=stream.device), mean, rstd


@kernel_op("add_layer_norm_forward", fake=_add_layer_norm_outputs)
def _add_layer_norm_forward(update: torch.Tensor, stream: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None, eps: float,
                            out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, summed, mean, rstd = _add_layer_norm_outputs(update, stream, weight, bias, eps, out_dtype)
    _normalize(update, stream, weight, bias, eps, y, summed, mean, rstd, stream.is_cuda)
    return y, summed, mean, rstd


def _backward_outputs(dy: torch.Tensor, dsummed: torch.Tensor | None, summed: torch.Tensor, weight: torch.Tensor,
                      mean: torch.Tensor, rstd: torch.Tensor):
    """(dx, dweight, dbias), unwritten; dbias is weight's shape and dtype, as bias's would be."""
    return (torch.empty(summed.shape, dtype=summed.dtype, device=summed.device), torch.empty_like(weight),
            torch.empty_like(weight))


def _run_backward(dy: torch.Tensor, dsummed: torch.Tensor | None, summed: torch.Tensor, weight: torch.Tensor,
                  mean: torch.Tensor, rstd: torch.Tensor,
                  on_gpu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward operator's work, launched with the configuration for a GPU (on_gpu) or the interpreter."""
    N = summed.shape[-1]
    s2, dy2 = _as_rows(summed, N), _as_rows(dy, N)
    ds2 = _as_rows(dsummed, N) if dsummed is not None else dy2
    n_rows = s2.shape[0]
    cfg = _launch_config(N, n_rows, on_gpu)
    programs = _backward_programs(dy.device, triton.cdiv(n_rows, cfg["BLOCK_M"])) if n_rows else 0
    dw_partial = torch.empty((programs, N), dtype=torch.float32, device=dy.device)
    db_partial = torch.empty((programs, N), dtype=torch.float32, device=dy.device)
    # mean(g) and mean(g * xhat) per row, kept between the two phases of a chunked row (unused for a whole row)
    c1, c2 = (torch.empty(0 if cfg["SINGLE_BLOCK"] else n_rows, dtype=torch.float32, device=dy.device)
              for _ in range(2))
    dx, _, _ = _backward_outputs(dy, dsummed, summed, weight, mean, rstd)
    if n_rows:
        _layer_norm_bwd_kernel[(programs,)](
            s2, weight, mean, rstd, dy2, ds2, dx, dw_partial, db_partial, c1, c2,
            s2.stride(0), dy2.stride(0), ds2.stride(0), n_rows, N,
            HAS_DSUMMED=dsummed is not None, **cfg)
    return dx, dw_partial.sum(dim=0).to(weight.dtype), db_partial.sum(dim=0).to(weight.dtype)


@kernel_op("layer_norm_backward", fake=_backward_outputs)
def _layer_norm_backward(dy: torch.Tensor, dsummed: torch.Tensor | None, summed: torch.Tensor, weight: torch.Tensor,
                         mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of the norm's input (plus dsummed, the gradient arriving at add_layer_norm's `summed`), weight and
    bias."""
    return _run_backward(dy, dsummed, summed, weight, mean, rstd, dy.is_cuda)


def _save(ctx, summed, weight, bias, mean, rstd) -> None:
    ctx.save_for_backward(summed, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # a gradient left out (an unused output) stays None: no zeros are made for it


def _layer_norm_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _, _ = inputs
    _, mean, rstd = output
    _save(ctx, x, weight, bias, mean, rstd)


def _add_layer_norm_setup_context(ctx, inputs, output) -> None:
    update, _, weight, bias, _, _ = inputs
    _, summed, mean, rstd = output
    _save(ctx, summed, weight, bias, mean, rstd)
    ctx.update_dtype = update.dtype


def _norm_grads(ctx, dy, dsummed):
    """The gradients of (the norm's input, weight, bias), the norm's input's including dsummed."""
    if dy is None:  # only `summed` was used: the norm contributes nothing
        return dsummed, None, None
    summed, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _layer_norm_backward(dy, dsummed, summed, weight, mean, rstd)
    return dx, dweight, (dbias if ctx.has_bias else None)


def _layer_norm_autograd(ctx, dy, _dmean, _drstd):
    dx, dweight, dbias = _norm_grads(ctx, dy, None)
    return dx, dweight, dbias, None, None


def _add_layer_norm_autograd(ctx, dy, dsummed, _dmean, _drstd):
    dx, dweight, dbias = _norm_grads(ctx, dy, dsummed)
    # update and stream enter the sum alike, so they receive the same gradient, each in its own dtype.
    return dx.to(ctx.update_dtype), dx, dweight, dbias, None, None


_layer_norm_forward.register_autograd(_layer_norm_autograd, setup_context=_layer_norm_setup_context)
_add_layer_norm_forward.register_autograd(_add_layer_norm_autograd, setup_context=_add_layer_norm_setup_context)


def _validate(op: str, x, weight, bias, out_dtype, update=None) -> None:
    """x is the norm's input (add_layer_norm's stream); update, add_layer_norm's other summand, may differ from it in
    dtype only."""
    check_tensors(op, **{"x" if update is None else "stream": x}, weight=weight, bias=bias)
    if update is not None:
        check_tensors(op, update=update)
        if update.device != x.device:
            raise ValueError(f"{op}: update is on {update.device} but stream is on {x.device}; move them to one device")
    if out_dtype is not None and out_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: out_dtype is {out_dtype}; supported: float16, bfloat16, float32")
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension to normalise over")
    if update is not None and update.shape != x.shape:
        raise ValueError(f"{op}: update has shape {tuple(update.shape)} but stream has {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != x.shape[-1:]:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}; expected ({x.shape[-1]},), "
                             "the last dimension of x")


def _unit_stride(weight, bias):
    """The kernels index weight and bias as dense vectors (a no-op for parameters, which are)."""
    return weight.contiguous(), (bias.contiguous() if bias is not None else None)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               eps: float = 1e-5, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension of x (any leading shape), in Triton, written in out_dtype (default: x's);
    differentiable."""
    _validate("layer_norm", x, weight, bias, out_dtype)
    y, _, _ = _layer_norm_forward(x, *_unit_stride(weight, bias), float(eps), out_dtype or x.dtype)
    return y


def add_layer_norm(update: torch.Tensor, stream: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None, eps: float = 1e-5,
                   out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(LayerNorm(stream + update) in out_dtype (default: stream's), stream + update in stream's dtype) from one pass
    over update and stream, in Triton; update may have another dtype than stream. Differentiable in both outputs;
    each input's gradient comes in its own dtype."""
    _validate("add_layer_norm", stream, weight, bias, out_dtype, update)
    y, summed, _, _ = _add_layer_norm_forward(update, stream, *_unit_stride(weight, bias), float(eps),
                                              out_dtype or stream.dtype)
    return y, summed
