"""Multi-head attention: the plain-math reference, PyTorch's SDPA as a named alternative, and the Triton
flash-attention kernels, registered as PyTorch operators with their autograd.

q and the output are (batch, heads, seq_len_q, head_dim), k and v (batch, heads, seq_len_k, head_dim) with
seq_len_q <= seq_len_k, all with any strides. Notation, per (batch, head): S = scale · Q Kᵀ, P = softmax(S) row by
row, O = P V. Causal: S_ij = -inf for j > i + seq_len_k − seq_len_q, the mask aligned to the end (FlashAttention's
convention since 2.1), so the queries are the last seq_len_q positions of the sequence.

The kernels work in base 2: with c = scale · log2(e), exp(S_ij) = 2^(c · q_i·k_j), so they call exp2 (one
instruction) and the log-sum-exp saved for the backward is base 2, lse2_i = log2 Σ_j 2^(c · q_i·k_j), which is the
natural LSE times log2(e). P is then recomputed as 2^(c · q_i·k_j − lse2_i).
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritongpt.kernels._common import autotune, check_tensors, interpreting, kernel_op


def _causal_keep(seq_len_q: int, seq_len_k: int, device: torch.device) -> torch.Tensor:
    """The (seq_len_q, seq_len_k) boolean mask of the keys each query sees under the causal rule, aligned to the end:
    query i sees keys j <= i + seq_len_k - seq_len_q, so the last query sees every key (one query against a cache of
    keys is a decoding step). More queries than keys would leave the first ones no key to see: refused."""
    if seq_len_q > seq_len_k:
        raise ValueError(f"causal attention: q has more rows than k and v (seq_len {seq_len_q} > {seq_len_k}), so "
                         "its first queries would see no key; the queries must be the last positions of the keys' "
                         "sequence")
    return torch.ones(seq_len_q, seq_len_k, dtype=torch.bool, device=device).tril(seq_len_k - seq_len_q)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(q @ k^T * scale [+ causal mask]) @ v for q of shape (batch, heads, seq_len_q, head_dim) and k, v of
    shape (batch, heads, seq_len_k, head_dim), seq_len_q <= seq_len_k, one PyTorch op per step in the inputs' dtype:
    the math the kernel is held to. The causal mask is aligned to the end (see _causal_keep). scale defaults to
    1/sqrt(head_dim)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        scores = scores.masked_fill(~_causal_keep(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    return scores.softmax(dim=-1) @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                   softmax_scale: float | None = None) -> torch.Tensor:
    """The same through PyTorch's scaled_dot_product_attention, which runs a fused kernel on a GPU (flash, cuDNN or
    memory-efficient): a fast eager alternative to the Triton kernel."""
    if causal and q.shape[-2] != k.shape[-2]:
        # is_causal aligns the mask to the top left when the lengths differ: pass the end-aligned one instead.
        keep = _causal_keep(q.shape[-2], k.shape[-2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=softmax_scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale)


# All kernels take two constexprs for their matrix products: DOT_DTYPE, the dtype tiles are cast to before tl.dot (the
# input dtype, except bf16 under the interpreter, whose bf16 dot multiplies raw bits: triton issue #11584, so fp32
# there), and DOT_PRECISION, "ieee" for fp32 so that fp32 inputs get fp32 products rather than TF32 ones (16-bit
# inputs ignore it). Key or query blocks that need no mask run in a loop without one (MASKED=False); a second loop
# (MASKED=True) covers the blocks that cross the causal diagonal and the partial block at the end of the sequence.
# The diagonal is shifted by seq_len_k − seq_len_q, which need not be a multiple of the blocks, so the ranges are
# computed for any block sizes. The arguments seq_len_q_bucket and seq_len_k_bucket are read by the autotuner only
# (see _autotune_args). Element offsets can pass 2^31 (a long sequence times the row stride of a packed qkv), so each
# program moves its base pointers by int64 offsets, (batch, head) and its block's first row, and each loop by an
# int64 start; the offsets within a block stay int32.


# Forward, one program per (BLOCK_M queries, head, batch). Stream over the key/value blocks the queries see, keeping
# per row a running max m of the base-2 scores, a running sum l and an unnormalised output acc, all fp32:
#   x = c · q kᵀ,   m' = max(m, rowmax(x)),   p = 2^(x − m'),
#   l = l · 2^(m − m') + rowsum(p),   acc = acc · 2^(m − m') + p v,   m = m'
# and finish with O = acc / l, lse2 = m + log2(l). Causal: key blocks left of the diagonal need no mask, the blocks
# crossing it are masked, and the blocks right of it are never visited (nor loaded). Program 0 takes the last query
# block: under the causal mask the last rows see the most keys, and launching the longest first leaves the short ones
# to fill the GPU at the end rather than one long block running alone.
@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, last_key, d_mask, lo, hi, seq_len_k,
                    qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k_ptrs += tl.cast(lo, tl.int64) * stride_kn
    v_ptrs += tl.cast(lo, tl.int64) * stride_vn
    k_step, v_step = BLOCK_N * stride_kn, BLOCK_N * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_mask = d_mask[None, :] & (offs_n[:, None] < seq_len_k)
        else:
            kv_mask = d_mask[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        x = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            keep = offs_n[None, :] < seq_len_k
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= last_key[:, None])
            x = tl.where(keep, x, float("-inf"))
        # Every row sees an unmasked key in the first block it visits (key 0), so m_new is finite from there on.
        m_new = tl.maximum(m_i, tl.max(x, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(x - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
        m_i = m_new
        k_ptrs += k_step
        v_ptrs += v_step
    return acc, l_i, m_i


@triton.jit
def _key_blocks(start_m, seq_len_q, seq_len_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(mid, hi) for the queries start_m .. start_m + BLOCK_M − 1: the key blocks before mid are seen whole by every
    one of them (no mask), those from mid up to hi are masked, and keys from hi on are seen by none."""
    if CAUSAL:
        # Query i sees keys up to i + shift: the first query all keys before start_m + shift + 1, the last query
        # those before start_m + BLOCK_M + shift.
        shift = seq_len_k - seq_len_q
        mid = (start_m + shift + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M + shift, seq_len_k)
    else:
        mid = seq_len_k // BLOCK_N * BLOCK_N
        hi = seq_len_k
    return mid, hi


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
              seq_len_q, seq_len_k, seq_len_q_bucket, seq_len_k_bucket, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
              DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qm
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_om
    LSE += (off_b * tl.num_programs(1) + off_h) * seq_len_q

    rows = tl.arange(0, BLOCK_M)  # from the block's first row, to which Q and O point
    offs_m = start_m + rows
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM  # head_dim padded up to the power of two BLOCK_D
    q_mask = (offs_m[:, None] < seq_len_q) & d_mask[None, :]
    q = tl.load(Q + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    q = q.to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mid, hi = _key_blocks(start_m, seq_len_q, seq_len_k, CAUSAL, BLOCK_M, BLOCK_N)
    last_key = offs_m + (seq_len_k - seq_len_q)
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, last_key, d_mask,
                                    0, mid, seq_len_k, qk_scale, False, CAUSAL, BLOCK_N, DOT_DTYPE, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, last_key, d_mask,
                                    mid, hi, seq_len_k, qk_scale, True, CAUSAL, BLOCK_N, DOT_DTYPE, DOT_PRECISION)
    o = acc / l_i[:, None]
    tl.store(O + rows[:, None] * stride_om + offs_d[None, :] * stride_od, o.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + offs_m, m_i + tl.log2(l_i), mask=offs_m < seq_len_q)


# Backward, step 1: delta_i = Σ_d dO_id · O_id in fp32. It is the Σ_j P_ij dP_ij of the softmax gradient
# dS = P ∘ (dP − rowsum(P ∘ dP)), since Σ_j P_ij (dO_i · v_j) = dO_i · O_i.
@triton.jit
def _attn_bwd_delta(O, DO, DELTA,
                    stride_ob, stride_oh, stride_om, stride_od, stride_dob, stride_doh, stride_dom, stride_dod,
                    seq_len, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    O += off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_om
    DO += off_b * stride_dob + off_h * stride_doh + start_m.to(tl.int64) * stride_dom
    DELTA += (off_b * tl.num_programs(1) + off_h) * seq_len
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + rows[:, None] * stride_om + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    tl.store(DELTA + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < seq_len)


# Backward, step 2: dK and dV, one program per (BLOCK_N keys, head, batch), streaming over the query blocks that see
# those keys and recomputing the probabilities (transposed, keys along rows):
#   Pᵀ = 2^(c · k qᵀ − lse2),  dV += Pᵀ dO,  dPᵀ = v dOᵀ,  dSᵀ = Pᵀ ∘ (dPᵀ − delta),  dK += dSᵀ q
# then dK *= scale. Causal: first the query blocks crossing the diagonal (masked), then the ones below it. Each program
# alone writes its rows of dK and dV, so there are no atomics and the result is the same on every run.
@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE, DELTA, stride_qm, stride_dom, first_query, d_mask,
                         lo, hi, seq_len_q, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                         BLOCK_M: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    q_ptrs += tl.cast(lo, tl.int64) * stride_qm
    do_ptrs += tl.cast(lo, tl.int64) * stride_dom
    lse_ptrs = LSE + lo + tl.arange(0, BLOCK_M)
    delta_ptrs = DELTA + lo + tl.arange(0, BLOCK_M)
    q_step, do_step = BLOCK_M * stride_qm, BLOCK_M * stride_dom
    for start_m in range(lo, hi, BLOCK_M):
        if MASKED:
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_mask = d_mask[None, :] & (offs_m[:, None] < seq_len_q)
            lse = tl.load(lse_ptrs, mask=offs_m < seq_len_q, other=0.0)
            delta = tl.load(delta_ptrs, mask=offs_m < seq_len_q, other=0.0)
        else:
            row_mask = d_mask[None, :]
            lse = tl.load(lse_ptrs)
            delta = tl.load(delta_ptrs)
        q = tl.load(q_ptrs, mask=row_mask, other=0.0).to(DOT_DTYPE)
        do = tl.load(do_ptrs, mask=row_mask, other=0.0).to(DOT_DTYPE)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            keep = offs_m[None, :] < seq_len_q
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= first_query[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        dv += tl.dot(p_t.to(DOT_DTYPE), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION) - delta[None, :])
        dk += tl.dot(ds_t.to(DOT_DTYPE), q, input_precision=DOT_PRECISION)
        q_ptrs += q_step
        do_ptrs += do_step
        lse_ptrs += BLOCK_M
        delta_ptrs += BLOCK_M
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
                   stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   seq_len_q, seq_len_k, seq_len_q_bucket, seq_len_k_bucket, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh + start_n.to(tl.int64) * stride_kn
    V += off_b * stride_vb + off_h * stride_vh + start_n.to(tl.int64) * stride_vn
    DO += off_b * stride_dob + off_h * stride_doh
    DK += off_b * stride_dkb + off_h * stride_dkh + start_n.to(tl.int64) * stride_dkn
    DV += off_b * stride_dvb + off_h * stride_dvh + start_n.to(tl.int64) * stride_dvn
    LSE += (off_b * tl.num_programs(1) + off_h) * seq_len_q
    DELTA += (off_b * tl.num_programs(1) + off_h) * seq_len_q

    rows = tl.arange(0, BLOCK_N)  # from the block's first key, to which K, V, DK and DV point
    offs_n = start_n + rows
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    kv_mask = (offs_n[:, None] < seq_len_k) & d_mask[None, :]
    k = tl.load(K + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + rows[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    k, v = k.to(DOT_DTYPE), v.to(DOT_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    q_ptrs = Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_ptrs = DO + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    # Key j is seen by the queries from j − shift on.
    first_query = offs_n - (seq_len_k - seq_len_q)
    if CAUSAL:
        # The query blocks before lo see none of these keys, those from unmasked on see them all; in between they
        # cross the diagonal.
        lo = tl.maximum(start_n - (seq_len_k - seq_len_q), 0) // BLOCK_M * BLOCK_M
        unmasked = tl.maximum(start_n + BLOCK_N - 1 - (seq_len_k - seq_len_q), 0)
        unmasked = tl.minimum(tl.cdiv(unmasked, BLOCK_M) * BLOCK_M, seq_len_q)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE, DELTA, stride_qm, stride_dom, first_query,
                                      d_mask, lo, unmasked, seq_len_q, qk_scale, True, CAUSAL, BLOCK_M, DOT_DTYPE,
                                      DOT_PRECISION)
    else:
        unmasked = 0
    # Whole query blocks need no mask; the last, partial one does.
    full = tl.maximum(unmasked, seq_len_q // BLOCK_M * BLOCK_M)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE, DELTA, stride_qm, stride_dom, first_query,
                                  d_mask, unmasked, full, seq_len_q, qk_scale, False, CAUSAL, BLOCK_M, DOT_DTYPE,
                                  DOT_PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE, DELTA, stride_qm, stride_dom, first_query,
                                  d_mask, full, seq_len_q, seq_len_q, qk_scale, True, CAUSAL, BLOCK_M, DOT_DTYPE,
                                  DOT_PRECISION)
    tl.store(DK + rows[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + rows[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=kv_mask)


# Backward, step 3: dQ, one program per (BLOCK_M queries, head, batch), streaming over the key blocks they see with
# the forward's split into unmasked and masked blocks:
#   P = 2^(c · q kᵀ − lse2),  dP = dO vᵀ,  dS = P ∘ (dP − delta),  dQ += dS k,   then dQ *= scale.
# Kept apart from the dK/dV kernel so that each output has a single writer: no atomics, deterministic. Query blocks
# launch last first, as in the forward.
@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, last_key, d_mask, lo, hi,
                       seq_len_k, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k_ptrs += tl.cast(lo, tl.int64) * stride_kn
    v_ptrs += tl.cast(lo, tl.int64) * stride_vn
    k_step, v_step = BLOCK_N * stride_kn, BLOCK_N * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_mask = d_mask[None, :] & (offs_n[:, None] < seq_len_k)
        else:
            kv_mask = d_mask[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            keep = offs_n[None, :] < seq_len_k
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= last_key[:, None])
            p = tl.where(keep, p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(DOT_DTYPE), k, input_precision=DOT_PRECISION)
        k_ptrs += k_step
        v_ptrs += v_step
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA,
                 stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 seq_len_q, seq_len_k, seq_len_q_bucket, seq_len_k_bucket, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qm
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh + start_m.to(tl.int64) * stride_dom
    DQ += off_b * stride_dqb + off_h * stride_dqh + start_m.to(tl.int64) * stride_dqm
    LSE += (off_b * tl.num_programs(1) + off_h) * seq_len_q
    DELTA += (off_b * tl.num_programs(1) + off_h) * seq_len_q

    rows = tl.arange(0, BLOCK_M)  # from the block's first row, to which Q, DO and DQ point
    offs_m = start_m + rows
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_mask = (offs_m[:, None] < seq_len_q) & d_mask[None, :]
    q = tl.load(Q + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
    q, do = q.to(DOT_DTYPE), do.to(DOT_DTYPE)
    lse = tl.load(LSE + offs_m, mask=offs_m < seq_len_q, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=offs_m < seq_len_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mid, hi = _key_blocks(start_m, seq_len_q, seq_len_k, CAUSAL, BLOCK_M, BLOCK_N)
    last_key = offs_m + (seq_len_k - seq_len_q)
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, last_key, d_mask,
                            0, mid, seq_len_k, qk_scale, False, CAUSAL, BLOCK_N, DOT_DTYPE, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, last_key, d_mask,
                            mid, hi, seq_len_k, qk_scale, True, CAUSAL, BLOCK_N, DOT_DTYPE, DOT_PRECISION)
    tl.store(DQ + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# Tile shapes (BLOCK_M, BLOCK_N, num_warps, num_stages) to tune over, per kernel and per class of input: fp32 (whose
# exact dots run on CUDA cores, not tensor cores) or the padded head_dim of 16-bit inputs. Kept to the tiles that
# compile without spilling registers and fit the shared memory of both an H100 and an A100 (sm_90 and sm_80) with
# triton 3.6 and 3.9, as bench/gpu_compile.py checks; it reported the tiles dropped from here, each spilling on one
# target or the other (mostly the larger tiles of their class, most often on sm_80; dq's 128x32 at head_dim 256 also
# needs 172,032 B of shared memory, more than an A100's 166,912). The fp32 tiles also lift the register cap ptxas
# chooses by itself (maxnreg): under it, every fp32 dK/dV tile tried spilled somewhere (the one kept: 16 B at
# head_dim 256 on sm_90 with triton 3.6), where with the cap lifted it takes 166 registers and spills nothing.
# Larger tiles spilled kilobytes or overflowed shared memory, and tuning over them would only spend minutes compiling.
_GPU_CONFIGS = {
    "fwd": {64: [(64, 64, 4, 3)],
            128: [(128, 32, 8, 3)],
            256: [(64, 32, 8, 2)],
            "fp32": [(16, 16, 4, 1)]},
    "dkdv": {64: [(32, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 3)],
             128: [(32, 64, 8, 3), (16, 128, 8, 3), (16, 64, 4, 3)],
             256: [(16, 32, 8, 2), (32, 32, 8, 2)],
             "fp32": [(16, 16, 8, 2)]},
    "dq": {64: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3)],
           128: [(128, 32, 8, 2), (64, 64, 8, 3), (64, 32, 4, 3)],
           256: [(64, 32, 8, 2), (32, 16, 4, 2)],
           "fp32": [(16, 16, 8, 2)]},
}
_FP32_MAX_REGISTERS = 255  # the most ptxas may give a thread: lifts its own, lower choice for the fp32 tiles
# The interpreter runs one config (it cannot autotune), with BLOCK_M != BLOCK_N so that the tests cover diagonals
# spanning several blocks.
_INTERPRETER_CONFIGS = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}


def _autotune_args(kernel: str) -> dict:
    """tritongpt.kernels._common.autotune's arguments for one kernel: the shapes of _GPU_CONFIGS[kernel], pruned at
    launch to the input's class, keyed by head_dim, causality, and seq_len_q and seq_len_k each rounded up to a power
    of two (see _seq_lens), since generating text grows them one token at a time and tuning again at every length
    would cost more than it gains."""
    by_class = {cls: [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s,
                                    maxnreg=_FP32_MAX_REGISTERS if cls == "fp32" else None)
                      for m, n, w, s in shapes]
                for cls, shapes in _GPU_CONFIGS[kernel].items()}
    configs = [config for class_configs in by_class.values() for config in class_configs]
    block_m, block_n = _INTERPRETER_CONFIGS[kernel]

    def this_class(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return by_class["fp32" if args["DOT_PRECISION"] == "ieee" else max(args["BLOCK_D"], 64)]

    return dict(configs=configs, key=["seq_len_q_bucket", "seq_len_k_bucket", "HEAD_DIM", "CAUSAL"],
                interpreter_config=triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}),
                prune_configs_by={"early_config_prune": this_class})


_attn_fwd = autotune(**_autotune_args("fwd"))(_attn_fwd)
_attn_bwd_dkdv = autotune(**_autotune_args("dkdv"))(_attn_bwd_dkdv)
_attn_bwd_dq = autotune(**_autotune_args("dq"))(_attn_bwd_dq)
_DELTA_BLOCK_M = 64  # the delta pass is a light row reduction: one tile shape serves

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _launch_params(q: torch.Tensor) -> dict:
    head_dim = q.shape[-1]
    bf16_in_interpreter = q.dtype == torch.bfloat16 and interpreting()
    return {"HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim),
            "DOT_DTYPE": tl.float32 if bf16_in_interpreter else _TL_DTYPES[q.dtype],
            "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32"}


def _seq_lens(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int]:
    """The kernels' seq_len_q, seq_len_k, and the two rounded up to powers of two for the autotuner's key."""
    seq_len_q, seq_len_k = q.shape[-2], k.shape[-2]
    return seq_len_q, seq_len_k, triton.next_power_of_2(seq_len_q), triton.next_power_of_2(seq_len_k)


def _heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(batch, seq_len, n_head · head_dim) -> (batch, n_head, seq_len, head_dim), a view."""
    return x.unflatten(-1, (n_head, -1)).transpose(1, 2)


def _split_heads(qkv: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as views into a fused projection's output qkv (batch, seq_len, 3 · n_embd), laid out [q | k | v]."""
    return tuple(_heads(t, n_head) for t in qkv.chunk(3, dim=-1))


def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq_len, head_dim) -> (batch, seq_len, heads · head_dim): a view of the kernel's output, a copy
    of a (batch, heads, seq_len, head_dim)-contiguous one."""
    return o.transpose(1, 2).flatten(2)


def attention_qkvpacked_reference(qkv: torch.Tensor, n_head: int, causal: bool = True,
                                  softmax_scale: float | None = None) -> torch.Tensor:
    """attention_reference over the n_head heads of a fused projection's output qkv (batch, seq_len, 3 · n_embd),
    laid out [q | k | v]; returns the heads merged, (batch, seq_len, n_embd)."""
    return _merge_heads(attention_reference(*_split_heads(qkv, n_head), causal, softmax_scale))


def sdpa_attention_qkvpacked(qkv: torch.Tensor, n_head: int, causal: bool = True,
                             softmax_scale: float | None = None) -> torch.Tensor:
    """sdpa_attention over the heads of qkv, as attention_qkvpacked_reference."""
    return _merge_heads(sdpa_attention(*_split_heads(qkv, n_head), causal, softmax_scale))


def _output_and_lse(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's outputs for q (batch, heads, seq_len_q, head_dim), unwritten: O with the heads merged,
    (batch, seq_len_q, heads · head_dim), which the kernel writes through its view _heads(O), and the base-2
    log-sum-exp (batch, heads, seq_len_q)."""
    batch, heads, seq_len_q, head_dim = q.shape
    return (torch.empty((batch, seq_len_q, heads * head_dim), dtype=q.dtype, device=q.device),
            torch.empty((batch, heads, seq_len_q), dtype=torch.float32, device=q.device))


def _forward_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float):
    """O of q's shape, laid out as (batch, seq_len_q, heads, head_dim) so that merging its heads is a view, and the
    log-sum-exp; unwritten."""
    o, lse = _output_and_lse(q)
    return _heads(o, q.shape[1]), lse


def _packed_forward_outputs(qkv: torch.Tensor, n_head: int, causal: bool, softmax_scale: float):
    """O with the heads merged (batch, seq_len, n_embd) and the log-sum-exp; unwritten."""
    return _output_and_lse(_split_heads(qkv, n_head)[0])


def _launch_forward(q, k, v, o, lse, causal: bool, softmax_scale: float) -> None:
    batch, heads, seq_len_q, _ = q.shape
    _attn_fwd[lambda meta: (triton.cdiv(seq_len_q, meta["BLOCK_M"]), heads, batch)](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        *_seq_lens(q, k), softmax_scale * math.log2(math.e), CAUSAL=causal, **_launch_params(q))


def _launch_backward(q, k, v, o, lse, do, dq, dk, dv, causal: bool, softmax_scale: float) -> None:
    batch, heads, seq_len_q, _ = q.shape
    seq_len_k = k.shape[-2]
    params = _launch_params(q)
    delta = torch.empty_like(lse)
    _attn_bwd_delta[(triton.cdiv(seq_len_q, _DELTA_BLOCK_M), heads, batch)](
        o, do, delta, *o.stride(), *do.stride(), seq_len_q,
        HEAD_DIM=params["HEAD_DIM"], BLOCK_D=params["BLOCK_D"], BLOCK_M=_DELTA_BLOCK_M)
    qk_scale = softmax_scale * math.log2(math.e)
    _attn_bwd_dkdv[lambda meta: (triton.cdiv(seq_len_k, meta["BLOCK_N"]), heads, batch)](
        q, k, v, do, dk, dv, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        *dk.stride(), *dv.stride(), *_seq_lens(q, k), qk_scale, softmax_scale, CAUSAL=causal, **params)
    _attn_bwd_dq[lambda meta: (triton.cdiv(seq_len_q, meta["BLOCK_M"]), heads, batch)](
        q, k, v, do, dq, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        *_seq_lens(q, k), qk_scale, softmax_scale, CAUSAL=causal, **params)


# Operators rather than an autograd Function, so that torch.compile keeps the kernels in its graph (kernel_op says why
# custom_op: here the autotuner prunes its configs per input class at launch, which Dynamo cannot trace). Two forms:
# separate q, k, v, and the packed one the model uses, whose backward writes dq, dk and dv into one gradient of the
# fused projection's output, where autograd would otherwise copy three gradients into it.
@kernel_op("flash_attention_forward", fake=_forward_outputs)
def _flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                             softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = _forward_outputs(q, k, v, causal, softmax_scale)
    _launch_forward(q, k, v, o, lse, causal, softmax_scale)
    return o, lse


def _backward_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                      do: torch.Tensor, causal: bool, softmax_scale: float):
    """dq, dk, dv, unwritten and contiguous."""
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


@kernel_op("flash_attention_backward", fake=_backward_outputs)
def _flash_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                              do: torch.Tensor, causal: bool,
                              softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _backward_outputs(q, k, v, o, lse, do, causal, softmax_scale)
    _launch_backward(q, k, v, o, lse, do, dq, dk, dv, causal, softmax_scale)
    return dq, dk, dv


@kernel_op("flash_attention_qkvpacked_forward", fake=_packed_forward_outputs)
def _flash_attention_qkvpacked_forward(qkv: torch.Tensor, n_head: int, causal: bool,
                                       softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = _packed_forward_outputs(qkv, n_head, causal, softmax_scale)
    _launch_forward(*_split_heads(qkv, n_head), _heads(o, n_head), lse, causal, softmax_scale)
    return o, lse


def _packed_backward_outputs(qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor, n_head: int,
                             causal: bool, softmax_scale: float) -> torch.Tensor:
    """dqkv, unwritten and contiguous."""
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


@kernel_op("flash_attention_qkvpacked_backward", fake=_packed_backward_outputs)
def _flash_attention_qkvpacked_backward(qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
                                        n_head: int, causal: bool, softmax_scale: float) -> torch.Tensor:
    dqkv = _packed_backward_outputs(qkv, o, lse, do, n_head, causal, softmax_scale)
    _launch_backward(*_split_heads(qkv, n_head), _heads(o, n_head), lse, _heads(do, n_head),
                     *_split_heads(dqkv, n_head), causal, softmax_scale)
    return dqkv


def _setup_context(ctx, inputs, output) -> None:
    """Either form: saves the tensor inputs, O and the log-sum-exp, and keeps the arguments after the tensors."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    o, lse = output
    ctx.save_for_backward(*tensors, o, lse)
    ctx.args = inputs[len(tensors):]
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse gets no gradient: none is allocated for it


def _backward(ctx, do, _dlse):
    dq, dk, dv = _flash_attention_backward(*ctx.saved_tensors, do, *ctx.args)
    return dq, dk, dv, None, None


def _packed_backward(ctx, do, _dlse):
    return _flash_attention_qkvpacked_backward(*ctx.saved_tensors, do, *ctx.args), None, None, None


_flash_attention_forward.register_autograd(_backward, setup_context=_setup_context)
_flash_attention_qkvpacked_forward.register_autograd(_packed_backward, setup_context=_setup_context)


def _validate(q, k, v) -> None:
    check_tensors("flash_attention", q=q, k=k, v=v)
    if not q.ndim == k.ndim == v.ndim == 4:
        raise ValueError(f"flash_attention: q, k, v must have 4 dimensions (batch, heads, seq_len, head_dim), "
                         f"got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have one shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, heads, seq_len_q, head_dim = q.shape
    seq_len_k = k.shape[2]
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, heads, head_dim):
        raise ValueError(f"flash_attention: q and k must have the same batch, heads and head_dim, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}")
    if seq_len_q > seq_len_k:
        raise ValueError(f"flash_attention: q has more rows than k and v (seq_len {seq_len_q} > {seq_len_k}); "
                         "the queries must be the last positions of the keys' sequence")
    if not 16 <= head_dim <= 256:
        raise ValueError(f"flash_attention: head_dim must be between 16 and 256, got {head_dim}")
    if seq_len_q < 1:
        raise ValueError(f"flash_attention: seq_len must be at least 1, got {seq_len_q}")
    if batch < 1 or heads < 1:
        raise ValueError(f"flash_attention: batch and heads must be at least 1, got shape {tuple(q.shape)}")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(q @ k^T * scale [+ causal mask]) @ v for q of shape (batch, heads, seq_len_q, head_dim) and k, v of
    shape (batch, heads, seq_len_k, head_dim), seq_len_q <= seq_len_k, computed tile by tile in Triton without storing
    the seq_len_q x seq_len_k matrix; differentiable. The causal mask is aligned to the end (query i sees keys up to
    i + seq_len_k − seq_len_q), so a single query against cached keys is a decoding step. scale defaults to
    1/sqrt(head_dim). fp16, bf16 or fp32; head_dim 16 to 256; any strides. Returns a tensor of q's shape laid out as
    (batch, seq_len_q, heads, head_dim): o.transpose(1, 2).reshape(batch, seq_len_q, heads * head_dim), merging the
    heads, is a view."""
    _validate(q, k, v)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    o, _ = _flash_attention_forward(q, k, v, bool(causal), float(softmax_scale))
    return o


def flash_attention_qkvpacked(qkv: torch.Tensor, n_head: int, causal: bool = True,
                              softmax_scale: float | None = None) -> torch.Tensor:
    """flash_attention over the n_head heads of a fused projection's output qkv (batch, seq_len, 3 · n_embd), laid
    out [q | k | v]; returns the heads merged, (batch, seq_len, n_embd), with no copy. Its backward writes the
    gradients of q, k and v into one gradient of qkv's shape."""
    check_tensors("flash_attention_qkvpacked", qkv=qkv)
    if qkv.ndim != 3 or n_head < 1 or qkv.shape[-1] % (3 * n_head):
        raise ValueError(f"flash_attention_qkvpacked: qkv must be (batch, seq_len, 3 * n_head * head_dim), got shape "
                         f"{tuple(qkv.shape)} for n_head {n_head}")
    q, k, v = _split_heads(qkv, n_head)
    _validate(q, k, v)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    o, _ = _flash_attention_qkvpacked_forward(qkv, int(n_head), bool(causal), float(softmax_scale))
    return o
