"""Block-sparse attention in Triton: forward, backward (dq; dk and dv) and the dropout-mask launcher.

The layout (see :mod:`fastbert.sparsity`) arrives prepared as lists: for every (layout head,
query block) the key blocks it sees (``q_count``, ``q_index``), and for every (layout head, key
block) the query blocks that see it (``k_count``, ``k_index``). Each program of the forward and
dq kernels owns one query tile and walks its query block's key-block list; each program of the
dk/dv kernel owns one key tile and walks the transposed list. Empty blocks are never visited, every
output element is written by exactly one program, and no atomics are used.

Tiles (``BLOCK_M`` query rows x ``BLOCK_N`` key columns) equal the layout block size or divide it,
so a program walks ``BLOCK // BLOCK_N`` key tiles per listed key block (``BLOCK // BLOCK_M`` query
tiles per listed query block in dk/dv). Rows or columns past Lq / Lk, and head-dim lanes past D,
are masked, so L need not be a multiple of the block size and D is padded to a power of two.

Scores are kept in base 2: ``s2 = (q . k * scale + bias) * log2(e)``. The forward saves each
row's softmax statistics in two planes, ``stats[b, h, 0] = m2`` (the row max) and
``stats[b, h, 1] = log2(l)`` (the log of its sum of ``exp2(s2 - m2)``), and the backward recomputes
``p = exp2((s2 - m2) - log2(l))``. One logsumexp ``m2 + log2(l)`` would not do: next to a row max
near -2.9e38 (a row padded everywhere with HuggingFace's finfo.min) the fp32 sum loses log2(l)
entirely and every p of the row comes out 1. A query row that sees no key (no block, or every key
masked) stores 0 and ``m2 = 0, log2(l) = +inf``, so its backward probabilities are exactly 0.

Dropout uses Philox (``tl.philox``) keyed by the seed with the counters (key column, query row,
batch * H + head): the backward pass and :func:`block_sparse_attention_dropout_mask` regenerate
exactly the forward's keep mask. The seed is a (1,) int64 device tensor
(``fastbert._rng.dropout_seed``) that the kernels load themselves (only when HAS_DROPOUT), so the
host never reads it: no GPU sync, and a captured CUDA graph draws a fresh seed on every replay.

A float attn_mask that requires grad gets d(mask) = dS = P * (dP - delta), the gradient of the
softmax input: the dq kernel writes it (STORE_DS) into a zeroed fp32 (B, H, Lq, Lk) buffer for the
listed blocks only, and the launcher sums it over the mask's broadcast dims.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._mask import bias_log2
from ._seed import check_seed, keep_scale, load_seed, seed_arg
from ._tiles import gpu_tiles

__all__ = [
    "block_sparse_attention_fwd",
    "block_sparse_attention_bwd",
    "block_sparse_attention_dropout_mask",
    "BLOCK_SIZES",
]

BLOCK_SIZES = (16, 32, 64, 128)  # layout block sizes the kernels accept
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, dropout_p):
    """[BM, BN] bool: True where dropout keeps p[row, col] of (batch * H + head) ``bh``."""
    c0 = offs_n[None, :] + offs_m[:, None] * 0  # key column   [BM, BN]
    c1 = offs_m[:, None] + offs_n[None, :] * 0  # query row    [BM, BN]
    zero = c0 * 0
    r0, _r1, _r2, _r3 = tl.philox(seed, c0, c1, zero + bh, zero)
    return tl.uint_to_uniform_float(r0) >= dropout_p


@triton.jit
def _masked_scores(s, m_base, offs_m, offs_n, mask_m, mask_n, stride_mm, stride_mn,
                   HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr):
    """Base-2 scores [BM, BN] with the attn_mask applied and out-of-range keys set to -inf."""
    if HAS_MASK:
        m_ptrs = m_base + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :].to(tl.int64) * stride_mn
        in_range = mask_m[:, None] & mask_n[None, :]
        if MASK_IS_BOOL:
            allowed = tl.load(m_ptrs, mask=in_range, other=0)
            s = tl.where(allowed != 0, s, float("-inf"))
        else:
            bias = tl.load(m_ptrs, mask=in_range, other=0.0).to(tl.float32)
            s = s + bias_log2(bias)
    return tl.where(mask_n[None, :], s, float("-inf"))


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _program_tile(num_tiles):
    """(tile, batch * head) of this program. The grid is flat, with the tiles of one (batch, head)
    adjacent (launched together, they share its K/V in L2), so that batch * heads may exceed
    CUDA's 65535 limit on grid dims y and z."""
    pid = tl.program_id(0)
    return pid % num_tiles, pid // num_tiles


@triton.jit
def _block_sparse_attention_fwd_kernel(
    Q, K, V, Out,            # q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, DV], out [B, H, Lq, DV]
    Stats,                   # [B, H, 2, Lq] float32 contiguous: row max m2 and log2(l), base 2
    Mask,                    # attn_mask expanded to [B, H, Lq, Lk] (uint8 view of bool, or float)
    QCount, QIndex,          # [HL, NBQ] int32 key blocks per query block; [HL, NBQ, NBK] their ids
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, HL, NBQ, NBK,         # heads, layout heads (1 = shared, or H), query blocks, key blocks
    Lq, Lk, D, DV,           # sequence lengths and true head dims
    qk_scale,                # softmax scale * log2(e)
    dropout_p, dropout_scale,  # drop probability, 1 / (1 - p)
    Seed,                    # [1] int64 Philox seed in device memory, read only when HAS_DROPOUT
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,     # layout block size
    BLOCK_M: tl.constexpr,   # query rows per program (divides BLOCK)
    BLOCK_N: tl.constexpr,   # key columns per inner step (divides BLOCK)
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  # D, DV padded to powers of two (>= 16)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), else "tf32" (ignored for 16-bit)
):
    pid_m, pid_bh = _program_tile(tl.cdiv(Lq, BLOCK_M))
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    lay_row = ((pid_bh % H) % HL).to(tl.int64) * NBQ + (pid_m * BLOCK_M) // BLOCK

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < Lq
    mask_d = offs_d < D
    mask_dv = offs_dv < DV

    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh
              + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BM, BD]
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    m_base = Mask + off_b * stride_mb + off_h * stride_mh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)      # running (dropped) P @ V

    seed = load_seed(Seed, HAS_DROPOUT)
    n_blocks = tl.load(QCount + lay_row)
    idx_ptr = QIndex + lay_row * NBK
    # one flat loop over (listed block, BLOCK_N sub-tile): a static inner loop would be
    # unrolled BLOCK // BLOCK_N times, which made layout block 128 spill and overflow shared memory
    for it in range(0, n_blocks * (BLOCK // BLOCK_N)):
        blk_k = tl.load(idx_ptr + it // (BLOCK // BLOCK_N))
        sub = it % (BLOCK // BLOCK_N)
        offs_n = blk_k * BLOCK + sub * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Lk
        kt_ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd
        kt = tl.load(kt_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)  # [BD, BN]
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BM, BD] @ [BD, BN] -> [BM, BN]
        s = _masked_scores(s, m_base, offs_m, offs_n, mask_m, mask_n, stride_mm, stride_mn,
                           HAS_MASK, MASK_IS_BOOL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        alpha = tl.exp2(m_i - m_safe)                           # rescales the old sums
        p = tl.exp2(s - m_safe[:, None])                        # [BM, BN], 0 where masked
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, pid_bh, offs_m, offs_n, dropout_p)
            p = tl.where(keep, p, 0.0)
        v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_dv[None, :], other=0.0)  # [BN, BDV]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        # [BM, BN] @ [BN, BDV] -> [BM, BDV]
        m_i = m_new

    alive = l_i > 0.0
    l_safe = tl.where(alive, l_i, 1.0)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * dropout_scale
    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh
              + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])
    stats = Stats + pid_bh.to(tl.int64) * 2 * Lq
    tl.store(stats + offs_m, tl.where(alive, m_i, 0.0), mask=mask_m)
    tl.store(stats + Lq + offs_m, tl.where(alive, tl.log2(l_safe), float("inf")), mask=mask_m)


@triton.jit
def _load_stats(Stats, bh, offs_m, mask_m, Lq):
    """The forward's (m2, log2(l)) [BM] of rows ``offs_m`` of (batch * H + head) ``bh``; rows past
    Lq get (0, +inf), hence probabilities exp2((s - m2) - log2(l)) of exactly 0."""
    stats = Stats + bh.to(tl.int64) * 2 * Lq
    m2 = tl.load(stats + offs_m, mask=mask_m, other=0.0)
    log2_l = tl.load(stats + Lq + offs_m, mask=mask_m, other=float("inf"))
    return m2, log2_l


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _block_sparse_attention_bwd_preprocess_kernel(
    Out, DO,                 # out, grad_out [B, H, Lq, DV]
    Delta,                   # [B, H, Lq] float32: rowsum(out * grad_out)
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, Lq, DV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m, pid_bh = _program_tile(tl.cdiv(Lq, BLOCK_M))
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m < Lq)[:, None] & (offs_dv < DV)[None, :]
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om
                + offs_dv[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)  # [BM, BDV]
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None].to(tl.int64) * stride_dom
                 + offs_dv[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)  # [BM, BDV]
    tl.store(Delta + pid_bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _block_sparse_attention_bwd_dq_kernel(
    Q, K, V, DO, DQ,         # q, dq [B, H, Lq, D]; k [B, H, Lk, D]; v [B, H, Lk, DV]; do [B, H, Lq, DV]
    Stats, Delta,            # [B, H, 2, Lq] float32 forward statistics; [B, H, Lq] rowsum(out * do)
    Mask,                    # attn_mask expanded to [B, H, Lq, Lk]
    DS,                      # [B, H, Lq, Lk] float32 zeros: receives dS when STORE_DS, else unused
    QCount, QIndex,          # key-block lists of the query blocks (as in the forward)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dsb, stride_dsh, stride_dsm, stride_dsn,
    H, HL, NBQ, NBK, Lq, Lk, D, DV,
    qk_scale, sm_scale,      # scale * log2(e), scale
    dropout_p, dropout_scale, Seed,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    STORE_DS: tl.constexpr,  # write dS (the float mask's gradient before its broadcast sum)
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_bh = _program_tile(tl.cdiv(Lq, BLOCK_M))
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    lay_row = ((pid_bh % H) % HL).to(tl.int64) * NBQ + (pid_m * BLOCK_M) // BLOCK

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < Lq
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    rows = offs_m[:, None].to(tl.int64)

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BM, BD]
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=mask_m[:, None] & mask_dv[None, :], other=0.0)  # [BM, BDV]
    m2, log2_l = _load_stats(Stats, pid_bh, offs_m, mask_m, Lq)                              # [BM]
    delta = tl.load(Delta + pid_bh.to(tl.int64) * Lq + offs_m, mask=mask_m, other=0.0)       # [BM]
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    m_base = Mask + off_b * stride_mb + off_h * stride_mh
    ds_base = DS + off_b * stride_dsb + off_h * stride_dsh

    seed = load_seed(Seed, HAS_DROPOUT)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_blocks = tl.load(QCount + lay_row)
    idx_ptr = QIndex + lay_row * NBK
    # one flat loop over (listed block, BLOCK_N sub-tile): a static inner loop would be
    # unrolled BLOCK // BLOCK_N times, which made layout block 128 spill and overflow shared memory
    for it in range(0, n_blocks * (BLOCK // BLOCK_N)):
        blk_k = tl.load(idx_ptr + it // (BLOCK // BLOCK_N))
        sub = it % (BLOCK // BLOCK_N)
        offs_n = blk_k * BLOCK + sub * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Lk
        cols = offs_n[:, None].to(tl.int64)
        k = tl.load(k_base + cols * stride_kn + offs_d[None, :] * stride_kd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # [BN, BD]
        v = tl.load(v_base + cols * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_dv[None, :], other=0.0)  # [BN, BDV]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BM, BD] @ [BD, BN]
        s = _masked_scores(s, m_base, offs_m, offs_n, mask_m, mask_n, stride_mm, stride_mn,
                           HAS_MASK, MASK_IS_BOOL)
        p = tl.exp2((s - m2[:, None]) - log2_l[:, None])                         # [BM, BN]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BM, BDV] @ [BDV, BN] -> [BM, BN]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, pid_bh, offs_m, offs_n, dropout_p)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])                       # [BM, BN] dL/d(score), natural log
        if STORE_DS:  # d(attn_mask) = dS: every (row, listed column) is written exactly once
            tl.store(ds_base + rows * stride_dsm + offs_n[None, :].to(tl.int64) * stride_dsn, ds,
                     mask=mask_m[:, None] & mask_n[None, :])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)  # [BM, BN] @ [BN, BD] -> [BM, BD]

    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + rows * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _block_sparse_attention_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV_,    # dk [B, H, Lk, D], dv [B, H, Lk, DV] (others as in the dq kernel)
    Stats, Delta, Mask,
    KCount, KIndex,          # [HL, NBK] int32 query blocks per key block; [HL, NBK, NBQ] their ids
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, HL, NBQ, NBK, Lq, Lk, D, DV,
    qk_scale, sm_scale,
    dropout_p, dropout_scale, Seed,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,   # query rows per inner step (divides BLOCK)
    BLOCK_N: tl.constexpr,   # key rows per program (divides BLOCK)
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n, pid_bh = _program_tile(tl.cdiv(Lk, BLOCK_N))
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    lay_row = ((pid_bh % H) % HL).to(tl.int64) * NBK + (pid_n * BLOCK_N) // BLOCK

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < Lk
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    cols = offs_n[:, None].to(tl.int64)

    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + cols * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # [BN, BD]
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + cols * stride_vn + offs_dv[None, :] * stride_vd,
                mask=mask_n[:, None] & mask_dv[None, :], other=0.0)  # [BN, BDV]
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    m_base = Mask + off_b * stride_mb + off_h * stride_mh
    delta_base = Delta + pid_bh.to(tl.int64) * Lq

    seed = load_seed(Seed, HAS_DROPOUT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    n_blocks = tl.load(KCount + lay_row)
    idx_ptr = KIndex + lay_row * NBQ
    # one flat loop over (listed block, BLOCK_M sub-tile): a static inner loop would be
    # unrolled BLOCK // BLOCK_M times, which made layout block 128 spill and overflow shared memory
    for it in range(0, n_blocks * (BLOCK // BLOCK_M)):
        blk_q = tl.load(idx_ptr + it // (BLOCK // BLOCK_M))
        sub = it % (BLOCK // BLOCK_M)
        offs_m = blk_q * BLOCK + sub * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < Lq
        rows = offs_m[:, None].to(tl.int64)
        q = tl.load(q_base + rows * stride_qm + offs_d[None, :] * stride_qd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BM, BD]
        do = tl.load(do_base + rows * stride_dom + offs_dv[None, :] * stride_dod,
                     mask=mask_m[:, None] & mask_dv[None, :], other=0.0)  # [BM, BDV]
        m2, log2_l = _load_stats(Stats, pid_bh, offs_m, mask_m, Lq)       # [BM]
        delta = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)      # [BM]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BM, BD] @ [BD, BN]
        s = _masked_scores(s, m_base, offs_m, offs_n, mask_m, mask_n, stride_mm, stride_mn,
                           HAS_MASK, MASK_IS_BOOL)
        p = tl.exp2((s - m2[:, None]) - log2_l[:, None])                         # [BM, BN]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BM, BDV] @ [BDV, BN] -> [BM, BN]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, pid_bh, offs_m, offs_n, dropout_p)
            p_drop = tl.where(keep, p * dropout_scale, 0.0)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        else:
            p_drop = p
        dv += tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=DOT_PRECISION)
        # [BN, BM] @ [BM, BDV] -> [BN, BDV]
        ds = p * (dp - delta[:, None])                                           # [BM, BN]
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        # [BN, BM] @ [BM, BD] -> [BN, BD]

    dk = dk * sm_scale
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + cols * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
    tl.store(DV_ + off_b * stride_dvb + off_h * stride_dvh + cols * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV_.dtype.element_ty), mask=mask_n[:, None] & mask_dv[None, :])


@triton.jit
def _block_sparse_attention_bwd_dmask_kernel(
    Q, K, V, DO, Stats, Delta, Mask,
    Layout,                  # [HL, NBQ, NBK] uint8, contiguous: 1 = the block is attended
    DMask,                   # [MB, MH, Lq, Lk] float32 zeros: receives the mask gradient
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, HL, NBQ, NBK, Lq, Lk, D, DV,
    MH,                      # mask heads: 1 (broadcast over heads) or H
    loop_b, loop_h,          # (batch, head) entries summed into one mask slice: B or 1, H or 1
    qk_scale, dropout_p, dropout_scale, Seed,
    HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The gradient of a float mask broadcast over batch and/or heads, summed over those dims in
    the kernel (deterministic: one program owns one [BM, BN] tile of one mask slice and loops over
    the (batch, head) entries sharing it, skipping those whose layout leaves the tile's block
    out). Scratch (MB, MH, Lq, Lk) fp32 instead of (B, H, Lq, Lk); tiles of blocks no head
    attends return at once and keep their zeros."""
    num_m = tl.cdiv(Lq, BLOCK_M)
    num_n = tl.cdiv(Lk, BLOCK_N)
    pid = tl.program_id(0)
    tile_n = pid % num_n
    tile_m = (pid // num_n) % num_m
    slice_id = pid // (num_n * num_m)               # mb * MH + mh
    mb = slice_id // MH
    mh = slice_id % MH
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < Lq
    mask_n = offs_n < Lk
    rows = offs_m[:, None].to(tl.int64)
    cols = offs_n[:, None].to(tl.int64)
    lay_block = ((tile_m * BLOCK_M) // BLOCK).to(tl.int64) * NBK + (tile_n * BLOCK_N) // BLOCK
    seed = load_seed(Seed, HAS_DROPOUT)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, loop_b * loop_h):
        b = mb + i // loop_h
        h = mh + i % loop_h
        if tl.load(Layout + (h % HL).to(tl.int64) * NBQ * NBK + lay_block) != 0:
            off_b = b.to(tl.int64)
            off_h = h.to(tl.int64)
            q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows * stride_qm
                        + offs_d[None, :] * stride_qd,
                        mask=mask_m[:, None] & (offs_d < D)[None, :], other=0.0)    # [BM, BD]
            do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows * stride_dom
                         + offs_dv[None, :] * stride_dod,
                         mask=mask_m[:, None] & (offs_dv < DV)[None, :], other=0.0)  # [BM, BDV]
            k = tl.load(K + off_b * stride_kb + off_h * stride_kh + cols * stride_kn
                        + offs_d[None, :] * stride_kd,
                        mask=mask_n[:, None] & (offs_d < D)[None, :], other=0.0)    # [BN, BD]
            v = tl.load(V + off_b * stride_vb + off_h * stride_vh + cols * stride_vn
                        + offs_dv[None, :] * stride_vd,
                        mask=mask_n[:, None] & (offs_dv < DV)[None, :], other=0.0)  # [BN, BDV]
            bh = b * H + h
            m2, log2_l = _load_stats(Stats, bh, offs_m, mask_m, Lq)
            delta = tl.load(Delta + bh.to(tl.int64) * Lq + offs_m, mask=mask_m, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BM, BD] @ [BD, BN]
            s = _masked_scores(s, Mask + off_b * stride_mb + off_h * stride_mh, offs_m, offs_n,
                               mask_m, mask_n, stride_mm, stride_mn, True, False)
            p = tl.exp2((s - m2[:, None]) - log2_l[:, None])                     # [BM, BN]
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BM, BDV] @ [BDV, BN]
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m, offs_n, dropout_p)
                dp = tl.where(keep, dp * dropout_scale, 0.0)
            acc += p * (dp - delta[:, None])
    tl.store(DMask + slice_id.to(tl.int64) * Lq * Lk + rows * Lk + offs_n[None, :], acc,
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _block_sparse_attention_dropout_mask_kernel(
    Keep,                    # [B * H, Lq, Lk] uint8 output, 1 = kept
    Lq, Lk, dropout_p,
    Seed,                    # [1] int64 Philox seed in device memory
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seed = tl.load(Seed)
    pid_bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, pid_bh, offs_m, offs_n, dropout_p)
    ptrs = (Keep + pid_bh.to(tl.int64) * Lq * Lk + offs_m[:, None].to(tl.int64) * Lk
            + offs_n[None, :])
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m < Lq)[:, None] & (offs_n < Lk)[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# fp32 tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim (<= 64, <= 128,
# <= 256). fp32 runs tl.dot in "ieee" precision, on FMA units without tensor cores, where the
# 16-bit tiles spill kilobytes per thread (see _tiles). BLOCK_N of the dk/dv kernel is its key
# rows per program, BLOCK_M its query rows per inner step. Tiles larger than the layout block are
# cut to it (same warps, except at 16 x 16: see _tiles).
_FP32_TILES = {
    "fwd": {64: (64, 64, 8, 2), 128: (32, 64, 8, 2), 256: (16, 32, 4, 1)},
    "bwd_dq": {64: (32, 64, 8, 2), 128: (32, 64, 8, 2), 256: (16, 32, 4, 1)},
    "bwd_dkdv": {64: (64, 16, 8, 1), 128: (64, 16, 8, 2), 256: (32, 16, 8, 1)},
}
# The broadcast-mask gradient kernel: an fp32 [BM, BN] accumulator on top of the dq kernel's S / dP
# tiles. From ahead-of-time compiles (not timings), sm_80 and sm_90: 16-bit D <= 128 at 64 x 32
# with 8 warps and fp32 at 32 x 32 with 4 warps spill nothing; at D > 128, 32 x 32 spilled
# 0.6-0.7 KB a thread and 16 x 32 nothing.
_DMASK_TILES = {"16bit": (64, 32, 8, 2), "fp32": (32, 32, 4, 2), "d256": (16, 32, 4, 2)}
_KERNELS = tuple(_FP32_TILES) + ("bwd_dmask",)


def _tiles(block_size: int, d: int, dv: int, dtype: torch.dtype, device: torch.device,
           kernel: str, block_m: Optional[int], block_n: Optional[int]) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for ``kernel`` ("fwd", "bwd_dq", "bwd_dkdv" or
    "bwd_dmask";
    explicit ``block_m`` / ``block_n`` override the tiles of every kernel). Tiles divide the layout
    block. Under the interpreter (CPU): one tile per block, i.e. fewer, larger numpy steps (the GPU
    tiles with FASTBERT_INTERPRETER_TILES, see ``_tiles.py``).

    GPU defaults. 16-bit: the usual FlashAttention-2 Triton shapes (64 x 64, 128 query rows in the
    forward at D <= 64, 32 x 32 beyond D = 128). fp32: the table above, per kernel.

    How they were checked (no GPU, so no timing yet): ahead-of-time compilation with Triton 3.8 for
    sm_90a and sm_80 and the bundled ``ptxas -v`` (tests/_compile_kernels.py; per-kernel spills and
    shared memory with ``python tests/_compile_kernels.py --family block_sparse_attention``), fp16
    / bf16 / fp32 at D = 64 and 128, layout blocks 64 and 128, plain and float mask (with its
    gradient) + dropout; fp32 also at D = 256 and layout blocks 16 / 32 (no spill above 16 B). The
    former fp32 tiles (the 16-bit ones with 4 warps; 32 x 32 in the backward at D = 128) spilled
    0.5-4.6 KB per thread at D = 64 on sm_90 (up to 28 KB on sm_80) and 5-36 KB at D = 128 (spill
    stores; ptxas often fell back to 32 registers): fp32 runs tl.dot in "ieee" precision on FMA
    units, whose operand layouts need far more registers than the tensor-core ones. With the table
    no kernel spills more than 480 B (fp32 D = 128 dq with the mask gradient; most spill nothing)
    and the 16-bit tiles at most 116 B (sm_80 dk/dv, float mask + dropout); the most shared memory
    is 120 KB (fp16 D = 128 dq with the mask gradient on sm_90), within an A100's 163 KB and an
    H100's 227 KB. The ptxas fits are erratic (fp32 D = 64 dk/dv: 64 x 16 with 8 warps spills
    nothing, 32 x 32 1.8 KB), so the table records measurements, not a rule: re-check after a
    change. Layout block 128 gives the same numbers as 64 because the kernels walk sub-tiles in one
    flat loop (see the kernels).
    """
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
    dmax = max(d, dv)
    backward = kernel != "fwd"
    warps = stages = None
    if not gpu_tiles(device):
        bm = bn = block_size
    elif kernel == "bwd_dmask":
        bm, bn, warps, stages = _DMASK_TILES[
            "d256" if dmax > 128 else "fp32" if dtype == torch.float32 else "16bit"]
        bm, bn = min(block_size, bm), min(block_size, bn)
    elif dtype == torch.float32:
        bucket = 64 if dmax <= 64 else 128 if dmax <= 128 else 256
        bm, bn, warps, stages = _FP32_TILES[kernel][bucket]
        bm, bn = min(block_size, bm), min(block_size, bn)
    elif backward:
        bm = bn = min(block_size, 64 if dmax <= 128 else 32)
    else:
        bm = min(block_size, 128 if dmax <= 64 else 64 if dmax <= 128 else 32)
        bn = min(block_size, 64 if dmax <= 128 else 32)
    bm = block_m or bm
    bn = block_n or bn
    for name, t in (("block_m", bm), ("block_n", bn)):
        if t < 16 or block_size % t or t & (t - 1):
            raise ValueError(f"{name} must be a power of two >= 16 dividing block_size = "
                             f"{block_size}, got {t}")
    if warps is None or bm * bn < 16 * 32:  # 16 x 16 (a block-16 layout): the generic rule
        warps = 8 if (bm * bn >= 128 * 64 or (backward and dmax > 64 and bm * bn >= 64 * 64)) else 4
    return bm, bn, warps, 2 if stages is None else stages


def _mask_args(attn_mask: Optional[torch.Tensor], shape, dummy: torch.Tensor):
    """(tensor, strides, HAS_MASK, MASK_IS_BOOL) for an SDPA-style mask broadcast to [B, H, Lq, Lk]
    by strides (nothing is materialised)."""
    if attn_mask is None:
        return dummy, (0, 0, 0, 0), False, False
    m = attn_mask.detach().expand(*shape)
    is_bool = m.dtype == torch.bool
    if is_bool:
        m = m.view(torch.uint8)
    return m, m.stride(), True, is_bool


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _sum_to_mask(ds: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor]):
    """dS (B, H, Lq, Lk) summed over the mask's broadcast dims, in its dtype (None: no gradient)."""
    return None if ds is None else ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype)


def block_sparse_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_count: torch.Tensor, q_index: torch.Tensor, block_size: int,
    attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
    scale: Optional[float] = None, seed: Optional[torch.Tensor] = None, *,
    block_m: Optional[int] = None, block_n: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward pass.

    Args:
        q: (B, H, Lq, D); k: (B, H, Lk, D); v: (B, H, Lk, DV); any strides; fp16/bf16/fp32.
        q_count, q_index: (HL, NBQ), (HL, NBQ, NBK) int32 from ``fastbert.sparsity.prepare_layout``.
        block_size: layout block size (16, 32, 64 or 128).
        attn_mask: optional bool (True = attend) or float (added) mask broadcastable to (B, H, Lq, Lk).
        dropout_p, seed: dropout on the attention probabilities; seed is the (1,) int64 Philox
            seed on q's device (``fastbert._rng.dropout_seed``), read by the kernel only, needed
            when dropout_p > 0 and ignored otherwise.
        scale: softmax scale, default 1/sqrt(D). block_m, block_n: tile overrides (tests).

    Returns:
        out (B, H, Lq, DV) in q's dtype and stats (B, H, 2, Lq) float32: each row's max score m2
        and log2 of its sum of exp2(s2 - m2), base 2 (0 and +inf for rows that see no key).
    """
    _check_block_size(block_size)
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    hl, nbq, nbk = q_index.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    seed = seed_arg(seed, dropout_p, q)
    out = torch.empty((b, h, lq, dv), dtype=q.dtype, device=q.device)
    stats = torch.empty((b, h, 2, lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        stats[:, :, 0] = 0.0
        stats[:, :, 1] = float("inf")
        return out, stats
    bm, bn, warps, stages = _tiles(block_size, d, dv, q.dtype, q.device, "fwd", block_m, block_n)
    mask, mstr, has_mask, mask_bool = _mask_args(attn_mask, (b, h, lq, lk), q)
    grid = (triton.cdiv(lq, bm) * b * h,)  # flat: see _program_tile
    _block_sparse_attention_fwd_kernel[grid](
        q, k, v, out, stats, mask, q_count, q_index,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mstr,
        h, hl, nbq, nbk, lq, lk, d, dv,
        scale * LOG2E, dropout_p, keep_scale(dropout_p), seed,
        HAS_MASK=has_mask, MASK_IS_BOOL=mask_bool, HAS_DROPOUT=dropout_p > 0.0,
        BLOCK=block_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pad_dim(d), BLOCK_DV=_pad_dim(dv),
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=warps, num_stages=stages,
    )
    return out, stats


def block_sparse_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, stats: torch.Tensor,
    q_count: torch.Tensor, q_index: torch.Tensor, k_count: torch.Tensor, k_index: torch.Tensor,
    block_size: int, attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
    scale: Optional[float] = None, seed: Optional[torch.Tensor] = None, mask_grad: bool = False,
    *, block_m: Optional[int] = None, block_n: Optional[int] = None,
    layout: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Backward pass for upstream ``do`` (B, H, Lq, DV), given the forward's ``out`` and ``stats``
    and the same layout lists, mask, dropout and seed tensor. dq walks each query block's key-block
    list; dk/dv walk each key block's query-block list (``k_count``, ``k_index``).

    Returns (dq, dk, dv, dmask). dmask is None unless ``mask_grad`` and ``attn_mask`` is a float
    mask: then it is the gradient of the additive mask, dS = P * (dP - delta) (the gradient of the
    softmax input), summed over the mask's broadcast dims (its shape and dtype), exactly 0 in the
    blocks the layout skips. A mask broadcast over batch and/or heads, given ``layout`` (the
    (HL, NBQ, NBK) layout the lists were prepared from), is summed over those dims by its own
    kernel into an fp32 (MB, MH, Lq, Lk) scratch; otherwise the dq kernel writes dS into an fp32
    (B, H, Lq, Lk) scratch, for the listed blocks only.
    """
    _check_block_size(block_size)
    b, h, lq, d = q.shape
    lk, dv_dim = k.shape[2], v.shape[-1]
    hl, nbq, nbk = q_index.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    seed = seed_arg(seed, dropout_p, q)
    mask_grad = bool(mask_grad) and attn_mask is not None and attn_mask.is_floating_point()
    dq = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, h, lk, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, h, lk, dv_dim), dtype=v.dtype, device=v.device)
    mask, mstr, has_mask, mask_bool = _mask_args(attn_mask, (b, h, lq, lk), q)
    # broadcast dims by the mask's shape (a stride-0 view of full size gets a per-element gradient)
    mshape = (1, 1) if attn_mask is None else (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    mb = b if mshape[0] != 1 else 1
    mh = h if mshape[1] != 1 else 1
    own_kernel = mask_grad and layout is not None and mb * mh < b * h
    # Skipped blocks (and positions of an empty problem) keep their 0.
    ds = None
    if mask_grad:
        ds = torch.zeros((mb, mh, lq, lk) if own_kernel else (b, h, lq, lk), dtype=torch.float32,
                         device=q.device)
    if b * h == 0:
        return dq, dk, dv, _sum_to_mask(ds, attn_mask)
    flags = dict(HAS_MASK=has_mask, MASK_IS_BOOL=mask_bool, HAS_DROPOUT=dropout_p > 0.0,
                 BLOCK=block_size, BLOCK_D=_pad_dim(d), BLOCK_DV=_pad_dim(dv_dim),
                 DOT_PRECISION=_dot_precision(q.dtype))
    drop = (dropout_p, keep_scale(dropout_p), seed)
    in_dq = mask_grad and not own_kernel
    ds_arg, ds_strides = (ds, ds.stride()) if in_dq else (q, (0, 0, 0, 0))
    delta = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    if lq > 0:
        bm, bn, warps, stages = _tiles(block_size, d, dv_dim, q.dtype, q.device, "bwd_dq",
                                       block_m, block_n)
        _block_sparse_attention_bwd_preprocess_kernel[(triton.cdiv(lq, bm) * b * h,)](
            out, do, delta, *out.stride(), *do.stride(), h, lq, dv_dim,
            BLOCK_M=bm, BLOCK_DV=_pad_dim(dv_dim))
        _block_sparse_attention_bwd_dq_kernel[(triton.cdiv(lq, bm) * b * h,)](
            q, k, v, do, dq, stats, delta, mask, ds_arg, q_count, q_index,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *mstr, *ds_strides,
            h, hl, nbq, nbk, lq, lk, d, dv_dim, scale * LOG2E, scale, *drop, STORE_DS=in_dq,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **flags)
    if lk > 0:
        bm, bn, warps, stages = _tiles(block_size, d, dv_dim, q.dtype, q.device, "bwd_dkdv",
                                       block_m, block_n)
        _block_sparse_attention_bwd_dkdv_kernel[(triton.cdiv(lk, bn) * b * h,)](
            q, k, v, do, dk, dv, stats, delta, mask, k_count, k_index,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *mstr,
            h, hl, nbq, nbk, lq, lk, d, dv_dim, scale * LOG2E, scale, *drop,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **flags)
    if own_kernel and lq > 0 and lk > 0:
        bm, bn, warps, stages = _tiles(block_size, d, dv_dim, q.dtype, q.device, "bwd_dmask",
                                       block_m, block_n)
        lay = layout.to(device=q.device, dtype=torch.uint8).contiguous()
        grid = (triton.cdiv(lq, bm) * triton.cdiv(lk, bn) * mb * mh,)
        _block_sparse_attention_bwd_dmask_kernel[grid](
            q, k, v, do, stats, delta, mask, lay, ds,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *mstr,
            h, hl, nbq, nbk, lq, lk, d, dv_dim, mh, b if mb == 1 else 1, h if mh == 1 else 1,
            scale * LOG2E, *drop, HAS_DROPOUT=dropout_p > 0.0, BLOCK=block_size, BLOCK_M=bm,
            BLOCK_N=bn, BLOCK_D=_pad_dim(d), BLOCK_DV=_pad_dim(dv_dim),
            DOT_PRECISION=_dot_precision(q.dtype), num_warps=warps, num_stages=stages)
    return dq, dk, dv, _sum_to_mask(ds, attn_mask)


def block_sparse_attention_dropout_mask(seed: torch.Tensor, shape, dropout_p: float) -> torch.Tensor:
    """The exact keep-mask (bool (B, H, Lq, Lk) on ``seed``'s device, True = kept) that the kernels
    draw for the (1,) int64 seed tensor ``seed`` (the third output of the forward op); for tests:
    pass it to ``fastbert.reference.block_sparse_attention(..., dropout_mask=...)``."""
    b, h, lq, lk = shape
    check_seed(seed)
    keep = torch.empty((b * h, lq, lk), dtype=torch.uint8, device=seed.device)
    if keep.numel():
        grid = (b * h, triton.cdiv(lq, 32), triton.cdiv(lk, 32))
        _block_sparse_attention_dropout_mask_kernel[grid](keep, lq, lk, dropout_p, seed,
                                                          BLOCK_M=32, BLOCK_N=32)
    return keep.view(b, h, lq, lk).bool()
