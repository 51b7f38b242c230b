"""Fused multi-head attention in Triton, FlashAttention-2 style: forward, backward, dropout, varlen.

Kernels (all one program per tile; ``pid`` is flattened so that batch x heads can be in the
thousands without hitting CUDA's 65535 limit on grid dims y/z):

* ``_attention_fwd_kernel``: one program per (query block, head, batch/sequence). It streams the
  key/value blocks through an online softmax (running max ``m_i`` and sum ``l_i`` in base 2,
  fp32 accumulator), so the Lq x Lk score matrix never exists in memory, and writes the output and
  the softmax statistics of each row (see ``attention_fwd``).
* ``_attention_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` (fp32), one value per query row.
* ``_attention_bwd_dkdv_kernel``: one program per key block (of each key / value head); it walks
  the query blocks (of every query head that shares the K/V head, under GQA), rebuilds
  ``P = exp2((S - m) - log2(l))`` and accumulates ``dV += P^T dO`` and ``dK += dS^T Q`` in registers.
* ``_attention_bwd_dq_kernel``: one program per query block; it walks the key blocks and
  accumulates ``dQ += dS K``; when the additive mask needs a gradient it also writes ``dS``.
  The two backward kernels recompute ``S`` each (FlashAttention-2's atomic-free split), so the
  backward pass is deterministic.
* ``_key_limit_kernel``: per batch entry, one past the last key a bool mask lets through.
* ``_attention_dropout_mask_kernel``: writes the keep-mask the attention kernels use for a seed,
  for tests and references only.

Semantics (those of ``fastbert.reference.scaled_dot_product_attention``): a bool mask is True where
a key takes part, a float mask is added to the scores; masks are read through their strides, so
a broadcast dim has stride 0 and is never expanded in memory; ``is_causal`` keeps key j for query
i iff j <= i (top-left aligned) and combines with the mask; a query row with no key left returns 0
and gets zero gradients. Dropout keeps element (b, h, i, j) iff ``tl.rand(seed, offset) >=
dropout_p`` with ``offset = ((b * H + h) * Lq + i) * Lk + j`` (varlen: b is the sequence and
Lq/Lk are max_seqlen_q/max_seqlen_k), which is the flat index of a contiguous (B, H, Lq, Lk)
tensor, so :func:`attention_dropout_mask` can materialise exactly the same mask. The seed is an
int64 (1,) tensor on the inputs' device (``fastbert._rng.dropout_seed``) that each kernel loads
(``tl.load(Seed)``) only when ``HAS_DROPOUT``: the host never reads it (no sync), and a captured
CUDA graph reads the fresh seed drawn on each replay.

Options, each a constexpr that compiles away when off: grouped-query attention (``kv_group``
query heads per key / value head: K/V read at head h // kv_group; dK/dV summed over the group in
registers), ALiBi (``HAS_ALIBI``: ``- slope * |i - j|`` added to the scores from one slope per
(batch, head)), and a sliding window (``HAS_WINDOW``: query i sees keys i - left .. i + right; the
programs visit only the blocks the window reaches, and check each of them), and key limits
(``KEY_LIMIT``, dense bool masks: ``_key_limit_kernel`` finds, per batch entry, one past the last
key the mask lets through; the programs stop there, so the right-padded keys of a padded batch
cost no work, and dK / dV store zeros for them).

Head dims (any multiple of 8 up to 256) are padded to the next power of two inside the kernel
(``BLOCK_D``) with masked loads; tensors may have any strides (a (B, L, H, D) tensor viewed as
(B, H, L, D) runs without a copy). The base of each (batch, head, sequence) slice is a 64-bit
offset, so tensors may exceed 2^31 elements; offsets inside one slice are 32-bit (a 64-bit offset
that changes inside the key loop makes ptxas serialise the sm90 wgmma pipeline), so one slice must
span fewer than 2^31 elements (the Triton backend's reasons in fastbert.ops.attention check it).
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._mask import bias_log2
from ._seed import check_seed, keep_scale, load_seed, seed_arg
from ._tiles import gpu_tiles, interpreter_tiles, interpreting

__all__ = [
    "attention_fwd",
    "attention_bwd",
    "varlen_attention_fwd",
    "varlen_attention_bwd",
    "attention_dropout_mask",
    "varlen_attention_dropout_masks",
    "attention_config",
    "attention_out_layout",
    "key_limits",
    "softmax_stats_to_lse",
]

LOG2E = 1.4426950408889634  # log2(e): scores are kept in base 2 so the kernels use exp2
LN2 = 0.6931471805599453  # ln(2): converts the base-2 logsumexp back to natural log

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


@triton.jit
def _window_keep(rows, cols, window_left, window_right):
    """[len(rows), len(cols)] True where key j lies in query i's window: i - left <= j <= i + right."""
    return (cols[None, :] >= rows[:, None] - window_left) & (cols[None, :] <= rows[:, None] + window_right)


@triton.jit
def _alibi_slope_log2(Alibi, b64, h64, stride_ab, stride_ah, HAS_ALIBI: tl.constexpr):
    """The ALiBi slope of (batch, head) in base-2 units (0 without ALiBi)."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b64 * stride_ab + h64 * stride_ah).to(tl.float32) * 1.4426950408889634
    return slope


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_fwd_block(
    acc, l_i, m_i,            # running state: [BM, BDV] f32 sum of P V, [BM] f32 sum of P, [BM] f32 max (base 2)
    q,                        # [BM, BD] query tile, input dtype
    start_n,                  # first key index of this block (within the sequence)
    offs_m, rows, row_ok,     # [BM] local row ids 0..BM-1, query indices (start_m + offs_m), rows < len_q
    k_base, v_base,           # K / V pointers at (batch, head, sequence start), 64-bit offsets
    mask_base,                # mask pointer at (batch, head, start_m, 0)
    rng_rows,                 # [BM] int64 dropout offset of (row, key 0)
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    len_k,                    # keys in this sequence
    sm_scale_log2,            # scale * log2(e)
    alibi_log2,               # ALiBi slope * log2(e) of this (batch, head) (used when HAS_ALIBI)
    window_left, window_right,  # sliding window (used when HAS_WINDOW)
    dropout_p, seed,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BOUNDARY: tl.constexpr,   # this block may hold keys >= len_k, above the causal diagonal or
                              # outside the window
    DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = start_n + offs_n                                   # [BN] key indices
    col_ok = cols < len_k
    # Offsets that move with the loop are 32-bit and relative to 64-bit bases: a 64-bit
    # loop-carried offset makes ptxas serialise the wgmma pipeline on sm90.
    # K^T tile [BD, BN], read through the strides (no transposed copy).
    kT_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd
    kT = tl.load(kT_ptrs, mask=col_ok[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)
    v_ptrs = v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    v = tl.load(v_ptrs, mask=col_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)

    s = tl.dot(q, kT, input_precision=DOT_PRECISION) * sm_scale_log2   # [BM, BD] @ [BD, BN] -> [BM, BN]
    if MASK_KIND != 0:
        m_ptrs = mask_base + offs_m[:, None] * stride_mm + cols[None, :] * stride_mn
        m_ok = row_ok[:, None] & col_ok[None, :]
        if MASK_KIND == 1:
            keep = tl.load(m_ptrs, mask=m_ok, other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        else:
            bias = tl.load(m_ptrs, mask=m_ok, other=0.0).to(tl.float32)
            s = s + bias_log2(bias)
    if HAS_ALIBI:  # - slope * |i - j|, computed here: no bias tensor is read
        s = s - alibi_log2 * tl.abs(rows[:, None] - cols[None, :]).to(tl.float32)
    if BOUNDARY:
        s = tl.where(col_ok[None, :], s, float("-inf"))
        if IS_CAUSAL:
            s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
        if HAS_WINDOW:
            s = tl.where(_window_keep(rows, cols, window_left, window_right), s, float("-inf"))

    # Online softmax. A row that has seen no key yet keeps m = -inf; m_use = 0 there so that
    # exp2(-inf - m_use) = 0 and no inf - inf (NaN) appears.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)                              # [BM] rescales the old state
    p = tl.exp2(s - m_use[:, None])                           # [BM, BN]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        rnd = tl.rand(seed, rng_rows[:, None] + cols[None, :])
        p = tl.where(rnd >= dropout_p, p, 0.0)                # 1/(1-p) is applied once at the end
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # [BM, BN] @ [BN, BDV] -> [BM, BDV]
    return acc, l_i, m_new


@triton.jit
def _key_range(start_m, len_k, window_left, window_right, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(lo, hi, full_hi): the key blocks a query block [start_m, start_m + BLOCK_M) visits.
    [lo, full_hi) need neither the key-bound nor the causal check; [full_hi, hi) do. With a
    sliding window only the blocks it reaches are visited, each of them checked."""
    if IS_CAUSAL:
        hi = tl.minimum(len_k, start_m + BLOCK_M)
        full_hi = tl.minimum((start_m + 1) // BLOCK_N * BLOCK_N, len_k // BLOCK_N * BLOCK_N)
    else:
        hi = len_k
        full_hi = len_k // BLOCK_N * BLOCK_N
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(start_m - window_left, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(hi, start_m + BLOCK_M + window_right)
        full_hi = lo
    return lo, hi, full_hi


@triton.jit
def _program_tile(num_tiles, num_heads, REVERSE: tl.constexpr):
    """(tile, head, batch) of this program. The grid is flat with the tiles of one (batch, head)
    adjacent, so batch * heads may exceed CUDA's 65535 limit on grid dims y / z; REVERSE starts
    the last tile first (causal forward: the longest rows of a (batch, head) start first)."""
    pid = tl.program_id(0)
    tile = pid % num_tiles
    if REVERSE:
        tile = num_tiles - 1 - tile
    pid_bh = pid // num_tiles
    return tile, pid_bh % num_heads, pid_bh // num_heads


@triton.jit
def _sequence_bounds(CuSeqlensQ, CuSeqlensK, pid_b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr,
                     KEY_LIMIT: tl.constexpr = 0):
    """(q_start, len_q, k_start, len_k) of batch entry / sequence ``pid_b``: varlen reads the
    cumulative lengths (starts are int64 token offsets); dense is (0, Lq, 0, Lk), or with
    KEY_LIMIT > 0 (0, Lq, 0, CuSeqlensK[b]): one past the last key that the bool mask lets through
    for some query of the entry (:func:`key_limits`), rounded up to a multiple of KEY_LIMIT, so
    the padded keys are never visited."""
    if IS_VARLEN:
        q_start = tl.load(CuSeqlensQ + pid_b).to(tl.int64)
        len_q = (tl.load(CuSeqlensQ + pid_b + 1) - q_start).to(tl.int32)
        k_start = tl.load(CuSeqlensK + pid_b).to(tl.int64)
        len_k = (tl.load(CuSeqlensK + pid_b + 1) - k_start).to(tl.int32)
        # max_seqlen sizes the masks, the mask-gradient scratch and the dropout offsets; an
        # understated one (unchecked under torch.compile / graph capture) must not take a
        # sequence's reads and writes past them: its rows are then wrong, but in bounds
        len_q = tl.minimum(len_q, seqlen_q)
        len_k = tl.minimum(len_k, seqlen_k)
    else:
        q_start = 0
        len_q = seqlen_q
        k_start = 0
        len_k = seqlen_k
        if KEY_LIMIT > 0:
            len_k = tl.load(CuSeqlensK + pid_b)
            if KEY_LIMIT > 1:  # as Lk's own alignment: the K / V loads stay vectorised
                len_k = tl.multiple_of(len_k, KEY_LIMIT)
    return q_start, len_q, k_start, len_k


@triton.jit
def _attention_fwd_kernel(
    Q, K, V,                  # q [.., Lq, D], k [.., Lk, D], v [.., Lk, DV] (dense (B, H, L, D); varlen (total, H, D))
    Mask,                     # bool (as uint8) or float mask, read as (B, H, Lq, Lk) through its strides
    Alibi,                    # fp32 ALiBi slopes read as (B, H) through stride_ab / stride_ah
    Out,                      # [.., Lq, DV] output, input dtype
    Stats,                    # fp32 [2, .., Lq]: row max m of the base-2 scores, and log2 of the row sum l
    CuSeqlensQ, CuSeqlensK,   # varlen: [N + 1] cumulative lengths; dense: unused
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_lb, stride_lh, stride_lm, stride_ls,   # Stats: (batch, head, row) and m -> log2(l)
    stride_ab, stride_ah,
    num_heads,                # query heads H
    kv_group,                 # query heads per key / value head (GQA; 1: as many K/V heads as H)
    window_left, window_right,  # query i sees keys i - left .. i + right (when HAS_WINDOW)
    num_m_blocks,             # query blocks per (batch, head): cdiv(Lq or max_seqlen_q, BLOCK_M)
    seqlen_q, seqlen_k,       # dense: Lq, Lk; varlen: max_seqlen_q, max_seqlen_k (dropout offsets)
    sm_scale_log2,            # scale * log2(e)
    dropout_p,                # drop probability (used when HAS_DROPOUT)
    dropout_scale,            # 1 / (1 - p), computed on the host (used when HAS_DROPOUT)
    Seed,                     # int64 [1] dropout seed (device memory), loaded iff HAS_DROPOUT
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KEY_LIMIT: tl.constexpr = 0,  # > 0 (dense): CuSeqlensK holds key limits, multiples of it
):
    block_m, pid_h, pid_b = _program_tile(num_m_blocks, num_heads, IS_CAUSAL)
    q_start, len_q, k_start, len_k = _sequence_bounds(CuSeqlensQ, CuSeqlensK, pid_b, seqlen_q,
                                                      seqlen_k, IS_VARLEN, KEY_LIMIT)
    start_m = block_m * BLOCK_M
    if start_m >= len_q:
        return

    b64 = pid_b.to(tl.int64)
    h64 = pid_h.to(tl.int64)
    row0 = q_start + tl.cast(start_m, tl.int64)              # first row of the block in the tensor
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = start_m + offs_m                                   # [BM] query indices in the sequence
    row_ok = rows < len_q

    q_ptrs = (Q + b64 * stride_qb + h64 * stride_qh + row0 * stride_qm
              + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)  # [BM, BD]
    hk64 = (pid_h // kv_group).to(tl.int64)                   # the key / value head
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn
    mask_base = Mask + b64 * stride_mb + h64 * stride_mh + tl.cast(start_m, tl.int64) * stride_mm
    rng_rows = ((b64 * num_heads + h64) * seqlen_q + rows.to(tl.int64)) * seqlen_k  # [BM] int64
    alibi = _alibi_slope_log2(Alibi, b64, h64, stride_ab, stride_ah, HAS_ALIBI)

    seed = load_seed(Seed, HAS_DROPOUT)  # read on the device: no host sync
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    lo, hi, full_hi = _key_range(start_m, len_k, window_left, window_right, BLOCK_M, BLOCK_N,
                                 IS_CAUSAL, HAS_WINDOW)
    for start_n in range(lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _attention_fwd_block(
            acc, l_i, m_i, q, start_n, offs_m, rows, row_ok, k_base, v_base, mask_base, rng_rows,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, len_k,
            sm_scale_log2, alibi, window_left, window_right, dropout_p, seed, HEAD_DIM, HEAD_DIM_V,
            BLOCK_N, BLOCK_D, BLOCK_DV, MASK_KIND, IS_CAUSAL, HAS_DROPOUT, HAS_ALIBI, HAS_WINDOW,
            False, DOT_PRECISION)
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _attention_fwd_block(
            acc, l_i, m_i, q, start_n, offs_m, rows, row_ok, k_base, v_base, mask_base, rng_rows,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, len_k,
            sm_scale_log2, alibi, window_left, window_right, dropout_p, seed, HEAD_DIM, HEAD_DIM_V,
            BLOCK_N, BLOCK_D, BLOCK_DV, MASK_KIND, IS_CAUSAL, HAS_DROPOUT, HAS_ALIBI, HAS_WINDOW,
            True, DOT_PRECISION)

    alive = l_i > 0.0                                         # rows with at least one key
    inv_l = tl.where(alive, 1.0 / tl.where(alive, l_i, 1.0), 0.0)
    if HAS_DROPOUT:
        inv_l = inv_l * dropout_scale
    out = acc * inv_l[:, None]
    o_ptrs = (Out + b64 * stride_ob + h64 * stride_oh + row0 * stride_om
              + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :])
    # m and log2(l) are kept apart (not as one logsumexp m + log2(l)): with a huge finite bias
    # (e.g. -1e9 on every key of a row) m + log2(l) rounds log2(l) away and the backward pass
    # would rebuild P off by a factor of l. A row with no key stores m = 0, log2(l) = +inf: P = 0.
    st_ptrs = Stats + b64 * stride_lb + h64 * stride_lh + row0 * stride_lm + offs_m * stride_lm
    tl.store(st_ptrs, tl.where(alive, m_i, 0.0), mask=row_ok)
    tl.store(st_ptrs + stride_ls, tl.where(alive, tl.log2(tl.where(alive, l_i, 1.0)), float("inf")),
             mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_bwd_preprocess_kernel(
    Out, DO,                  # [.., Lq, DV] output and its gradient
    Delta,                    # fp32 rowsum(dO * O), same layout as one plane of Stats
    CuSeqlensQ,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    num_heads, num_m_blocks, seqlen_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    block_m, pid_h, pid_b = _program_tile(num_m_blocks, num_heads, False)
    q_start, len_q, _, _ = _sequence_bounds(CuSeqlensQ, CuSeqlensQ, pid_b, seqlen_q, seqlen_q,
                                            IS_VARLEN)
    start_m = block_m * BLOCK_M
    if start_m >= len_q:
        return
    b64 = pid_b.to(tl.int64)
    h64 = pid_h.to(tl.int64)
    row0 = q_start + tl.cast(start_m, tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = start_m + offs_m < len_q
    ld_mask = row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    o = tl.load(Out + b64 * stride_ob + h64 * stride_oh + row0 * stride_om
                + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od, mask=ld_mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + row0 * stride_dom
                 + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod, mask=ld_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BM]
    tl.store(Delta + b64 * stride_lb + h64 * stride_lh + row0 * stride_lm + offs_m * stride_lm,
             delta, mask=row_ok)


@triton.jit
def _attention_bwd_dkdv_block(
    dk, dv,                   # [BN, BD], [BN, BDV] f32 accumulators
    k, v,                     # [BN, BD], [BN, BDV] key / value tiles of this program
    start_m,                  # first query row of this block
    cols,                     # [BN] key indices of this program
    q_base, do_base, stats_base, delta_base,   # pointers at (batch, head, sequence start)
    mask_base,                # mask pointer at (batch, head, 0, start_n)
    rng_cols,                 # [BN] int64: (b*H + h) * Lq * Lk + col (dropout offset of row 0)
    stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_ls, stride_mm, stride_mn,
    len_q, len_k, seqlen_k,   # lengths of this sequence; seqlen_k: Lk of the dropout offsets
    sm_scale_log2, alibi_log2, window_left, window_right, dropout_p, dropout_scale, seed,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WINDOW: tl.constexpr,     # every block is checked against the window
    CAUSAL_BLOCK: tl.constexpr,   # this query block crosses the causal diagonal
    DOT_PRECISION: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = start_m + offs_m                                   # [BM]
    row_ok = rows < len_q
    # Rows >= len_q load q = dO = 0, log2(l) = +inf, delta = 0: their P and dS are exactly 0. Keys
    # >= len_k only touch rows of dK/dV that are never stored, but their score (0: k loads as 0)
    # can lie far above a row's real scores (large negative logits, a huge negative bias, ALiBi),
    # so that P = exp2(s - m) would overflow the fp16 / bf16 casts below: they get -inf.
    qT = tl.load(q_base + rows[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                 mask=row_ok[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)      # [BD, BM]
    do = tl.load(do_base + rows[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)   # [BM, BDV]
    m2 = tl.load(stats_base + rows * stride_lm, mask=row_ok, other=0.0)                # [BM] row max
    log2_l = tl.load(stats_base + stride_ls + rows * stride_lm, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_base + rows * stride_lm, mask=row_ok, other=0.0)

    sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * sm_scale_log2   # [BN, BD] @ [BD, BM] -> [BN, BM]
    sT = tl.where((cols < len_k)[:, None], sT, float("-inf"))
    if MASK_KIND != 0:
        m_ptrs = mask_base + rows[None, :] * stride_mm + offs_n[:, None] * stride_mn
        m_ok = row_ok[None, :] & (cols < len_k)[:, None]
        if MASK_KIND == 1:
            keepT = tl.load(m_ptrs, mask=m_ok, other=0)
            sT = tl.where(keepT != 0, sT, float("-inf"))
        else:
            sT = sT + bias_log2(tl.load(m_ptrs, mask=m_ok, other=0.0).to(tl.float32))
    if HAS_ALIBI:
        sT = sT - alibi_log2 * tl.abs(cols[:, None] - rows[None, :]).to(tl.float32)
    if CAUSAL_BLOCK:
        sT = tl.where(cols[:, None] <= rows[None, :], sT, float("-inf"))
    if HAS_WINDOW:
        in_window = ((cols[:, None] >= rows[None, :] - window_left)
                     & (cols[:, None] <= rows[None, :] + window_right))             # [BN, BM]
        sT = tl.where(in_window, sT, float("-inf"))
    pT = tl.exp2((sT - m2[None, :]) - log2_l[None, :])        # [BN, BM] softmax probabilities
    if HAS_DROPOUT:
        # Dropout offset ((b*H + h) * Lq + i) * Lk + j, with i along axis 1 here.
        rnd = tl.rand(seed, rng_cols[:, None] + rows.to(tl.int64)[None, :] * seqlen_k)
        keepT_d = rnd >= dropout_p
        pT_used = tl.where(keepT_d, pT * dropout_scale, 0.0)
    else:
        pT_used = pT
    dv = tl.dot(pT_used.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # [BN, BM] @ [BM, BDV] -> [BN, BDV]
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)          # [BN, BDV] @ [BDV, BM] -> [BN, BM]
    if HAS_DROPOUT:
        dpT = tl.where(keepT_d, dpT * dropout_scale, 0.0)
    dsT = pT * (dpT - delta[None, :])                         # [BN, BM] dL/dS (S unscaled by log2e)
    dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)  # [BN, BM] @ [BM, BD] -> [BN, BD]
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, Mask, DO,        # as in the forward; DO has the layout of Out
    Alibi,                    # as in the forward
    Stats, Delta,             # fp32 softmax statistics of the forward pass, rowsum(dO * O)
    DK, DV,                   # outputs, layouts of K / V (strides given)
    CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh, stride_lm, stride_ls,
    stride_ab, stride_ah,
    num_heads,                # query heads H
    kv_group,                 # query heads per key / value head: each program loops over them
    window_left, window_right,  # sliding window (when HAS_WINDOW), as in the forward
    num_n_blocks,             # key blocks per (batch, K/V head): cdiv(Lk or max_seqlen_k, BLOCK_N)
    seqlen_q, seqlen_k,
    sm_scale, sm_scale_log2,
    dropout_p,                # drop probability (used when HAS_DROPOUT)
    dropout_scale,            # 1 / (1 - p), computed on the host (used when HAS_DROPOUT)
    Seed,                     # int64 [1] dropout seed (device memory), loaded iff HAS_DROPOUT
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KEY_LIMIT: tl.constexpr = 0,  # > 0 (dense): CuSeqlensK holds key limits, multiples of it
):
    block_n, pid_hk, pid_b = _program_tile(num_n_blocks, num_heads // kv_group, False)
    q_start, len_q, k_start, len_k = _sequence_bounds(CuSeqlensQ, CuSeqlensK, pid_b, seqlen_q,
                                                      seqlen_k, IS_VARLEN, KEY_LIMIT)
    start_n = block_n * BLOCK_N
    # Keys in [len_k, Lk) past a key limit exist in the tensor: they are masked for every query,
    # their dK / dV rows are 0 and are stored (k = v = 0 and P = 0 there make the sums exactly 0).
    store_len = seqlen_k if KEY_LIMIT > 0 else len_k
    if start_n >= store_len:
        return

    b64 = pid_b.to(tl.int64)
    hk64 = pid_hk.to(tl.int64)                                # the key / value head
    col0 = k_start + tl.cast(start_n, tl.int64)               # first key of the block in the tensor
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = start_n + offs_n                                   # [BN] key indices in the sequence
    col_ok = cols < len_k
    k = tl.load(K + b64 * stride_kb + hk64 * stride_kh + col0 * stride_kn
                + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)       # [BN, BD]
    v = tl.load(V + b64 * stride_vb + hk64 * stride_vh + col0 * stride_vn
                + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=col_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)    # [BN, BDV]

    seed = load_seed(Seed, HAS_DROPOUT)  # read on the device: no host sync
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # Causal: rows below start_n see none of these keys; query blocks that start before the last
    # key of this block cross the diagonal ([lo, mid), masked), the rest see every key ([mid, Lq)).
    if IS_CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
        mid = tl.minimum((start_n + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M * BLOCK_M, len_q)
    else:
        lo = 0
        mid = 0
    hi = len_q
    if HAS_WINDOW:  # rows i - left <= j <= i + right of some key j of this block: i in [lo, hi)
        hi = tl.minimum(len_q, start_n + BLOCK_N + window_left)
        lo = tl.maximum(lo, tl.maximum(start_n - window_right, 0) // BLOCK_M * BLOCK_M)
        if IS_CAUSAL:
            mid = tl.minimum(tl.maximum(mid, lo), hi)
        else:
            mid = lo
    if KEY_LIMIT > 0:
        if start_n >= len_k:  # every key of the block is masked: nothing to sum, zeros stored
            mid = lo
            hi = lo
    # dK / dV sum over the query heads that share this key / value head (one unless GQA), in
    # registers: deterministic, and no (B, H, Lk, D) scratch.
    for g in range(kv_group):
        h64 = hk64 * kv_group + g                             # the query head
        q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm
        do_base = DO + b64 * stride_dob + h64 * stride_doh + q_start * stride_dom
        stats_base = Stats + b64 * stride_lb + h64 * stride_lh + q_start * stride_lm
        delta_base = Delta + b64 * stride_lb + h64 * stride_lh + q_start * stride_lm
        mask_base = Mask + b64 * stride_mb + h64 * stride_mh + tl.cast(start_n, tl.int64) * stride_mn
        rng_cols = (b64 * num_heads + h64) * seqlen_q * seqlen_k + cols.to(tl.int64)   # [BN]
        alibi = _alibi_slope_log2(Alibi, b64, h64, stride_ab, stride_ah, HAS_ALIBI)
        for start_m in range(lo, mid, BLOCK_M):
            dk, dv = _attention_bwd_dkdv_block(
                dk, dv, k, v, start_m, cols, q_base, do_base, stats_base, delta_base, mask_base,
                rng_cols, stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_ls,
                stride_mm, stride_mn, len_q, len_k, seqlen_k, sm_scale_log2, alibi, window_left,
                window_right, dropout_p, dropout_scale, seed, HEAD_DIM, HEAD_DIM_V, BLOCK_M,
                BLOCK_N, BLOCK_D, BLOCK_DV, MASK_KIND, HAS_DROPOUT, HAS_ALIBI, HAS_WINDOW, True,
                DOT_PRECISION)
        for start_m in range(mid, hi, BLOCK_M):
            dk, dv = _attention_bwd_dkdv_block(
                dk, dv, k, v, start_m, cols, q_base, do_base, stats_base, delta_base, mask_base,
                rng_cols, stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_ls,
                stride_mm, stride_mn, len_q, len_k, seqlen_k, sm_scale_log2, alibi, window_left,
                window_right, dropout_p, dropout_scale, seed, HEAD_DIM, HEAD_DIM_V, BLOCK_M,
                BLOCK_N, BLOCK_D, BLOCK_DV, MASK_KIND, HAS_DROPOUT, HAS_ALIBI, HAS_WINDOW, False,
                DOT_PRECISION)

    dk = dk * sm_scale
    col_store = cols < store_len
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + col0 * stride_dkn
             + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=col_store[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + col0 * stride_dvn
             + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=col_store[:, None] & (offs_dv < HEAD_DIM_V)[None, :])


@triton.jit
def _attention_bwd_dq_block(
    dq,                       # [BM, BD] f32 accumulator
    q, do, m2, log2_l, delta,  # [BM, BD], [BM, BDV], [BM] row max and log2(row sum), [BM]
    start_n, offs_m, rows, row_ok,
    k_base, v_base, mask_base, ds_base,   # ds_base: dS pointer at (batch, head, start_m, 0)
    rng_rows,                 # [BM] int64 dropout offset of (row, key 0)
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_dsm, stride_dsn,
    len_k,
    sm_scale_log2, alibi_log2, window_left, window_right, dropout_p, dropout_scale, seed,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, STORE_DS: tl.constexpr,
    BOUNDARY: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = start_n + offs_n
    col_ok = cols < len_k
    kT = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                 mask=col_ok[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)      # [BD, BN]
    vT = tl.load(v_base + cols[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                 mask=col_ok[None, :] & (offs_dv < HEAD_DIM_V)[:, None], other=0.0)   # [BDV, BN]

    s = tl.dot(q, kT, input_precision=DOT_PRECISION) * sm_scale_log2   # [BM, BD] @ [BD, BN] -> [BM, BN]
    if MASK_KIND != 0:
        m_ptrs = mask_base + offs_m[:, None] * stride_mm + cols[None, :] * stride_mn
        m_ok = row_ok[:, None] & col_ok[None, :]
        if MASK_KIND == 1:
            keep = tl.load(m_ptrs, mask=m_ok, other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        else:
            s = s + bias_log2(tl.load(m_ptrs, mask=m_ok, other=0.0).to(tl.float32))
    if HAS_ALIBI:
        s = s - alibi_log2 * tl.abs(rows[:, None] - cols[None, :]).to(tl.float32)
    if BOUNDARY:
        s = tl.where(col_ok[None, :], s, float("-inf"))
        if IS_CAUSAL:
            s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
        if HAS_WINDOW:
            s = tl.where(_window_keep(rows, cols, window_left, window_right), s, float("-inf"))
    p = tl.exp2((s - m2[:, None]) - log2_l[:, None])          # [BM, BN]
    dp = tl.dot(do, vT, input_precision=DOT_PRECISION)        # [BM, BDV] @ [BDV, BN] -> [BM, BN]
    if HAS_DROPOUT:
        rnd = tl.rand(seed, rng_rows[:, None] + cols[None, :])
        dp = tl.where(rnd >= dropout_p, dp * dropout_scale, 0.0)
    ds = p * (dp - delta[:, None])                            # [BM, BN] dL/d(score)
    if STORE_DS:
        ds_ptrs = ds_base + offs_m[:, None] * stride_dsm + cols[None, :] * stride_dsn
        tl.store(ds_ptrs, ds, mask=row_ok[:, None] & col_ok[None, :])
    dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)  # [BM, BN] @ [BN, BD] -> [BM, BD]
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, Mask, DO, Stats, Delta,
    Alibi,                    # as in the forward
    DQ,                       # output, layout of Q (strides given)
    DS,                       # fp32 (B, H, Lq, Lk) dS when STORE_DS (mask gradient), else unused
    CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dsb, stride_dsh, stride_dsm, stride_dsn,
    stride_lb, stride_lh, stride_lm, stride_ls,
    stride_ab, stride_ah,
    num_heads, kv_group, window_left, window_right, num_m_blocks, seqlen_q, seqlen_k,
    sm_scale, sm_scale_log2,
    dropout_p,                # drop probability (used when HAS_DROPOUT)
    dropout_scale,            # 1 / (1 - p), computed on the host (used when HAS_DROPOUT)
    Seed,                     # int64 [1] dropout seed (device memory), loaded iff HAS_DROPOUT
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr,
    STORE_DS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KEY_LIMIT: tl.constexpr = 0,  # > 0 (dense): CuSeqlensK holds key limits, multiples of it
):
    block_m, pid_h, pid_b = _program_tile(num_m_blocks, num_heads, IS_CAUSAL)
    q_start, len_q, k_start, len_k = _sequence_bounds(CuSeqlensQ, CuSeqlensK, pid_b, seqlen_q,
                                                      seqlen_k, IS_VARLEN, KEY_LIMIT)
    start_m = block_m * BLOCK_M
    if start_m >= len_q:
        return

    b64 = pid_b.to(tl.int64)
    h64 = pid_h.to(tl.int64)
    start_m64 = tl.cast(start_m, tl.int64)
    row0 = q_start + start_m64
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = start_m + offs_m
    row_ok = rows < len_q
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + row0 * stride_qm
                + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)       # [BM, BD]
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + row0 * stride_dom
                 + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)   # [BM, BDV]
    l_off = b64 * stride_lb + h64 * stride_lh + row0 * stride_lm + offs_m * stride_lm
    m2 = tl.load(Stats + l_off, mask=row_ok, other=0.0)
    log2_l = tl.load(Stats + stride_ls + l_off, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + l_off, mask=row_ok, other=0.0)
    hk64 = (pid_h // kv_group).to(tl.int64)                   # the key / value head
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn
    mask_base = Mask + b64 * stride_mb + h64 * stride_mh + start_m64 * stride_mm
    ds_base = DS + b64 * stride_dsb + h64 * stride_dsh + start_m64 * stride_dsm
    rng_rows = ((b64 * num_heads + h64) * seqlen_q + rows.to(tl.int64)) * seqlen_k
    alibi = _alibi_slope_log2(Alibi, b64, h64, stride_ab, stride_ah, HAS_ALIBI)

    seed = load_seed(Seed, HAS_DROPOUT)  # read on the device: no host sync
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi, full_hi = _key_range(start_m, len_k, window_left, window_right, BLOCK_M, BLOCK_N,
                                 IS_CAUSAL, HAS_WINDOW)
    for start_n in range(lo, full_hi, BLOCK_N):
        dq = _attention_bwd_dq_block(
            dq, q, do, m2, log2_l, delta, start_n, offs_m, rows, row_ok, k_base, v_base, mask_base,
            ds_base, rng_rows, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            stride_dsm, stride_dsn, len_k, sm_scale_log2, alibi, window_left, window_right,
            dropout_p, dropout_scale, seed, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
            MASK_KIND, IS_CAUSAL, HAS_DROPOUT, HAS_ALIBI, HAS_WINDOW, STORE_DS, False,
            DOT_PRECISION)
    for start_n in range(full_hi, hi, BLOCK_N):
        dq = _attention_bwd_dq_block(
            dq, q, do, m2, log2_l, delta, start_n, offs_m, rows, row_ok, k_base, v_base, mask_base,
            ds_base, rng_rows, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            stride_dsm, stride_dsn, len_k, sm_scale_log2, alibi, window_left, window_right,
            dropout_p, dropout_scale, seed, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
            MASK_KIND, IS_CAUSAL, HAS_DROPOUT, HAS_ALIBI, HAS_WINDOW, STORE_DS, True,
            DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + row0 * stride_dqm
             + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _attention_bwd_dmask_kernel(
    Q, K, V, Mask, DO, Stats, Delta,
    Alibi,                    # as in the forward
    DMask,                    # fp32 (MB, MH, Lq, Lk) zeros: receives the mask gradient
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm, stride_ls,
    stride_ab, stride_ah,
    num_heads, kv_group, window_left, window_right, seqlen_q, seqlen_k,
    mask_heads,               # MH: 1 (mask broadcast over heads) or num_heads
    loop_b, loop_h,           # batch / head entries summed into one mask slice: B or 1, H or 1
    sm_scale_log2, dropout_p, dropout_scale, Seed,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The gradient of a float mask broadcast over batch and/or heads, summed over the broadcast
    dims inside the kernel (deterministic: one program owns one [BM, BN] tile of one mask slice
    and loops over the (batch, head) entries that share it). dS = P * (dP - delta) is recomputed
    from the saved statistics, as in the dq kernel; the scratch is (MB, MH, Lq, Lk) instead of
    (B, H, Lq, Lk)."""
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    num_n = tl.cdiv(seqlen_k, BLOCK_N)
    pid = tl.program_id(0)
    tile_n = pid % num_n
    tile_m = (pid // num_n) % num_m
    slice_id = pid // (num_n * num_m)              # mb * MH + mh
    start_m = tile_m * BLOCK_M
    start_n = tile_n * BLOCK_N
    if IS_CAUSAL:
        if start_n > start_m + BLOCK_M - 1:        # above the diagonal: dS is 0 (zeros given)
            return
    if HAS_WINDOW:                                 # a tile outside the window: dS is 0
        if start_n > start_m + BLOCK_M - 1 + window_right:
            return
        if start_n + BLOCK_N - 1 < start_m - window_left:
            return
    mb = slice_id // mask_heads
    mh = slice_id % mask_heads
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < seqlen_q
    col_ok = cols < seqlen_k
    tile_ok = row_ok[:, None] & col_ok[None, :]
    seed = load_seed(Seed, HAS_DROPOUT)  # read on the device: no host sync
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, loop_b * loop_h):
        b64 = (mb + i // loop_h).to(tl.int64)
        h64 = (mh + i % loop_h).to(tl.int64)
        q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + rows[:, None].to(tl.int64) * stride_qm
                    + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)   # [BM, BD]
        do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + rows[:, None].to(tl.int64) * stride_dom
                     + offs_dv[None, :] * stride_dod,
                     mask=row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)  # [BM, BDV]
        hk64 = h64 // kv_group                                  # the key / value head
        kT = tl.load(K + b64 * stride_kb + hk64 * stride_kh + cols[None, :].to(tl.int64) * stride_kn
                     + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)  # [BD, BN]
        vT = tl.load(V + b64 * stride_vb + hk64 * stride_vh + cols[None, :].to(tl.int64) * stride_vn
                     + offs_dv[:, None] * stride_vd,
                     mask=col_ok[None, :] & (offs_dv < HEAD_DIM_V)[:, None], other=0.0)  # [BDV, BN]
        l_off = b64 * stride_lb + h64 * stride_lh + rows.to(tl.int64) * stride_lm
        m2 = tl.load(Stats + l_off, mask=row_ok, other=0.0)
        log2_l = tl.load(Stats + stride_ls + l_off, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + l_off, mask=row_ok, other=0.0)
        bias = tl.load(Mask + b64 * stride_mb + h64 * stride_mh + rows[:, None].to(tl.int64) * stride_mm
                       + cols[None, :] * stride_mn, mask=tile_ok, other=0.0).to(tl.float32)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * sm_scale_log2 + bias_log2(bias)
        if HAS_ALIBI:
            alibi = _alibi_slope_log2(Alibi, b64, h64, stride_ab, stride_ah, HAS_ALIBI)
            s = s - alibi * tl.abs(rows[:, None] - cols[None, :]).to(tl.float32)
        s = tl.where(tile_ok, s, float("-inf"))                        # [BM, BD] @ [BD, BN]
        if IS_CAUSAL:
            s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
        if HAS_WINDOW:
            s = tl.where(_window_keep(rows, cols, window_left, window_right), s, float("-inf"))
        p = tl.exp2((s - m2[:, None]) - log2_l[:, None])               # [BM, BN]
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)             # [BM, BDV] @ [BDV, BN]
        if HAS_DROPOUT:
            rng = ((b64 * num_heads + h64) * seqlen_q + rows.to(tl.int64)) * seqlen_k
            rnd = tl.rand(seed, rng[:, None] + cols[None, :])
            dp = tl.where(rnd >= dropout_p, dp * dropout_scale, 0.0)
        acc += p * (dp - delta[:, None])
    out = (DMask + slice_id.to(tl.int64) * seqlen_q * seqlen_k
           + rows[:, None].to(tl.int64) * seqlen_k + cols[None, :])
    tl.store(out, acc, mask=tile_ok)


# ----------------------------------------------------------------------------------------------
# Dropout mask (tests and references only)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_dropout_mask_kernel(
    Keep,                     # [numel] uint8 output, 1 = kept
    numel, dropout_p,
    Seed,                     # int64 [1] dropout seed in device memory
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)   # = the attention offsets
    rnd = tl.rand(tl.load(Seed), offs)
    tl.store(Keep + offs, (rnd >= dropout_p).to(tl.uint8), mask=offs < numel)


# ----------------------------------------------------------------------------------------------
# Block sizes
# ----------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass and padded head dim (BLOCK_D).
#
# Not yet timed in this repo (no GPU in the session that wrote them; bench/ times them and each
# entry should then carry its measurement). What they do rest on: every entry was compiled offline
# for its architecture (triton.compile for GPUTarget("cuda", 90 | 80), then `ptxas -v`) and is
# the largest tile tried that keeps the kernel free of register spills, with Triton's pipeliner
# active (shared memory = stages x tiles) and, on sm90, without ptxas serialising the wgmma
# pipeline (warning C7515). Rationale for the shapes:
# * fwd: a 128-row query tile amortises each K/V load over many rows (FlashAttention-2 and the
#   Triton tutorial use 128 x 64); D = 128 needs 8 warps to hold the [128, 128] fp32 accumulator
#   without spilling; D = 256 halves BLOCK_M for the same reason.
# * bwd dK/dV: the program keeps K, V and two [BLOCK_N, D] fp32 accumulators for its whole life
#   and streams small query blocks (BLOCK_M = 32) past them; 8 warps (4 spill 48 B at D = 64 on
#   sm90); BLOCK_N = 32 at D = 256 (64 spills 120 B).
# * bwd dQ: the transpose (query tile resident, small key blocks streamed).
# * masks and dropout (_cached_config adjusts the table): a mask tile and Philox (four 32-bit
#   words per score) need registers. Measured spills that the adjustments remove: fwd with a bool
#   mask at 4 warps (sm90 D = 40: 192 B, sm80 D = 64: 840 B) -> 8 warps; fwd with dropout at
#   BLOCK_N = 64 (sm90 D = 128: 208 B) -> BLOCK_N = 32; sm80 fwd with a mask at D = 128 and
#   BLOCK_N = 64 (672 B) -> 32; dQ with float mask + dropout at 4 warps (sm90 D = 64: 276 B)
#   -> 8 warps; dK/dV with dropout at D = 128, BLOCK_N = 128 (sm90: 264 B varlen causal, 396 B
#   with a float mask) -> 64. Left as they are (no better size found without timing): sm80 dK/dV
#   with a mask or dropout at D <= 64 spills 120-470 B; sm90 dK/dV with float mask + dropout at
#   D = 128, BLOCK_N = 64, makes ptxas serialise the wgmma pipeline (C7515).
# * fp32 inputs: the products run on FMA units ("ieee"), with fp32 tiles twice as large in
#   registers; on sm90 the forward spills with 2 stages at D >= 128 (248-7000 B) and not with 1.
# * Other GPUs: _fit_shared_memory lowers stages, then the streamed block, then the resident one
#   until the estimated footprint fits the device's shared memory (sm86/sm89: 100 KB).
_CFG = Dict[int, Tuple[int, int, int, int]]
_CONFIGS_SM90: Dict[str, _CFG] = {
    "fwd": {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3),
            128: (128, 64, 8, 3), 256: (64, 64, 8, 2)},
    "bwd_dkdv": {16: (32, 128, 8, 3), 32: (32, 128, 8, 3), 64: (32, 128, 8, 3),
                 128: (32, 128, 8, 3), 256: (32, 32, 8, 2)},
    "bwd_dq": {16: (128, 32, 4, 3), 32: (128, 32, 4, 3), 64: (128, 32, 4, 3),
               128: (128, 32, 8, 3), 256: (64, 32, 8, 2)},
}
_CONFIGS_SM80: Dict[str, _CFG] = {  # A100: 164 KB of shared memory, mma.sync
    "fwd": {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3),
            128: (128, 64, 8, 2), 256: (64, 32, 8, 2)},
    "bwd_dkdv": {16: (32, 128, 8, 2), 32: (32, 128, 8, 2), 64: (32, 128, 8, 2),
                 128: (32, 64, 8, 2), 256: (32, 32, 8, 2)},
    "bwd_dq": {16: (128, 32, 8, 2), 32: (128, 32, 8, 2), 64: (128, 32, 8, 2),
               128: (64, 32, 8, 2), 256: (64, 32, 8, 2)},
}
_CONFIGS_FP32: Dict[str, _CFG] = {  # any architecture
    "fwd": {16: (64, 32, 8, 2), 32: (64, 32, 8, 2), 64: (64, 32, 8, 2),
            128: (32, 16, 8, 1), 256: (32, 16, 8, 1)},
    "bwd_dkdv": {16: (16, 64, 8, 2), 32: (16, 64, 8, 2), 64: (16, 64, 8, 2),
                 128: (16, 32, 8, 2), 256: (16, 32, 8, 2)},
    "bwd_dq": {16: (64, 16, 8, 2), 32: (64, 16, 8, 2), 64: (64, 16, 8, 2),
               128: (64, 16, 8, 2), 256: (32, 16, 8, 2)},
}
# Under TRITON_INTERPRET=1 every block op is a numpy call: small tiles make short test shapes
# (17, 97, 130) span several blocks, and BLOCK_M != BLOCK_N exercises the causal split logic.
# FASTBERT_INTERPRETER_TILES=sm90 / sm80 replaces them with the tables above (see _tiles.py).
_CONFIG_INTERPRETER: Dict[str, Tuple[int, int, int, int]] = {
    "fwd": (32, 16, 1, 1), "bwd_dkdv": (16, 32, 1, 1), "bwd_dq": (32, 16, 1, 1),
}


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> Tuple[int, int]:
    """(compute capability major*10+minor, usable shared memory bytes a block) of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    cc = props.major * 10 + props.minor
    smem = getattr(props, "shared_memory_per_block_optin", 0) or (227 * 1024 if cc >= 90 else 99 * 1024)
    return cc, int(smem)


def _smem_estimate(kind: str, bm: int, bn: int, stages: int, bd: int, bdv: int, elem: int) -> int:
    """Rough shared-memory footprint (bytes) of the pipelined tiles of one program."""
    if kind == "fwd":        # Q resident, K and V streamed
        return elem * (bm * bd + stages * bn * (bd + bdv))
    if kind == "bwd_dkdv":   # K, V resident, Q and dO streamed, plus the P / dS tile
        return elem * (bn * (bd + bdv) + stages * bm * (bd + bdv) + 2 * bm * bn)
    return elem * (bm * (bd + bdv) + stages * bn * (bd + bdv) + 2 * bm * bn)  # bwd_dq


def _fit_shared_memory(kind, cfg, bd, bdv, elem, budget):
    bm, bn, warps, stages = cfg
    while _smem_estimate(kind, bm, bn, stages, bd, bdv, elem) > budget:
        if stages > 1:
            stages -= 1
        elif kind == "bwd_dkdv" and bm > 16:   # shrink the streamed block first
            bm //= 2
        elif bn > 16:
            bn //= 2
        elif bm > 16:
            bm //= 2
        else:
            break
    return bm, bn, warps, stages


@functools.lru_cache(maxsize=None)
def _cached_config(kind: str, device_index: int, bd: int, bdv: int, elem: int, dropout: bool,
                   masked: bool) -> Tuple[int, int, int, int]:
    return _table_config(kind, *_device_limits(device_index), bd, bdv, elem, dropout, masked)


def _table_config(kind: str, cc: int, smem: int, bd: int, bdv: int, elem: int, dropout: bool,
                  masked: bool) -> Tuple[int, int, int, int]:
    """The per-architecture table's (BLOCK_M, BLOCK_N, warps, stages), adjusted for masks and
    dropout and fitted into ``smem`` bytes of shared memory."""
    if elem == 4:
        table = _CONFIGS_FP32
    else:
        table = _CONFIGS_SM90 if cc >= 90 else _CONFIGS_SM80
    d = max(bd, bdv)
    bm, bn, warps, stages = table[kind][d]
    if elem == 2:  # register pressure of masks / dropout (see the table's comment)
        if kind == "fwd":
            if masked or dropout:
                warps = 8
            if dropout or (cc < 90 and masked and d >= 128):
                bn = min(bn, 32)
        elif kind == "bwd_dq" and (masked or dropout):
            warps = 8
        elif kind == "bwd_dkdv" and dropout and d >= 128:
            bn = min(bn, 64)
    budget = int(smem * 0.9)  # room for the layout conversions Triton adds
    return _fit_shared_memory(kind, (bm, bn, warps, stages), bd, bdv, elem, budget)


def attention_config(kind: str, head_dim: int, head_dim_v: int, dtype: torch.dtype,
                     device: torch.device, dropout: bool = False,
                     masked: bool = False) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for pass ``kind`` ("fwd", "bwd_dkdv", "bwd_dq"),
    looked up once per (device, head dims, dtype size, dropout, mask or not)."""
    bd, bdv = _block_dim(head_dim), _block_dim(head_dim_v)
    elem = torch.finfo(dtype).bits // 8
    if device.type != "cuda" or interpreting():
        arch = interpreter_tiles()
        if arch is None:
            return _CONFIG_INTERPRETER[kind]
        return _table_config(kind, *arch, bd, bdv, elem, bool(dropout), bool(masked))
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cached_config(kind, index, bd, bdv, elem, bool(dropout), bool(masked))


# ----------------------------------------------------------------------------------------------
# Opt-in autotuning (FASTBERT_AUTOTUNE=1)
#
# The tables above are heuristics (compiled for sm_80 / sm_90 without a GPU; not yet timed). With
# FASTBERT_AUTOTUNE=1, the first call of each tuning key on a CUDA device times a few candidate
# tiles around the table's choice on the call's own tensors (the kernels overwrite their outputs,
# so re-running them is harmless), keeps the fastest, and remembers it in memory and in a JSON
# file (FASTBERT_AUTOTUNE_CACHE, default ~/.cache/fastbert/attention-configs.json) keyed by GPU,
# Triton version, pass, head dims, dtype size, mask / dropout / causal / varlen and the sequence
# lengths rounded up to a power of two. The cost (about ten compiles and timings per key) is paid
# once per key and machine. Never inside CUDA-graph capture: there the cached choice or the table
# is used. The file's entries are what a measured table would be built from.
# ----------------------------------------------------------------------------------------------
AUTOTUNE_ENV = "FASTBERT_AUTOTUNE"
AUTOTUNE_CACHE_ENV = "FASTBERT_AUTOTUNE_CACHE"
_Config = Tuple[int, int, int, int]
_TUNED: Dict[str, _Config] = {}
_TUNED_FILE_LOADED: Dict[str, bool] = {}
# (BLOCK_M, BLOCK_N) candidates per pass; warps follow the tile size, stages are tried at 2 and 3.
_TUNE_TILES = {
    "fwd": ((64, 32), (64, 64), (128, 32), (128, 64), (128, 128)),
    "bwd_dkdv": ((16, 64), (32, 64), (32, 128), (64, 64), (64, 128)),
    "bwd_dq": ((64, 32), (64, 64), (128, 32), (128, 64)),
}


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0").lower() in ("1", "true", "yes", "on")


def autotune_cache_path() -> str:
    return os.environ.get(AUTOTUNE_CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "fastbert", "attention-configs.json")


def tune_candidates(kind: str, default: _Config, bd: int, bdv: int, elem: int,
                    budget: int) -> List[_Config]:
    """The table's config first, then the candidate tiles that fit ``budget`` bytes of shared
    memory (by :func:`_smem_estimate`), without repeats."""
    out = [default]
    for bm, bn in _TUNE_TILES[kind]:
        warps = 8 if bm * bn >= 128 * 64 or (elem == 4 and bm * bn >= 64 * 64) else 4
        for stages in (2, 3):
            cfg = (bm, bn, warps, stages)
            if cfg not in out and _smem_estimate(kind, bm, bn, stages, bd, bdv, elem) <= budget:
                out.append(cfg)
    return out


def pick_fastest(candidates: Sequence[_Config], time_ms) -> Tuple[_Config, Dict[_Config, float]]:
    """(the fastest candidate, every candidate's time); ``time_ms(cfg)`` may raise for a config that
    does not compile or launch (out of shared memory or registers): it is skipped. The first
    candidate is kept when none can be timed."""
    times: Dict[_Config, float] = {}
    for cfg in candidates:
        try:
            times[cfg] = float(time_ms(cfg))
        except Exception:  # a candidate that cannot run on this GPU is simply not chosen
            continue
    if not times:
        return candidates[0], times
    return min(times, key=lambda c: (times[c], candidates.index(c))), times


def _load_tuned(path: str) -> None:
    if _TUNED_FILE_LOADED.get(path):
        return
    _TUNED_FILE_LOADED[path] = True
    try:
        with open(path) as f:
            data = json.load(f)
        for key, cfg in data.items():
            if isinstance(cfg, list) and len(cfg) == 4:
                _TUNED.setdefault(key, tuple(int(x) for x in cfg))
    except (OSError, ValueError):
        pass  # no file yet, or an unreadable one: tune again


def _save_tuned(path: str, key: str, cfg: _Config) -> None:
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        data[key] = list(cfg)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the choice is still kept in memory


def _time_cuda_ms(fn, reps: int = 10) -> float:
    fn()  # compiles the variant; a failure raises here
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _tuned_config(kind: str, key_fn, default: _Config, device: torch.device,
                  bd: int, bdv: int, elem: int, launch) -> _Config:
    """The config to launch ``kind`` with: the table's ``default`` unless autotuning is on (see
    above), in which case the cached or freshly measured fastest candidate. ``key_fn()`` gives
    the call's tuning key (only computed when tuning)."""
    if not autotune_enabled() or device.type != "cuda" or interpreting():
        return default
    key_parts = key_fn()
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    key = "|".join([kind, props.name, f"sm{props.major}{props.minor}", f"triton{triton.__version__}"]
                   + [str(p) for p in key_parts])
    path = autotune_cache_path()
    _load_tuned(path)
    if key in _TUNED:
        return _TUNED[key]
    if torch.cuda.is_current_stream_capturing():
        return default  # no timing inside a capture
    budget = int(_device_limits(index)[1] * 0.9)
    best, _ = pick_fastest(tune_candidates(kind, default, bd, bdv, elem, budget),
                           lambda cfg: _time_cuda_ms(lambda: launch(cfg)))
    _TUNED[key] = best
    _save_tuned(path, key, best)
    return best


@triton.jit
def _key_limit_kernel(
    Mask,                     # bool mask as uint8, read as (B, MH, MQ, Lk) through its strides
    Limit,                    # int32 [B], zero-filled: raised with atomic max
    mask_heads, mask_rows,    # MH, MQ: the mask's head / query extents (1 where it broadcasts)
    seqlen_k,
    chunks,                   # programs per batch entry (cdiv(MH * MQ, BLOCK_R))
    stride_mb, stride_mh, stride_mm, stride_mn,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ALIGN: tl.constexpr,      # limits rounded up to a multiple of this (which divides Lk)
):
    """Limit[b] = 1 + the last key that the mask lets through for some head and query of batch
    entry b (0 when it lets none through), rounded up to a multiple of ALIGN. Program
    b * chunks + c takes chunk c (BLOCK_R) of the entry's (head, query) rows and walks their keys
    from the end, stopping at the first block that lets a key through: an unpadded mask costs one
    block of keys per row, a padded one its padding."""
    pid = tl.program_id(0)
    b64 = (pid // chunks).to(tl.int64)
    pairs = (pid % chunks) * BLOCK_R + tl.arange(0, BLOCK_R)     # [BR] (head, row) pairs
    pair_ok = pairs < mask_heads * mask_rows
    row_base = (b64 * stride_mb + (pairs // mask_rows).to(tl.int64) * stride_mh
                + (pairs % mask_rows).to(tl.int64) * stride_mm)               # [BR] int64
    offs_n = tl.arange(0, BLOCK_N)
    start_n = (seqlen_k - 1) // BLOCK_N * BLOCK_N
    last = 0                                                  # 1 + last key let through
    while (start_n >= 0) & (last == 0):
        cols = start_n + offs_n
        keep = tl.load(Mask + row_base[:, None] + cols[None, :] * stride_mn,
                       mask=pair_ok[:, None] & (cols < seqlen_k)[None, :], other=0)  # [BR, BN]
        seen = tl.max(keep.to(tl.int32), 0)                   # [BN]: some row keeps the key
        last = tl.max(tl.where(seen != 0, cols + 1, 0), 0)
        start_n -= BLOCK_N
    if last > 0:
        tl.atomic_max(Limit + b64, (last + ALIGN - 1) // ALIGN * ALIGN)


def key_limit_align(seqlen_k: int) -> int:
    """What key limits are rounded up to: 16 when Lk is a multiple of 16 (the kernels then keep
    the alignment facts that vectorise their K / V loads; keys past a limit are masked anyway),
    else 1."""
    return 16 if seqlen_k % 16 == 0 else 1


def _key_limit_min_keys(device: torch.device) -> int:
    """Key lengths from which :func:`key_limits` is worth its launch: a few key blocks to skip."""
    return 32 if device.type != "cuda" or interpreting() else 256


def key_limits(mask: Tensor, m_strides: Sequence[int], mask_kind: int, batch: int, heads: int,
               seqlen_q: int, seqlen_k: int) -> Optional[Tensor]:
    """int32 (B,) key limits of a bool mask (uint8 view from :func:`_mask_args`, broadcast to
    (B, H, Lq, Lk) through ``m_strides``): for batch entry b, one past the last key that some
    head and query may attend, rounded up by :func:`key_limit_align`. The attention kernels then
    stop at it, so right-padded keys (a key-padding mask, or HuggingFace's (B, 1, Lq, Lk) padding
    masks) cost nothing; the result is the same for any mask, since the keys past the limit are
    masked everywhere (and the kernels still apply the mask below it). None (no limit)
    for other masks, broadcast keys and short key lengths. One small kernel on the device, no
    host sync: programs over (batch entry, 16 of its (head, query) rows), each reading keys from
    the end until one is let through."""
    if (mask_kind != MASK_BOOL or m_strides[3] == 0 or batch == 0
            or seqlen_k < _key_limit_min_keys(mask.device)):
        return None
    mask_heads = heads if m_strides[1] != 0 else 1
    mask_rows = seqlen_q if m_strides[2] != 0 else 1
    limit = torch.zeros((batch,), dtype=torch.int32, device=mask.device)
    rows = mask_heads * mask_rows
    block_r = min(16, triton.next_power_of_2(rows))
    # one flat grid dim (it takes 2^31 - 1 programs; a second dim only 65535) over
    # (batch entry, chunk of its rows)
    chunks = triton.cdiv(rows, block_r)
    _key_limit_kernel[(batch * chunks,)](
        mask, limit, mask_heads, mask_rows, seqlen_k, chunks, *m_strides,
        BLOCK_R=block_r, BLOCK_N=min(128, triton.next_power_of_2(seqlen_k)),
        ALIGN=key_limit_align(seqlen_k), num_warps=4)
    return limit


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _block_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use TF32. Read through ``fp32_precision`` (torch >= 2.9),
    which reflects the legacy ``allow_tf32`` flag, ``set_float32_matmul_precision`` and the global
    ``torch.backends.fp32_precision``; reading ``allow_tf32`` itself raises once TF32 was set
    through the new API (as HuggingFace's ``enable_tf32`` does)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # mixed legacy / new settings: only an explicit "tf32" allows it
        return getattr(torch.backends, "fp32_precision", "ieee") == "tf32"


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full fp32 products unless torch allows TF32 for matmuls; 16-bit inputs ignore it.
    if dtype == torch.float32 and not _tf32_allowed():
        return "ieee"
    return "tf32"


def _mask_args(attn_mask: Optional[Tensor], shape: Sequence[int], dummy: Tensor):
    """(pointer tensor, 4 strides, MASK_KIND) for a mask broadcast to ``shape`` (never copied)."""
    if attn_mask is None:
        return dummy, (0, 0, 0, 0), MASK_NONE
    m = attn_mask.expand(*shape)  # a view: broadcast dims get stride 0
    if m.dtype == torch.bool:
        return m.view(torch.uint8), m.stride(), MASK_BOOL
    return m, m.stride(), MASK_FLOAT


def _window_args(window: Optional[Tuple[int, int]], seqlen_q: int, seqlen_k: int):
    """(left, right, HAS_WINDOW) for ``window`` = (left, right) keys before / after the query's own
    position (-1: unbounded) or None."""
    if window is None:
        return 0, 0, False
    unbounded = max(seqlen_q, seqlen_k)
    left, right = (unbounded if w < 0 else min(int(w), unbounded) for w in window)
    return left, right, True


def _alibi_args(alibi: Optional[Tensor], dummy: Tensor):
    """(pointer tensor, (batch stride, head stride), HAS_ALIBI) for fp32 slopes of shape (H,) (one
    set for every batch entry / sequence) or (B, H)."""
    if alibi is None:
        return dummy, (0, 0), False
    if alibi.dim() == 1:
        return alibi, (0, alibi.stride(0)), True
    return alibi, alibi.stride(), True


def _varlen_strides(t: Tensor) -> Tuple[int, int, int, int]:
    """(batch, head, token, dim) strides of a packed (total, H, D) tensor; batch stride 0."""
    return 0, t.stride(1), t.stride(0), t.stride(2)


def _launch_fwd(q, k, v, out, stats, mask, q_strides, k_strides, v_strides, o_strides, l_strides,
                m_strides, mask_kind, cu_q, cu_k, batch, heads, seqlen_q, seqlen_k, scale,
                dropout_p, seed, is_causal, is_varlen, alibi=None, window=None, key_limit=None):
    """Runs the forward kernel; strides are (batch, head, token, dim) (varlen: batch stride 0).
    ``key_limit``: dense only, int32 (B,) from :func:`key_limits`, or None."""
    if key_limit is not None:
        cu_k = key_limit
    alibi, a_strides, has_alibi = _alibi_args(alibi, q)
    w_left, w_right, has_window = _window_args(window, seqlen_q, seqlen_k)
    d, dv = q.shape[-1], v.shape[-1]
    default = attention_config("fwd", d, dv, q.dtype, q.device, dropout_p > 0.0,
                               mask_kind != MASK_NONE)
    seed_ptr = seed_arg(seed, dropout_p, q)

    def launch(cfg):
        bm, bn, warps, stages = cfg
        num_m = triton.cdiv(seqlen_q, bm)
        if num_m * heads * batch == 0:
            return
        _attention_fwd_kernel[(num_m * heads * batch,)](
            q, k, v, mask, alibi, out, stats, cu_q, cu_k,
            *q_strides, *k_strides, *v_strides, *o_strides, *m_strides, *l_strides, *a_strides,
            heads, heads // k.shape[1], w_left, w_right, num_m, seqlen_q, seqlen_k,
            scale * LOG2E, float(dropout_p), keep_scale(dropout_p), seed_ptr,
            HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_dim(d),
            BLOCK_DV=_block_dim(dv), IS_VARLEN=is_varlen, MASK_KIND=mask_kind, IS_CAUSAL=is_causal,
            HAS_DROPOUT=dropout_p > 0.0, HAS_ALIBI=has_alibi, HAS_WINDOW=has_window,
            DOT_PRECISION=_dot_precision(q.dtype),
            KEY_LIMIT=0 if key_limit is None else key_limit_align(seqlen_k),
            num_warps=warps, num_stages=stages)

    key = lambda: _tune_key((q, k, v), d, dv, mask_kind, dropout_p, is_causal,  # noqa: E731
                            is_varlen, seqlen_q, seqlen_k)
    launch(_tuned_config("fwd", key, default, q.device, _block_dim(d), _block_dim(dv),
                         q.element_size(), launch))


def _launch_bwd(do, q, k, v, out, stats, dq, dk, dv, mask, ds,
                q_strides, k_strides, v_strides, o_strides, do_strides, dq_strides, dk_strides,
                dv_strides, l_strides, m_strides, ds_strides, mask_kind, cu_q, cu_k,
                batch, heads, seqlen_q, seqlen_k, scale, dropout_p, seed, is_causal, is_varlen,
                alibi=None, window=None, key_limit=None):
    """Runs preprocess, dK/dV and dQ (+ dS when ``ds`` is a tensor) kernels; returns delta.
    ``key_limit`` as in :func:`_launch_fwd`."""
    d, dvd = q.shape[-1], v.shape[-1]
    bd, bdv = _block_dim(d), _block_dim(dvd)
    alibi, a_strides, has_alibi = _alibi_args(alibi, q)
    w_left, w_right, has_window = _window_args(window, seqlen_q, seqlen_k)
    common = dict(HEAD_DIM=d, HEAD_DIM_V=dvd, BLOCK_D=bd, BLOCK_DV=bdv, IS_VARLEN=is_varlen,
                  MASK_KIND=mask_kind, IS_CAUSAL=is_causal, HAS_DROPOUT=dropout_p > 0.0,
                  HAS_ALIBI=has_alibi, HAS_WINDOW=has_window, DOT_PRECISION=_dot_precision(q.dtype),
                  KEY_LIMIT=0 if key_limit is None else key_limit_align(seqlen_k))
    if key_limit is not None:
        cu_k = key_limit
    store_ds = ds is not None
    if not store_ds:
        ds = q  # never dereferenced (STORE_DS=False)
    seed_ptr = seed_arg(seed, dropout_p, q)
    # delta = rowsum(dO * O): fp32, laid out like one plane of stats.
    delta = torch.empty((l_strides[3],), dtype=torch.float32, device=q.device)
    pre_bm = 64 if gpu_tiles(q.device) else 16
    num_m = triton.cdiv(seqlen_q, pre_bm)
    if num_m * heads * batch > 0:
        _attention_bwd_preprocess_kernel[(num_m * heads * batch,)](
            out, do, delta, cu_q, *o_strides, *do_strides, *l_strides[:3], heads, num_m, seqlen_q,
            HEAD_DIM_V=dvd, BLOCK_M=pre_bm, BLOCK_DV=bdv, IS_VARLEN=is_varlen, num_warps=4)

    key = lambda: _tune_key((q, k, v, do), d, dvd, mask_kind, dropout_p, is_causal,  # noqa: E731
                            is_varlen, seqlen_q, seqlen_k)

    kv_heads = k.shape[1]  # dense (B, Hkv, Lk, D) and packed (total, Hkv, D) alike

    def launch_dkdv(cfg):
        bm, bn, warps, stages = cfg
        num_n = triton.cdiv(seqlen_k, bn)
        if num_n * kv_heads * batch > 0:  # one program per key block of each K/V head
            _attention_bwd_dkdv_kernel[(num_n * kv_heads * batch,)](
                q, k, v, mask, do, alibi, stats, delta, dk, dv, cu_q, cu_k,
                *q_strides, *k_strides, *v_strides, *m_strides, *do_strides, *dk_strides,
                *dv_strides, *l_strides, *a_strides, heads, heads // kv_heads, w_left, w_right,
                num_n, seqlen_q, seqlen_k,
                scale, scale * LOG2E,
                float(dropout_p), keep_scale(dropout_p), seed_ptr, BLOCK_M=bm, BLOCK_N=bn,
                num_warps=warps, num_stages=stages, **common)

    default = attention_config("bwd_dkdv", d, dvd, q.dtype, q.device, dropout_p > 0.0,
                               mask_kind != MASK_NONE)
    launch_dkdv(_tuned_config("bwd_dkdv", key, default, q.device, bd, bdv, q.element_size(),
                              launch_dkdv))

    def launch_dq(cfg):
        bm, bn, warps, stages = cfg
        num_m = triton.cdiv(seqlen_q, bm)
        if num_m * heads * batch > 0:
            _attention_bwd_dq_kernel[(num_m * heads * batch,)](
                q, k, v, mask, do, stats, delta, alibi, dq, ds, cu_q, cu_k,
                *q_strides, *k_strides, *v_strides, *m_strides, *do_strides, *dq_strides,
                *ds_strides, *l_strides, *a_strides, heads, heads // kv_heads, w_left, w_right,
                num_m, seqlen_q, seqlen_k,
                scale, scale * LOG2E,
                float(dropout_p), keep_scale(dropout_p), seed_ptr, BLOCK_M=bm, BLOCK_N=bn,
                STORE_DS=store_ds, num_warps=warps, num_stages=stages, **common)

    default = attention_config("bwd_dq", d, dvd, q.dtype, q.device, dropout_p > 0.0,
                               mask_kind != MASK_NONE)
    launch_dq(_tuned_config("bwd_dq", key, default, q.device, bd, bdv, q.element_size(), launch_dq))
    return delta


def _tune_key(tensors: Sequence[Tensor], d: int, dv: int, mask_kind: int, dropout_p: float,
              is_causal: bool, is_varlen: bool, seqlen_q: int, seqlen_k: int) -> Tuple:
    """What the best tiles depend on, for the autotuning cache (lengths rounded up to a power of
    two, capped at 16384; which of the operands have rows that are not contiguous along the head
    dim, since those loads cannot be vectorised)."""
    q = tensors[0]
    strided = "".join(str(int(t.stride(-1) != 1 and t.shape[-1] > 1)) for t in tensors)
    return (f"D{d}x{dv}", f"e{q.element_size()}", f"mask{mask_kind}", f"drop{int(dropout_p > 0.0)}",
            f"causal{int(is_causal)}", f"varlen{int(is_varlen)}",
            f"Lq{triton.next_power_of_2(min(max(seqlen_q, 1), 16384))}",
            f"Lk{triton.next_power_of_2(min(max(seqlen_k, 1), 16384))}", f"strided{strided}")


def attention_out_layout(like: Tensor, shape: Sequence[int], dtype: Optional[torch.dtype] = None) -> Tensor:
    """An empty (B, H, L, E) tensor whose batch, head and row dims lie in memory in the order of
    ``like``'s (largest stride first; E innermost): stored as (B, L, H, E) and transposed when
    ``like`` is such a view, so that a following reshape to (B, L, H * E) is free, and as
    (L, B, H, E) when ``like`` comes from a sequence-first (L, B, H * E) tensor, so that the
    context is sequence-first too. Contiguous (B, H, L, E) otherwise."""
    b, h, l, e = shape
    dtype = like.dtype if dtype is None else dtype
    sizes = (b, h, l)
    if any(sizes[i] > 1 and like.stride(i) == 0 for i in range(3)):  # an expanded input
        order = [0, 1, 2]
    else:  # (a size-1 dim may sit anywhere: last; ties keep the (B, H, L) order)
        order = sorted(range(3), key=lambda i: (-like.stride(i) if sizes[i] > 1 else 0, i))
    stored = torch.empty([sizes[i] for i in order] + [e], dtype=dtype, device=like.device)
    return stored.permute(*[order.index(i) for i in range(3)], 3)


def _stats_strides(rows_shape: Sequence[int]) -> Tuple[int, int, int, int]:
    """(batch, head, row, plane) strides of the statistics of rows (B, H, L) or varlen (H, total).

    The statistics live in a flat fp32 tensor of 2 * rows elements (plane 0: m, plane 1: log2(l)),
    one layout for dense and varlen rows."""
    numel = math.prod(rows_shape)
    if len(rows_shape) == 3:
        _, h, l = rows_shape
        return h * l, l, 1, numel
    _, total = rows_shape
    return 0, total, 1, numel


def softmax_stats_to_lse(stats: Tensor, rows_shape: Sequence[int]) -> Tensor:
    """The natural-log logsumexp of each row of scaled scores (+inf for a row with no key), shape
    ``rows_shape`` ((B, H, Lq) or varlen (H, total_q)), from the statistics the forward pass
    returns: (m + log2(l)) * ln(2)."""
    st = stats.view(2, *rows_shape)
    return (st[0] + st[1]) * LN2


def attention_fwd(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                  dropout_p: float, is_causal: bool, scale: float,
                  seed: Optional[Tensor] = None,
                  alibi_slopes: Optional[Tensor] = None,
                  window: Optional[Tuple[int, int]] = None) -> Tuple[Tensor, Tensor]:
    """Forward pass.

    Args: query (B, H, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv), any strides, where
    Hkv divides H (grouped-query attention: query head h reads key / value head h // (H / Hkv));
    attn_mask None, bool or float, broadcastable to (B, H, Lq, Lk); ``scale`` a float; ``seed``
    the dropout seed, an int64 (1,) tensor on the inputs' device (e.g. from
    ``fastbert._rng.dropout_seed``), read by the kernels on the device; ignored (may be None)
    when ``dropout_p == 0``. ``alibi_slopes``: fp32 (H,) or (B, H); the score of query i and
    key j gets ``- slope * |i - j|``, computed in the kernel (no bias tensor). ``window``
    (left, right): query i sees keys i - left .. i + right only (-1: unbounded), and only the key
    blocks the window reaches are visited.

    Returns: out (B, H, Lq, Dv) in the input dtype (layout: :func:`attention_out_layout`) and
    stats, fp32 (2 * B * H * Lq,), viewed as (2, B, H, Lq): [0] the row max m of the scores in
    base 2 (``log2(e) * (scale * q.k + mask)``), [1] log2 of the row sum l of ``exp2(s - m)``
    (m = 0, log2(l) = +inf for a row with no key). See :func:`softmax_stats_to_lse`.
    """
    b, h, lq, d = query.shape
    lk, dv = key.shape[2], value.shape[-1]
    out = attention_out_layout(query, (b, h, lq, dv))
    stats = torch.empty((2 * b * h * lq,), dtype=torch.float32, device=query.device)
    mask, m_strides, kind = _mask_args(attn_mask, (b, h, lq, lk), query)
    _launch_fwd(query, key, value, out, stats, mask, query.stride(), key.stride(), value.stride(),
                out.stride(), _stats_strides((b, h, lq)), m_strides, kind, query, query, b, h,
                lq, lk, scale, dropout_p, seed, is_causal, False, alibi_slopes, window,
                key_limits(mask, m_strides, kind, b, h, lq, lk))
    return out, stats


def attention_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                  stats: Tensor, attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool,
                  scale: float, seed: Optional[Tensor] = None, mask_grad: bool = False,
                  alibi_slopes: Optional[Tensor] = None, window: Optional[Tuple[int, int]] = None):
    """Backward pass of :func:`attention_fwd` (same arguments plus its outputs).

    grad_out (B, H, Lq, Dv) any strides (stride 0 included). Returns dq, dk, dv in the layouts of
    the inputs (see :func:`attention_out_layout`; with GQA, dk / dv sum over the query heads of
    each group inside the kernel), and dmask: the gradient of a float
    ``attn_mask`` summed over its broadcast dims (its shape and dtype) when ``mask_grad``, else
    None. dmask needs an fp32 scratch tensor of (MB, MH, Lq, Lk), MB / MH being the mask's batch /
    head extents (1 where it broadcasts).
    """
    b, h, lq, d = query.shape
    lk, dvd = key.shape[2], value.shape[-1]
    if (lq - 1) * abs(grad_out.stride(2)) + (dvd - 1) * abs(grad_out.stride(3)) >= 2 ** 31:
        grad_out = grad_out.contiguous()  # 32-bit offsets inside a (batch, head) slice
    hkv = key.shape[1]
    dq = attention_out_layout(query, (b, h, lq, d))
    dk = attention_out_layout(key, (b, hkv, lk, d))
    dv = attention_out_layout(value, (b, hkv, lk, dvd))
    mask, m_strides, kind = _mask_args(attn_mask, (b, h, lq, lk), query)
    mask_grad = bool(mask_grad) and kind == MASK_FLOAT
    # A mask broadcast over batch and/or heads gets its gradient from its own kernel, summed over
    # those dims as it goes (scratch (MB, MH, Lq, Lk)); a full (B, H, ...) mask gets dS from the dq
    # kernel (scratch (B, H, Lq, Lk)). Causal programs skip the tiles above the diagonal: zeros.
    # Broadcast dims by the mask's shape, not its strides: a stride-0 view of full size
    # (``bias.expand(B, H, Lq, Lk)``) gets its gradient per element, as autograd expects.
    mshape = (1, 1) if attn_mask is None else (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    mb = b if mshape[0] != 1 else 1
    mh = h if mshape[1] != 1 else 1
    in_dq = mask_grad and mb * mh == b * h
    ds, ds_strides = None, (0, 0, 0, 0)
    if in_dq:
        ds = torch.zeros((b, h, lq, lk), dtype=torch.float32, device=query.device)
        ds_strides = ds.stride()
    stats_strides = _stats_strides((b, h, lq))
    delta = _launch_bwd(grad_out, query, key, value, out, stats, dq, dk, dv, mask, ds,
                        query.stride(), key.stride(), value.stride(), out.stride(),
                        grad_out.stride(), dq.stride(), dk.stride(), dv.stride(), stats_strides,
                        m_strides, ds_strides, kind, query, query, b, h, lq, lk, scale, dropout_p,
                        seed, is_causal, False, alibi_slopes, window,
                        key_limits(mask, m_strides, kind, b, h, lq, lk))
    if mask_grad and not in_dq:
        ds = torch.zeros((mb, mh, lq, lk), dtype=torch.float32, device=query.device)
        _launch_bwd_dmask(grad_out, query, key, value, stats, delta, mask, ds, m_strides,
                          stats_strides, b, h, mb, mh, lq, lk, scale, dropout_p, seed, is_causal,
                          alibi_slopes, window)
    dmask = None
    if mask_grad:
        dmask = ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype)
    return dq, dk, dv, dmask


def _dmask_config(dtype: torch.dtype, d: int, device: torch.device) -> _Config:
    """(BLOCK_M, BLOCK_N, warps, stages) of the broadcast-mask gradient kernel: a [BM, BN] fp32
    accumulator plus the S / dP tiles of one (batch, head) step. Chosen from ahead-of-time
    compiles (tests/_compile_kernels.py, triton 3.8, causal + dropout), not from timings: 16-bit
    D <= 128 at 64x32 with 8 warps spills nothing on sm_80 and sm_90 (64x64 spilled 0.3 to 5 KB a
    thread on sm_80); fp32, and D 256, at 32x32 with 4 warps (fp32 64x64 spilled up to 24 KB)."""
    if not gpu_tiles(device):
        return 16, 32, 1, 1
    if dtype == torch.float32 or d > 128:
        return 32, 32, 4, 2
    return 64, 32, 8, 2


def _launch_bwd_dmask(do, q, k, v, stats, delta, mask, dmask, m_strides, l_strides, batch, heads,
                      mb, mh, seqlen_q, seqlen_k, scale, dropout_p, seed, is_causal, alibi=None,
                      window=None):
    d, dv = q.shape[-1], v.shape[-1]
    bm, bn, warps, stages = _dmask_config(q.dtype, max(d, dv), q.device)
    grid = (triton.cdiv(seqlen_q, bm) * triton.cdiv(seqlen_k, bn) * mb * mh,)
    if grid[0] == 0:
        return
    alibi, a_strides, has_alibi = _alibi_args(alibi, q)
    w_left, w_right, has_window = _window_args(window, seqlen_q, seqlen_k)
    _attention_bwd_dmask_kernel[grid](
        q, k, v, mask, do, stats, delta, alibi, dmask,
        *q.stride(), *k.stride(), *v.stride(), *m_strides, *do.stride(), *l_strides, *a_strides,
        heads, heads // k.shape[1], w_left, w_right, seqlen_q, seqlen_k, mh,
        batch if mb == 1 else 1,
        heads if mh == 1 else 1,
        scale * LOG2E, float(dropout_p), keep_scale(dropout_p), seed_arg(seed, dropout_p, q),
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_dim(d),
        BLOCK_DV=_block_dim(dv), IS_CAUSAL=is_causal, HAS_DROPOUT=dropout_p > 0.0,
        HAS_ALIBI=has_alibi, HAS_WINDOW=has_window, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=warps, num_stages=stages)


def varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                         cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                         dropout_p: float, is_causal: bool, scale: float,
                         seed: Optional[Tensor] = None,
                         alibi_slopes: Optional[Tensor] = None,
                         window: Optional[Tuple[int, int]] = None,
                         attn_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Forward pass over packed sequences.

    Args: q (total_q, H, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv) with Hkv dividing H (GQA),
    any strides; cu_seqlens_*
    (N + 1,) int32/int64 on the tensors' device; max_seqlen_* upper bounds of the lengths (they
    size the grid and the dropout offsets); ``seed``, ``alibi_slopes`` ((H,) or (N, H)) and
    ``window`` as in :func:`attention_fwd`, positions counted within each sequence;
    ``attn_mask`` bool or float, broadcastable to (N, H, max_seqlen_q, max_seqlen_k), read through
    its strides at (sequence, head, position of the query within its sequence, of the key).

    Returns: out (total_q, H, Dv) contiguous, stats fp32 (2 * H * total_q,), viewed as
    (2, H, total_q) (as in :func:`attention_fwd`).
    """
    total_q, h, d = q.shape
    dv = v.shape[-1]
    n = cu_seqlens_q.numel() - 1
    out = torch.empty((total_q, h, dv), dtype=q.dtype, device=q.device)
    stats = torch.empty((2 * h * total_q,), dtype=torch.float32, device=q.device)
    mask, m_strides, kind = _mask_args(attn_mask, (n, h, max_seqlen_q, max_seqlen_k), q)
    _launch_fwd(q, k, v, out, stats, mask, _varlen_strides(q), _varlen_strides(k),
                _varlen_strides(v), _varlen_strides(out), _stats_strides((h, total_q)), m_strides,
                kind, cu_seqlens_q, cu_seqlens_k, n, h, max_seqlen_q, max_seqlen_k, scale,
                dropout_p, seed, is_causal, True, alibi_slopes, window)
    return out, stats


def varlen_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                         stats: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, is_causal: bool,
                         scale: float, seed: Optional[Tensor] = None,
                         alibi_slopes: Optional[Tensor] = None,
                         window: Optional[Tuple[int, int]] = None,
                         attn_mask: Optional[Tensor] = None, mask_grad: bool = False
                         ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Backward pass of :func:`varlen_attention_fwd`; returns dq, dk, dv (packed, contiguous) and
    the gradient of a float ``attn_mask`` summed over its broadcast dims (its shape and dtype) when
    ``mask_grad``, else None. That needs an fp32 scratch of (N, H, max_seqlen_q, max_seqlen_k)."""
    total_q, h, d = q.shape
    n = cu_seqlens_q.numel() - 1
    if max_seqlen_q * abs(grad_out.stride(0)) + v.shape[-1] * abs(grad_out.stride(2)) >= 2 ** 31:
        grad_out = grad_out.contiguous()  # 32-bit offsets inside a sequence
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    mask, m_strides, kind = _mask_args(attn_mask, (n, h, max_seqlen_q, max_seqlen_k), q)
    mask_grad = bool(mask_grad) and kind == MASK_FLOAT
    # dS per (sequence, head) at local positions, from the dq kernel; positions past a sequence's
    # end and tiles its programs skip (causal, window) stay 0
    ds, ds_strides = None, (0, 0, 0, 0)
    if mask_grad:
        ds = torch.zeros((n, h, max_seqlen_q, max_seqlen_k), dtype=torch.float32, device=q.device)
        ds_strides = ds.stride()
    # Every row of dq / dk / dv belongs to a sequence and is written by its program (zero-length
    # partners give zero rows), as long as max_seqlen_* bound the lengths (checked by the op).
    _launch_bwd(grad_out, q, k, v, out, stats, dq, dk, dv, mask, ds,
                _varlen_strides(q), _varlen_strides(k), _varlen_strides(v), _varlen_strides(out),
                _varlen_strides(grad_out), _varlen_strides(dq), _varlen_strides(dk),
                _varlen_strides(dv), _stats_strides((h, total_q)), m_strides, ds_strides,
                kind, cu_seqlens_q, cu_seqlens_k, n, h, max_seqlen_q, max_seqlen_k, scale,
                dropout_p, seed, is_causal, True, alibi_slopes, window)
    dmask = ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if mask_grad else None
    return dq, dk, dv, dmask


def attention_dropout_mask(seed: Tensor, dropout_p: float, shape: Sequence[int]) -> Tensor:
    """The exact keep-mask (bool, True = kept) the attention kernels draw for ``seed``, the int64
    (1,) seed tensor of a forward call (the mask is built on its device, without reading it).

    ``shape`` is (B, H, Lq, Lk) for dense attention; for varlen use (N, H, max_seqlen_q,
    max_seqlen_k) (or :func:`varlen_attention_dropout_masks`).
    """
    check_seed(seed)
    numel = math.prod(shape)
    keep = torch.empty(numel, dtype=torch.uint8, device=seed.device)
    if numel:
        block = 1024
        _attention_dropout_mask_kernel[(triton.cdiv(numel, block),)](
            keep, numel, float(dropout_p), seed, BLOCK=block)
    return keep.view(torch.bool).view(*shape)


def varlen_attention_dropout_masks(seed: Tensor, dropout_p: float, cu_seqlens_q: Tensor,
                                   cu_seqlens_k: Tensor, num_heads: int, max_seqlen_q: int,
                                   max_seqlen_k: int) -> List[Tensor]:
    """Per-sequence keep-masks (H, Lq_i, Lk_i) the varlen kernels draw for ``seed`` (the int64 (1,)
    seed tensor of a forward call)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    n = len(cq) - 1
    full = attention_dropout_mask(seed, dropout_p, (n, num_heads, max_seqlen_q, max_seqlen_k))
    return [full[i, :, :cq[i + 1] - cq[i], :ck[i + 1] - ck[i]] for i in range(n)]
