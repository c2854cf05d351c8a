"""The transformer MLP, y = gelu(x @ W1^T + b1) @ W2^T + b2: the Triton kernels, registered as PyTorch operators with
their autograd, and the reference.

Notation: x is (M, D) after flattening its leading dimensions, W1 = fc_weight is (H, D), W2 = proj_weight is
(D_out, H) (nn.Linear layout), pre = x @ W1^T + b1 and h = gelu(pre) are (M, H).

    forward   h, pre = gelu(x @ W1^T + b1), x @ W1^T + b1   one Triton matmul, bias + GELU in its epilogue
              y      = h @ W2^T + b2                        plain matmul
    backward  d_pre  = (dy @ W2) * gelu'(pre)               one Triton matmul, GELU' in its epilogue, which also
                                                            writes per-row-chunk partial column sums of d_pre
              db1    = sum of those partials (fp32)         (so db1 costs no extra pass over the (M, H) d_pre)
              dx     = d_pre @ W1,   dW1 = d_pre^T @ x,   dW2 = dy^T @ h,   db2 = sum_rows(dy) in fp32

Every matmul above is one generic Triton kernel, C = A @ B with a constexpr epilogue, that takes strides, so the
transposed operands (W1^T, d_pre^T, dy^T) are views, never copies. No atomics anywhere: deterministic.

Design decisions. These rest on counting bytes and FLOPs, not yet on GPU measurements; the
benchmark (bench/bench_mlp.py) measures each alternative so that a GPU run can confirm or overturn them.

* What the forward saves: pre AND h. The forward must write h anyway (it is the projection's input), so keeping it
  costs no time; pre is needed for gelu'(pre). Not storing pre would mean recomputing x @ W1^T in the backward, a
  whole extra matmul (+1/6 of the MLP's training FLOPs) to save one (M, H) write: rejected (the benchmark's
  "fc" rows time exactly that matmul). Saving both matches eager PyTorch's memory (F.gelu saves pre, the second
  F.linear saves h). Saving only pre and rewriting h = gelu(pre) in the backward's GELU' epilogue would halve the
  saved (M, H) activations, but the extra store made that epilogue spill registers with every tile on sm_90
  (bench/gpu_compile.py reports it): rejected. A prologue that recomputes h inside dW2 = dy^T @ h would evaluate
  GELU D_out/BLOCK_M times per element inside the matmul's main loop and keep B out of the tensor cores'
  shared-memory path: rejected.
* The unfused matmuls (projection, dx, dW1, dW2) go to cuBLAS (MLPOptions(plain_matmul="torch")): with nothing to
  fuse, the Triton kernel can at best tie cuBLAS there (cuBLAS also fuses the projection's bias).
  MLPOptions(plain_matmul="triton") routes them through the Triton kernel instead; the benchmark times both.
* Bias gradients are fp32 sums over rows. db1 comes from the GELU' epilogue (partials per BIAS_GRAD_ROWS rows,
  reduced after the kernel: deterministic, and independent of which tile size the autotuner picked); db2 is a
  torch sum over dy, which is (M, D_out), a quarter the size of d_pre.
"""
from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritongpt.kernels._common import autotune, autocast_weight, check_tensors, dot_tile, interpreting, kernel_op


@dataclass(frozen=True)
class MLPOptions:
    """The alternatives the module docstring weighs, for gelu_mlp's `options`; the defaults are the chosen ones."""
    plain_matmul: str = "torch"  # who runs the matmuls with nothing to fuse: "torch" (cuBLAS on a GPU) or "triton"

    def __post_init__(self):
        if self.plain_matmul not in ("torch", "triton"):
            raise ValueError(f"gelu_mlp: plain_matmul must be 'torch' or 'triton', got {self.plain_matmul!r}")


def gelu_mlp_reference(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None,
                       proj_weight: torch.Tensor, proj_bias: torch.Tensor | None,
                       approximate: str = "tanh") -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, fc_weight, fc_bias), approximate=approximate), proj_weight, proj_bias)


# ----------------------------------------------------------------------------------------------------------------
# GELU and its derivative, on fp32 values.
#
# tanh form (GPT-2):  u = c (z + a z^3), c = sqrt(2/pi), a = 0.044715, t = tanh(u)
#   gelu(z)  = 0.5 z (1 + t)
#   gelu'(z) = 0.5 (1 + t) + 0.5 z (1 - t^2) c (1 + 3 a z^2)
# With s = sigmoid(2u) = (1 + t) / 2 (the interpreter has no libdevice tanh, and its tl.sigmoid fails) and
# 1 - t^2 = 4 s (1 - s):
#   gelu(z)  = z s
#   gelu'(z) = s + 2 z s (1 - s) c (1 + 3 a z^2)
# which also avoids the cancellation in 1 + t for negative u.
#
# erf form:  Phi(z) = 0.5 (1 + erf(z / sqrt(2))),  phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
#   gelu(z)  = z Phi(z)
#   gelu'(z) = Phi(z) + z phi(z)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _gelu_and_grad(z, TANH: tl.constexpr):
    """(gelu(z), gelu'(z)) for fp32 z; the compiler drops whichever the caller does not use. Constants: c =
    sqrt(2/pi) = 0.7978845608028654, a = 0.044715, 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327
    (literals: a module-level tl.constexpr times a tensor misbehaves under the interpreter)."""
    if TANH:
        s = 1.0 / (1.0 + tl.exp(z * (z * z * 0.044715 + 1.0) * -1.5957691216057308))  # sigmoid(2u), 2c = 1.59...
        gelu = z * s
        grad = s + z * s * (1.0 - s) * (z * z * (3.0 * 0.044715) + 1.0) * 1.5957691216057308
    else:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        gelu = z * cdf
        grad = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    return gelu, grad


# ----------------------------------------------------------------------------------------------------------------
# The matmul kernel: C (M, N) = A (M, K) @ B (K, N), A and B with any strides, C contiguous; fp32 accumulator.
# ----------------------------------------------------------------------------------------------------------------
_NONE, _BIAS_GELU, _GELU_GRAD = 0, 1, 2  # the epilogues


# On a GPU, the tiles that compile without spilling registers in every epilogue, for sm_90 and sm_80 with triton 3.6
# to 3.9 (bench/gpu_compile.py checks it): 128x256, 256x128 and 64x256 tiles, and 128x128 with 4 warps, spill in the
# GELU epilogues, whose fp32 accumulator shares the registers with pre or GELU'. Under the interpreter one tile,
# 64x64x32: it runs programs one after another at a Python-overhead cost per operation per program, nearly
# independent of the tile size, so fewer, larger tiles test fastest (the tests' sizes are still not multiples of it).
# The key holds the shape, with M rounded up to a power of two (generating text grows M by one row per token, and
# tuning again at every length would cost more than it gains), the operand layouts (strides) and the epilogue. Every
# output is written, never accumulated into, so the autotuner's trial launches are harmless. Float32 operands take
# twice the shared memory and registers: 128x128x64 in 4 stages needs 262,144 B, more than either GPU has, so their
# tiles step K by 32, and of those only 128x64 with 8 warps is clean in every epilogue.
_TILES = {"16-bit": [(128, 128, 64, 8, 4), (128, 64, 64, 4, 4)], "fp32": [(128, 64, 32, 8, 4)]}
_GPU_CONFIGS = {operands: [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w,
                                         num_stages=s) for m, n, k, w, s in tiles]
                for operands, tiles in _TILES.items()}
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4,
                                    num_stages=1)
_AUTOTUNE_KEY = ["M_KEY", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn",
                 "EPILOGUE", "HAS_BIAS", "STORE_AUX", "BIAS_GRAD", "TANH"]


# Rows per partial column sum of the GELU' epilogue: divides every BLOCK_M above, so the partials' layout does not
# depend on the tile the autotuner picks (32 under the interpreter, so that its 64-row tiles hold two chunks).
_BIAS_GRAD_ROWS = 32 if interpreting() else 64


def _tiles_for_dtype(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    return _GPU_CONFIGS["fp32" if named_args["a_ptr"].dtype == torch.float32 else "16-bit"]


@autotune([config for configs in _GPU_CONFIGS.values() for config in configs], _AUTOTUNE_KEY, _INTERPRETER_CONFIG,
          prune_configs_by={"early_config_prune": _tiles_for_dtype})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, aux_ptr, bias_grad_ptr,
                   M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                   M_KEY,                       # M rounded up to a power of two: read by the autotuner only
                   EPILOGUE: tl.constexpr,      # _NONE, _BIAS_GELU or _GELU_GRAD
                   HAS_BIAS: tl.constexpr,      # add bias (N,) to the product before the epilogue
                   STORE_AUX: tl.constexpr,     # _BIAS_GELU: also store pre = A @ B + bias into aux
                   BIAS_GRAD: tl.constexpr,     # _GELU_GRAD: store fp32 column sums of C per BIAS_GRAD_ROWS rows
                   BIAS_GRAD_ROWS: tl.constexpr,
                   TANH: tl.constexpr,          # GELU form: tanh approximation, else erf
                   DOT_FP32: tl.constexpr,      # cast tiles to fp32 before tl.dot (bf16 under the interpreter)
                   PRECISION: tl.constexpr,     # dot_tile's: "tf32_rounded" for fp32 operands on a GPU
                   INDEX_64: tl.constexpr,      # offsets may pass 2^31 elements
                   EVEN_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Epilogues, on the fp32 accumulator acc = A @ B (+ bias):
        _NONE:      C = acc
        _BIAS_GELU: C = gelu(acc)                    (and aux = acc if STORE_AUX)
        _GELU_GRAD: C = acc * gelu'(aux), aux = pre  (and column-sum partials if BIAS_GRAD)
    aux has C's shape and layout (contiguous (M, N))."""
    # Grouped program order: GROUP_M row-tiles sweep the column-tiles together, so the B tiles they share (and
    # their A tiles) are reused from L2 instead of being re-read from memory.
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M  # (tl.cdiv is a nested jit call: slow under the interpreter)
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m

    # Main loop. Rows and columns past the edge wrap around (% M, % N) to valid ones instead of being masked: the
    # loads stay unmasked (and vectorizable) along M and N, and the rows and columns they compute are never stored.
    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_am = tl.max_contiguous(tl.multiple_of(offs_am, BLOCK_M), BLOCK_M)
    offs_bn = tl.max_contiguous(tl.multiple_of(offs_bn, BLOCK_N), BLOCK_N)
    if INDEX_64:
        offs_am = offs_am.to(tl.int64)
        offs_bn = offs_bn.to(tl.int64)
    acc = dot_tile(a_ptr, b_ptr, offs_am, offs_bn, stride_am, stride_ak, stride_bk, stride_bn, K,
                   tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), BLOCK_K, EVEN_K, DOT_FP32, PRECISION)

    # Epilogue.
    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if INDEX_64:
        offs_cm = offs_cm.to(tl.int64)
        offs_cn = offs_cn.to(tl.int64)
    c_offs = offs_cm[:, None] * N + offs_cn[None, :]
    c_mask = (offs_cm[:, None] < M) & (offs_cn[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_cn, mask=offs_cn < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 1:  # _BIAS_GELU
        if STORE_AUX:
            tl.store(aux_ptr + c_offs, acc.to(aux_ptr.dtype.element_ty), mask=c_mask)
        acc, _ = _gelu_and_grad(acc, TANH)
    elif EPILOGUE == 2:  # _GELU_GRAD
        pre = tl.load(aux_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
        _, gelu_grad = _gelu_and_grad(pre, TANH)
        acc = acc * gelu_grad
        if BIAS_GRAD:
            # Column sums over each chunk of BIAS_GRAD_ROWS rows, into row (global chunk index) of an fp32
            # (cdiv(M, BIAS_GRAD_ROWS), N) buffer; rows past M (the wrapped ones) count as zero.
            rows = tl.arange(0, BLOCK_M)
            valid = offs_cm < M
            for i in tl.static_range(BLOCK_M // BIAS_GRAD_ROWS):
                in_chunk = valid & (rows >= i * BIAS_GRAD_ROWS) & (rows < (i + 1) * BIAS_GRAD_ROWS)
                partial = tl.sum(tl.where(in_chunk[:, None], acc, 0.0), axis=0)
                chunk = pid_m * (BLOCK_M // BIAS_GRAD_ROWS) + i
                n_store = tl.where(chunk * BIAS_GRAD_ROWS < M, N, 0)  # (a scalar & a block mask breaks the interpreter)
                tl.store(bias_grad_ptr + chunk * N + offs_cn, partial, mask=offs_cn < n_store)
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _max_offset(t: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) if t.numel() else 0


def _launch(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, epilogue: int, bias=None, aux=None,
            bias_grad=None, tanh: bool = True) -> None:
    """Run _matmul_kernel: c = a @ b with the epilogue (see the kernel). a (M, K), b (K, N) any strides; c and aux
    contiguous (M, N); bias (N,); bias_grad fp32 (cdiv(M, _BIAS_GRAD_ROWS), N)."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    index_64 = max(_max_offset(a), _max_offset(b), (M + 256) * (N + 256)) >= 2**31
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _matmul_kernel[grid](
        a, b, c,
        c if bias is None else bias, c if aux is None else aux, c if bias_grad is None else bias_grad,
        M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), triton.next_power_of_2(M),
        EPILOGUE=epilogue, HAS_BIAS=bias is not None, STORE_AUX=epilogue == _BIAS_GELU and aux is not None,
        BIAS_GRAD=bias_grad is not None, BIAS_GRAD_ROWS=_BIAS_GRAD_ROWS, TANH=tanh,
        DOT_FP32=interpreting() and a.dtype == torch.bfloat16, INDEX_64=index_64,
        PRECISION="tf32_rounded" if a.dtype == torch.float32 and not interpreting() else "tf32",
    )


def _activation(x: torch.Tensor, fc_weight: torch.Tensor) -> torch.Tensor:
    """An unwritten (M, H) activation, pre or h."""
    return torch.empty((x.shape[0], fc_weight.shape[0]), device=x.device, dtype=x.dtype)


def _fc_gelu(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias, tanh: bool, pre: torch.Tensor | None) -> torch.Tensor:
    """h = gelu(x @ W1^T + b1), also writing x @ W1^T + b1 into pre when given."""
    h = _activation(x, fc_weight)
    _launch(x, fc_weight.t(), h, _BIAS_GELU, bias=fc_bias, aux=pre, tanh=tanh)
    return h


def _mm(a: torch.Tensor, b: torch.Tensor, bias, plain_matmul: str) -> torch.Tensor:
    """a @ b (+ bias) for a matmul with nothing to fuse: cuBLAS (plain_matmul "torch") or the Triton kernel."""
    if plain_matmul == "triton":
        return _triton_matmul(a, b, bias)
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


# Operators rather than an autograd Function, so that torch.compile keeps the kernels in its graph (kernel_op says why
# custom_op: here the matmul's autotuner runs a heuristic per launch). Training and inference have their own forward
# operators, since only training writes pre. The backward's operator is its fused GELU' matmul alone; the plain
# matmuls around it stay torch.mm (or the Triton matmul's operator) in the traced backward, where the compiler sees
# them.
def _matmul_outputs(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.empty((a.shape[0], b.shape[1]), device=a.device, dtype=a.dtype)


@kernel_op("matmul", fake=_matmul_outputs)
def _triton_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a @ b (+ bias) through the Triton kernel, a and b with any strides."""
    c = _matmul_outputs(a, b, bias)
    _launch(a, b, c, _NONE, bias=bias)
    return c


def _inference_outputs(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None,
                       proj_weight: torch.Tensor, proj_bias: torch.Tensor | None, tanh: bool,
                       plain_matmul: str) -> torch.Tensor:
    """y, unwritten."""
    return torch.empty((x.shape[0], proj_weight.shape[0]), device=x.device, dtype=x.dtype)


@kernel_op("gelu_mlp_inference", fake=_inference_outputs)
def _gelu_mlp_inference(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None,
                        proj_weight: torch.Tensor, proj_bias: torch.Tensor | None, tanh: bool,
                        plain_matmul: str) -> torch.Tensor:
    """y for x (M, D), without writing pre, which only the backward needs."""
    return _mm(_fc_gelu(x, fc_weight, fc_bias, tanh, pre=None), proj_weight.t(), proj_bias, plain_matmul)


def _forward_outputs(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None,
                     proj_weight: torch.Tensor, proj_bias: torch.Tensor | None, tanh: bool, plain_matmul: str):
    """(y, pre, h), unwritten."""
    y = _inference_outputs(x, fc_weight, fc_bias, proj_weight, proj_bias, tanh, plain_matmul)
    return y, _activation(x, fc_weight), _activation(x, fc_weight)


@kernel_op("gelu_mlp_forward", fake=_forward_outputs)
def _gelu_mlp_forward(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None,
                      proj_weight: torch.Tensor, proj_bias: torch.Tensor | None, tanh: bool,
                      plain_matmul: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, pre, h) for x (M, D): the output and the two (M, H) activations the backward saves."""
    pre = _activation(x, fc_weight)
    h = _fc_gelu(x, fc_weight, fc_bias, tanh, pre)
    return _mm(h, proj_weight.t(), proj_bias, plain_matmul), pre, h


def _gelu_grad_outputs(dy: torch.Tensor, proj_weight: torch.Tensor, pre: torch.Tensor, tanh: bool,
                       want_bias_grad: bool) -> List[torch.Tensor]:
    """[d_pre, then db1 (fp32) if want_bias_grad], unwritten. (typing.List: the annotation that torch.library's schema
    inference reads as Tensor[] in every version since torch 2.4.)"""
    outputs = [torch.empty_like(pre)]
    if want_bias_grad:
        outputs.append(torch.empty(pre.shape[1], device=pre.device, dtype=torch.float32))
    return outputs


@kernel_op("gelu_grad_matmul", fake=_gelu_grad_outputs)
def _gelu_grad_matmul(dy: torch.Tensor, proj_weight: torch.Tensor, pre: torch.Tensor, tanh: bool,
                      want_bias_grad: bool) -> List[torch.Tensor]:
    """[d_pre = (dy @ W2) * gelu'(pre), then db1 = the fp32 row-sum of d_pre if want_bias_grad]."""
    M, H = pre.shape
    outputs = _gelu_grad_outputs(dy, proj_weight, pre, tanh, want_bias_grad)
    d_pre = outputs[0]
    partials = (torch.empty((triton.cdiv(M, _BIAS_GRAD_ROWS), H), device=pre.device, dtype=torch.float32)
                if want_bias_grad else None)
    _launch(dy, proj_weight, d_pre, _GELU_GRAD, aux=pre, bias_grad=partials, tanh=tanh)
    if want_bias_grad:
        torch.sum(partials, 0, out=outputs[-1])
    return outputs


def _setup_context(ctx, inputs, output) -> None:
    x, fc_weight, _, proj_weight, _, tanh, plain_matmul = inputs
    _, pre, h = output
    ctx.tanh, ctx.plain_matmul = tanh, plain_matmul
    ctx.save_for_backward(x, fc_weight, proj_weight, pre, h)
    ctx.mark_non_differentiable(pre, h)


def _backward(ctx, dy, _dpre, _dh):
    x, fc_weight, proj_weight, pre, h = ctx.saved_tensors
    need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
    dx = d_w1 = d_b1 = d_w2 = d_b2 = None
    if need_x or need_w1 or need_b1:
        outputs = _gelu_grad_matmul(dy, proj_weight, pre, ctx.tanh, want_bias_grad=need_b1)
        d_pre = outputs[0]
        if need_x:
            dx = _mm(d_pre, fc_weight, None, ctx.plain_matmul)
        if need_w1:
            d_w1 = _mm(d_pre.t(), x, None, ctx.plain_matmul)
        if need_b1:
            d_b1 = outputs[1].to(pre.dtype)
    if need_w2:
        d_w2 = _mm(dy.t(), h, None, ctx.plain_matmul)
    if need_b2:
        d_b2 = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, d_w1, d_b1, d_w2, d_b2, None, None


_gelu_mlp_forward.register_autograd(_backward, setup_context=_setup_context)


def _validate(x, fc_weight, fc_bias, proj_weight, proj_bias, approximate) -> None:
    if approximate not in ("tanh", "none"):
        raise ValueError(f"gelu_mlp: approximate must be 'tanh' or 'none', got {approximate!r}")
    check_tensors("gelu_mlp", x=x, fc_weight=fc_weight, proj_weight=proj_weight, fc_bias=fc_bias, proj_bias=proj_bias)
    for name, weight in (("fc_weight", fc_weight), ("proj_weight", proj_weight)):
        if weight.dim() != 2:
            raise ValueError(f"gelu_mlp: {name} must be 2-D (out_features, in_features), "
                             f"got shape {tuple(weight.shape)}")
    hidden, d_in = fc_weight.shape
    if x.dim() == 0 or x.shape[-1] != d_in:
        raise ValueError(f"gelu_mlp: x's last dimension must equal fc_weight.shape[1] = {d_in}, "
                         f"got x of shape {tuple(x.shape)}")
    if proj_weight.shape[1] != hidden:
        raise ValueError(f"gelu_mlp: proj_weight.shape[1] must equal fc_weight.shape[0] = {hidden}, "
                         f"got proj_weight of shape {tuple(proj_weight.shape)}")
    for name, bias, n in (("fc_bias", fc_bias, hidden), ("proj_bias", proj_bias, proj_weight.shape[0])):
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"gelu_mlp: {name} must have shape ({n},), got {tuple(bias.shape)}")


def gelu_mlp(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None,
             proj_weight: torch.Tensor, proj_bias: torch.Tensor | None,
             approximate: str = "tanh", *, options: MLPOptions = MLPOptions()) -> torch.Tensor:
    """gelu(x @ fc_weight^T + fc_bias) @ proj_weight^T + proj_bias through the Triton kernels; differentiable.

    x: (..., D); fc_weight: (H, D); proj_weight: (D_out, H); the biases are optional. approximate: "tanh" (GPT-2)
    or "none" (exact erf GELU). Float16, bfloat16 or float32 (float32 dots run as TF32 on a GPU, the operands rounded
    to nearest as cuBLAS rounds them), all on one CUDA device (or the CPU under TRITON_INTERPRET=1). Under
    torch.autocast, float32 inputs are cast to the autocast dtype first, as F.linear would (the casts are
    differentiable: float32 parameters get float32 gradients; inside a WeightCasts scope without gradients, each
    weight is cast once per version of its values).
    options picks among the implementation's alternatives (MLPOptions). Raises ValueError on bad input."""
    device_type = x.device.type if isinstance(x, torch.Tensor) else None
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype) if x.dtype == torch.float32 else x
        fc_weight, fc_bias, proj_weight, proj_bias = (
            autocast_weight(t, dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t
            for t in (fc_weight, fc_bias, proj_weight, proj_bias))
    _validate(x, fc_weight, fc_bias, proj_weight, proj_bias, approximate)
    tanh = approximate == "tanh"
    x2d = x.reshape(-1, x.shape[-1])
    params = (x, fc_weight, fc_bias, proj_weight, proj_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params):
        y, _, _ = _gelu_mlp_forward(x2d, fc_weight, fc_bias, proj_weight, proj_bias, tanh, options.plain_matmul)
    else:
        y = _gelu_mlp_inference(x2d, fc_weight, fc_bias, proj_weight, proj_bias, tanh, options.plain_matmul)
    return y.reshape(*x.shape[:-1], proj_weight.shape[0])
