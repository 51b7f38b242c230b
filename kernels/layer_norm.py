"""LayerNorm and residual + bias + dropout + LayerNorm in Triton: kernels and launchers.

One family of kernels serves both ``fastbert.layer_norm`` and ``fastbert.add_layer_norm``: the row
that is normalised is the *pre-norm sum*

    s = dropout(x + input_bias) + residual        (add_layer_norm)
    s = x                                          (layer_norm: no residual, no bias, no dropout)

and ``y = (s - mean(s)) * rstd * weight + bias`` with ``rstd = 1 / sqrt(var(s) + eps)`` (biased
variance). Statistics and all arithmetic are fp32; inputs and outputs are fp16, bf16 or fp32, and
weight / bias / input_bias may have a dtype of their own (e.g. fp32 parameters with fp16
activations), as may the residual (a bf16 matmul output added to an fp32 residual stream, as under
mixed precision): every tensor is read in its own dtype, the outputs take the promoted dtype of
input and residual, and each gradient its input's dtype.

Two variants of each pass:

* **one-pass** (``N <= MAX_FUSED_N``): a ``[BLOCK_M, BLOCK_N]`` tile holds ``BLOCK_M`` whole rows in
  registers, so every element is read once and written once.
* **looped** (wider rows, tested up to 65536): one row per program, walked in ``LOOPED_BLOCK_N``
  column chunks. Forward: pass 1 computes mean and variance chunk by chunk, merged with Chan's
  parallel formula (numerically stable, no sum-of-squares cancellation); pass 2 re-reads the row
  (from L2 for rows of this size) and writes the output. Backward: pass 1 reduces the two row dot
  products, pass 2 writes dx; dweight / dbias / dinput_bias come from a separate column-reduction
  kernel.

Backward reductions over rows (dweight, dbias, dinput_bias) are deterministic: every program owns a
fixed set of rows and writes its partial column sums to its own row of a ``[G, N]`` fp32 buffer,
and a final ``sum(0)`` reduces the ``G`` partials; no atomics, so two runs on the same GPU model
give identical bits. ``G`` follows the device's SM count, so another GPU model (or the CUDA
backend, whose slots also depend on 16-byte alignment) sums in another grouping and may differ
in the last bits.

Dropout is counter based (Philox via ``tl.rand``): element ``(row, col)`` of the logical ``[M, N]``
row matrix is kept iff ``rand(seed, row * N + col) >= p``. Forward, backward and
:func:`dropout_keep_mask` compute the same expression, so the backward regenerates the forward mask
and tests can materialise it for the reference. Offsets are int32 while ``M * N < 2**31`` and int64
beyond (Triton's Philox then also uses the high word). The seed is an int64 (1,) tensor on the
device (``fastbert._rng.dropout_seed``) that each kernel loads (``tl.load(SEED)``) only when
``HAS_DROPOUT``: the host never reads it (no sync) and a captured CUDA graph reads the fresh seed
drawn on each replay.

Offsets into the data are int64: row indices are widened before they are multiplied by the row
stride; the in-row part ``col * stride_col`` stays int32 (the launcher makes a row whose extent is
>= 2**31 elements contiguous first).

Block sizes and warps: timings were **not measured** (the session that wrote them had no GPU;
``bench/bench_norms.py`` is where they get tuned). Register counts were measured: every kernel
was compiled ahead of time for sm_90 (``triton.compile`` + the bundled ptxas, ``cuobjdump -res-usage``); the
numbers below are "registers per thread, plain layer_norm / add_layer_norm with dropout, residual
gradient and input_bias (the heaviest variant)", fp16.

* forward one-pass: ``[BLOCK_M, BLOCK_N]`` tiles of ``TILE_ELEMS = 4096`` elements
  (``BLOCK_N = next_pow2(N)``, ``BLOCK_M = 4096 // BLOCK_N`` rows in [1, 256]), so BERT's 768 /
  1024-wide rows get 4 rows per program instead of a program per row, and tiny rows (N = 1..64) are
  not dominated by per-program overhead; ``num_warps = tile / 512`` in [1, 16], i.e. 16 elements
  (two 16-byte fp16 vectors) per thread and tensor. 40 / 96 registers at N = 768..8192: 2+
  programs (16+ warps) resident per SM, no spills (bf16 at 8192: 64 registers + 8 bytes stack);
* backward one-pass: half the tile (``BWD_TILE_ELEMS = 2048``) and 8 elements per thread
  (``num_warps = tile / 256`` in [1, 32]), because the backward keeps more tiles live (x, dy, xhat,
  g, ds, dx, the Philox state under dropout) and sums its column partials per step into [BLOCK_N]
  accumulators. With 4096-element tiles and [BLOCK_M, BLOCK_N] accumulators it took 116 / 192
  registers at N = 768 (one 8-warp program per SM for add_layer_norm); now 76 / 126, no spills
  up to N = 4096. At N = 8192 (one row, 32 warps, cap 64 registers) plain layer_norm uses 64 without
  spilling; the heaviest add_layer_norm variant spills 48 bytes per thread (16 warps: 40-168);
* ``MAX_FUSED_N = 8192``: beyond it a one-pass row needs more than 8 fp32 values per tile per
  thread even at 32 warps and would spill in earnest;
* backward programs ``G = num_SMs * max(1, 16 // num_warps)`` (two 8-warp programs per SM, what
  the 126-register variant can keep resident): each program's step loads 8 KB (fp16 dy and x
  tiles; 16 KB with residual and dsum), 16-32 KB in flight per SM against the ~20 KB that
  Little's law asks of ~3 TB/s at ~1 us latency over 132 SMs. The ``[G, N]`` fp32 partials
  (written once, read once by the final sum) stay ~4% of the backward's traffic at 16384 rows
  (N = 768: 264 x 768 x 8 bytes per column sum against 16384 x 768 x 2 bytes x 3 tensors);
* looped kernels: ``LOOPED_BLOCK_N = 4096`` chunks at 8 warps (16 fp32 per thread; 48-109 / 80-112
  registers forward / backward); the column reduction uses ``[8, 256]`` tiles at 8 warps
  (121 registers; 190-255 with [16, 256]) and ``G * column_blocks ~= 4 * num_SMs`` programs.

The backward recomputes the pre-norm sum in fp32 from the inputs (and the dropout seed) instead of
reading a rounded copy: it moves the same bytes (reads x and residual instead of writing s in the
forward and reading it back) and keeps ``xhat`` consistent with the forward's statistics (with a
rounded s, a constant row, e.g. N = 1, gets ``xhat = rounding error * rstd``, which is large). It
takes ``s - mean`` with the mean as stored in fp32, as torch's backward does: near a large common
offset its ``xhat`` is that rounding (``ulp(mean) / 2 * rstd``) less accurate than the forward's.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._seed import check_seed, keep_scale, load_seed, seed_arg

__all__ = ["layer_norm_fwd", "layer_norm_bwd", "dropout_keep_mask", "MAX_FUSED_N"]

Tensor = torch.Tensor

MAX_FUSED_N = 8192      # widest row the one-pass kernels hold in registers
LOOPED_BLOCK_N = 4096   # column chunk of the looped kernels (16 fp32 per thread at 8 warps)
LOOPED_NUM_WARPS = 8
TILE_ELEMS = 4096       # elements per one-pass forward tile ([BLOCK_M, BLOCK_N])
BWD_TILE_ELEMS = 2048   # elements per one-pass backward tile
BWD_ELEMS_PER_THREAD = 8
MAX_BLOCK_M = 256
COLS_BLOCK_N = 256      # column block of the looped backward's column reduction
COLS_BLOCK_M = 8        # rows per step of the column reduction ([8, 256] tile, 8 warps)


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dropout_keep(seed, rows, cols, N, p, OFFSET_64: tl.constexpr):
    """Keep-mask of dropout at (rows, cols) of the logical [M, N] matrix; rows int64 [BM, 1] (or a
    scalar), cols int32 [1, BN] -> bool [BM, BN]. Element kept iff
    rand(seed, row * N + col) >= p."""
    if OFFSET_64:
        offs = rows * N + cols
    else:
        offs = rows.to(tl.int32) * N + cols
    return tl.rand(seed, offs) >= p


@triton.jit
def _pre_norm_sum(
    X, stride_xm, stride_xn,        # input [M, N]
    R, stride_rm, stride_rn,        # residual [M, N] (HAS_RESIDUAL)
    XB,                             # input_bias [N] (HAS_INPUT_BIAS), contiguous
    rows, cols,                     # rows int64 [BM, 1], cols int32 [1, BN]
    mask_n, mask,                   # column mask [1, BN], tile mask [BM, BN]
    keep, dropout_scale,            # dropout keep-mask [BM, BN] (HAS_DROPOUT; else unused)
    HAS_RESIDUAL: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    """s = dropout(x + input_bias) + residual as fp32 [BM, BN]; 0 outside ``mask``."""
    s = tl.load(X + rows * stride_xm + cols * stride_xn, mask=mask, other=0.0).to(tl.float32)
    if HAS_INPUT_BIAS:
        s += tl.load(XB + cols, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        s = tl.where(keep, s * dropout_scale, 0.0)
    if HAS_RESIDUAL:
        s += tl.load(R + rows * stride_rm + cols * stride_rn, mask=mask, other=0.0).to(tl.float32)
    return s


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _layer_norm_fwd_kernel(
    X, stride_xm, stride_xn,        # input [M, N], any strides
    R, stride_rm, stride_rn,        # residual [M, N] (HAS_RESIDUAL)
    XB,                             # input_bias [N] (HAS_INPUT_BIAS)
    W, B,                           # weight, bias [N] (HAS_WEIGHT, HAS_BIAS)
    Y,                              # out [M, N], contiguous, promoted dtype of input and residual
    S,                              # pre-norm sum [M, N], contiguous, as Y (STORE_SUM)
    MEAN, RSTD,                     # [M] fp32
    M, N, eps,
    SEED,                           # int64 [1] dropout seed (device memory), loaded iff HAS_DROPOUT
    dropout_p, dropout_scale,
    HAS_RESIDUAL: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_SUM: tl.constexpr,
    OFFSET_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,   # BLOCK_N >= N: whole rows in the tile
):
    """One-pass forward: program i normalises rows [i * BLOCK_M, (i + 1) * BLOCK_M)."""
    seed = load_seed(SEED, HAS_DROPOUT)  # read on the device: no host sync
    pid_m = tl.program_id(0)
    o_m = tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)    # [BM] int64
    m_m = o_m < M
    rows = o_m[:, None]                                                  # [BM, 1]
    cols = tl.arange(0, BLOCK_N)[None, :]                                # [1, BN]
    m_n = cols < N
    mask = m_m[:, None] & m_n                                            # [BM, BN]

    keep = mask
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, rows, cols, N, dropout_p, OFFSET_64)
    s = _pre_norm_sum(X, stride_xm, stride_xn, R, stride_rm, stride_rn, XB, rows, cols, m_n, mask,
                      keep, dropout_scale, HAS_RESIDUAL, HAS_INPUT_BIAS, HAS_DROPOUT)  # [BM, BN]
    # Corrected two-pass mean: s - mean0 recovers what rounding mean0 to fp32 lost (c), so the
    # outputs subtract c, a small number, instead of a rounded large mean (rows near a large
    # common offset: up to ~2x torch's error otherwise).
    mean0 = tl.sum(s, axis=1) / N                                        # [BM]
    d = tl.where(mask, s - mean0[:, None], 0.0)                          # [BM, BN]
    c = tl.sum(d, axis=1) / N                                            # [BM]
    d = tl.where(mask, d - c[:, None], 0.0)
    mean = mean0 + c
    var = tl.sum(d * d, axis=1) / N                                      # [BM]
    rstd = 1.0 / tl.sqrt(var + eps)
    y = d * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=m_n, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=m_n, other=0.0).to(tl.float32)
    o_out = rows * N + cols                                              # contiguous outputs
    tl.store(Y + o_out, y.to(Y.dtype.element_ty), mask=mask)
    if STORE_SUM:
        tl.store(S + o_out, s.to(S.dtype.element_ty), mask=mask)
    tl.store(MEAN + o_m, mean, mask=m_m)
    tl.store(RSTD + o_m, rstd, mask=m_m)


@triton.jit
def _layer_norm_fwd_looped_kernel(
    X, stride_xm, stride_xn, R, stride_rm, stride_rn, XB, W, B, Y, S, MEAN, RSTD,  # as above
    M, N, eps,
    SEED,                           # int64 [1] dropout seed (device memory), loaded iff HAS_DROPOUT
    dropout_p, dropout_scale,
    HAS_RESIDUAL: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_SUM: tl.constexpr,
    OFFSET_64: tl.constexpr,
    BLOCK_M: tl.constexpr,          # rows per program (the launcher uses 1)
    BLOCK_N: tl.constexpr,          # column chunk, < N
):
    """Looped forward for wide rows: pass 1 statistics (Chan's merge of per-chunk mean / M2),
    pass 2 recomputes the chunk (same dropout mask) and writes the output. Both passes work on
    s - shift, with the shift the mean of the first chunk (taken in the first iteration): the means
    merged are then small numbers, and the outputs never subtract a large mean rounded to fp32
    (rows near a large common offset)."""
    seed = load_seed(SEED, HAS_DROPOUT)  # read on the device: no host sync
    pid_m = tl.program_id(0)
    o_m = tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)    # [BM] int64
    m_m = o_m < M
    rows = o_m[:, None]                                                  # [BM, 1]
    shift = tl.zeros([BLOCK_M], dtype=tl.float32)                        # set from chunk 0
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)                         # of s - shift
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)                           # sum of squared deviations
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)[None, :]                    # [1, BN]
        m_n = cols < N
        mask = m_m[:, None] & m_n                                        # [BM, BN]
        keep = mask
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rows, cols, N, dropout_p, OFFSET_64)
        s = _pre_norm_sum(X, stride_xm, stride_xn, R, stride_rm, stride_rn, XB, rows, cols, m_n,
                          mask, keep, dropout_scale, HAS_RESIDUAL, HAS_INPUT_BIAS, HAS_DROPOUT)
        if STORE_SUM:
            tl.store(S + rows * N + cols, s.to(S.dtype.element_ty), mask=mask)
        n_prev = tl.cast(start, tl.float32)                              # elements merged so far
        n_b = tl.cast(tl.minimum(N - start, BLOCK_N), tl.float32)        # elements in this chunk
        if start == 0:
            shift = tl.sum(s, axis=1) / n_b                              # [BM]
        s = tl.where(mask, s - shift[:, None], 0.0)
        mean_b = tl.sum(s, axis=1) / n_b                                 # [BM]
        d = tl.where(mask, s - mean_b[:, None], 0.0)
        m2_b = tl.sum(d * d, axis=1)
        n_tot = n_prev + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n_tot)
        m2 = m2 + m2_b + delta * delta * (n_prev * n_b / n_tot)
    rstd = 1.0 / tl.sqrt(m2 / N + eps)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)[None, :]
        m_n = cols < N
        mask = m_m[:, None] & m_n
        keep = mask
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rows, cols, N, dropout_p, OFFSET_64)
        s = _pre_norm_sum(X, stride_xm, stride_xn, R, stride_rm, stride_rn, XB, rows, cols, m_n,
                          mask, keep, dropout_scale, HAS_RESIDUAL, HAS_INPUT_BIAS, HAS_DROPOUT)
        y = ((s - shift[:, None]) - mean[:, None]) * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=m_n, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=m_n, other=0.0).to(tl.float32)
        tl.store(Y + rows * N + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + o_m, shift + mean, mask=m_m)
    tl.store(RSTD + o_m, rstd, mask=m_m)


# ----------------------------------------------------------------------------------------------
# Backward. The pre-norm sum s is recomputed in fp32 from input / input_bias / dropout /
# residual (not read back from a rounded copy), so xhat = (s - mean) * rstd is the forward's up
# to the fp32 rounding of the stored mean (as in torch); with a rounded s a constant row (e.g.
# N = 1) would get xhat = rounding * rstd.
#   g = dy * weight,
#   ds   = rstd * (g - mean_n(g) - xhat * mean_n(g * xhat)) + dsum,
#   d_residual = ds,  d_input = ds * keep / (1 - p),  d_input_bias = sum_m d_input,
#   d_weight = sum_m dy * xhat,  d_bias = sum_m dy.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _layer_norm_bwd_kernel(
    DY, stride_dym, stride_dyn,     # grad of out [M, N], any strides (stride 0 from expand is fine)
    DSUM, stride_dsm, stride_dsn,   # grad of the returned pre-norm sum [M, N] (HAS_DSUM)
    X, stride_xm, stride_xn,        # forward input [M, N]
    R, stride_rm, stride_rn,        # forward residual [M, N] (HAS_RESIDUAL)
    XB,                             # input_bias [N] (HAS_INPUT_BIAS)
    W,                              # weight [N] (HAS_WEIGHT)
    MEAN, RSTD,                     # [M] fp32 from the forward
    DS,                             # out: grad of s [M, N] contiguous (= dx of layer_norm), in
                                    #   the residual's dtype
    DX,                             # out: grad of input [M, N] contiguous, input dtype (STORE_DX:
                                    #   under dropout, or when input's dtype is not the residual's)
    DW_PART, DB_PART, DXB_PART,     # out: partial column sums [G, N] fp32, row = program id
    M, N,
    SEED,                           # int64 [1] dropout seed (device memory), loaded iff HAS_DROPOUT
    dropout_p, dropout_scale,
    HAS_RESIDUAL: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_DSUM: tl.constexpr,
    STORE_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, NEED_DXB: tl.constexpr,
    OFFSET_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,   # BLOCK_N >= N
):
    """One-pass backward: program g handles row blocks g, g + G, g + 2G, ... and accumulates its
    dweight / dbias / dinput_bias partials in registers ([BN] fp32 each, summed over the tile's
    rows every step)."""
    seed = load_seed(SEED, HAS_DROPOUT)  # read on the device: no host sync
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    o_n = tl.arange(0, BLOCK_N)                                          # [BN]
    cols = o_n[None, :]                                                  # [1, BN]
    m_n = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=m_n, other=0.0).to(tl.float32)        # [1, BN]
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    dxb_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for rb in range(pid, tl.cdiv(M, BLOCK_M), n_progs):
        o_m = tl.cast(rb, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)   # [BM] int64
        m_m = o_m < M
        rows = o_m[:, None]                                              # [BM, 1]
        mask = m_m[:, None] & m_n                                        # [BM, BN]
        keep = mask
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rows, cols, N, dropout_p, OFFSET_64)
        s = _pre_norm_sum(X, stride_xm, stride_xn, R, stride_rm, stride_rn, XB, rows, cols, m_n,
                          mask, keep, dropout_scale, HAS_RESIDUAL, HAS_INPUT_BIAS, HAS_DROPOUT)
        dy = tl.load(DY + rows * stride_dym + cols * stride_dyn, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        mean = tl.load(MEAN + o_m, mask=m_m, other=0.0)[:, None]        # [BM, 1]
        rstd = tl.load(RSTD + o_m, mask=m_m, other=0.0)[:, None]
        xhat = tl.where(mask, (s - mean) * rstd, 0.0)                    # [BM, BN]
        if HAS_WEIGHT:
            g = dy * w
        else:
            g = dy
        c1 = tl.sum(xhat * g, axis=1)[:, None] / N                       # [BM, 1]
        c2 = tl.sum(g, axis=1)[:, None] / N
        ds = (g - c2 - xhat * c1) * rstd
        if HAS_DSUM:
            ds += tl.load(DSUM + rows * stride_dsm + cols * stride_dsn, mask=mask,
                          other=0.0).to(tl.float32)
        o_out = rows * N + cols
        tl.store(DS + o_out, ds.to(DS.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            dx = tl.where(keep & mask, ds * dropout_scale, 0.0)
        else:
            dx = tl.where(mask, ds, 0.0)
        if STORE_DX:  # dropout, or an input dtype other than the residual's
            tl.store(DX + o_out, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if NEED_DB:
            db_acc += tl.sum(dy, axis=0)
        if NEED_DXB:
            dxb_acc += tl.sum(dx, axis=0)
    o_part = tl.cast(pid, tl.int64) * N + o_n                            # [BN]
    if NEED_DW:
        tl.store(DW_PART + o_part, dw_acc, mask=o_n < N)
    if NEED_DB:
        tl.store(DB_PART + o_part, db_acc, mask=o_n < N)
    if NEED_DXB:
        tl.store(DXB_PART + o_part, dxb_acc, mask=o_n < N)


@triton.jit
def _layer_norm_bwd_looped_kernel(
    DY, stride_dym, stride_dyn, DSUM, stride_dsm, stride_dsn, X, stride_xm, stride_xn,
    R, stride_rm, stride_rn, XB, W, MEAN, RSTD, DS, DX,  # as in _layer_norm_bwd_kernel
    C1, C2,                         # out: per-row mean_n(g * xhat), mean_n(g) [M] fp32 (STORE_C)
    M, N,
    SEED,                           # int64 [1] dropout seed (device memory), loaded iff HAS_DROPOUT
    dropout_p, dropout_scale,
    HAS_RESIDUAL: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_DSUM: tl.constexpr, STORE_DX: tl.constexpr,
    STORE_C: tl.constexpr, OFFSET_64: tl.constexpr,
    BLOCK_M: tl.constexpr,          # rows per program (the launcher uses 1)
    BLOCK_N: tl.constexpr,          # column chunk, < N
):
    """Looped backward for wide rows, ds / dx only: pass 1 reduces mean_n(g * xhat) and mean_n(g)
    (kept in C1 / C2 for the column kernel), pass 2 writes ds (and dx under dropout). Column sums:
    _layer_norm_bwd_cols_kernel."""
    seed = load_seed(SEED, HAS_DROPOUT)  # read on the device: no host sync
    pid_m = tl.program_id(0)
    o_m = tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)    # [BM] int64
    m_m = o_m < M
    rows = o_m[:, None]                                                  # [BM, 1]
    mean = tl.load(MEAN + o_m, mask=m_m, other=0.0)[:, None]            # [BM, 1]
    rstd = tl.load(RSTD + o_m, mask=m_m, other=0.0)[:, None]
    c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)[None, :]                    # [1, BN]
        m_n = cols < N
        mask = m_m[:, None] & m_n                                        # [BM, BN]
        keep = mask
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rows, cols, N, dropout_p, OFFSET_64)
        s = _pre_norm_sum(X, stride_xm, stride_xn, R, stride_rm, stride_rn, XB, rows, cols, m_n,
                          mask, keep, dropout_scale, HAS_RESIDUAL, HAS_INPUT_BIAS, HAS_DROPOUT)
        dy = tl.load(DY + rows * stride_dym + cols * stride_dyn, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        xhat = tl.where(mask, (s - mean) * rstd, 0.0)
        if HAS_WEIGHT:
            g = dy * tl.load(W + cols, mask=m_n, other=0.0).to(tl.float32)
        else:
            g = dy
        c1 += tl.sum(xhat * g, axis=1)
        c2 += tl.sum(g, axis=1)
    c1 = c1 / N
    c2 = c2 / N
    if STORE_C:
        tl.store(C1 + o_m, c1, mask=m_m)
        tl.store(C2 + o_m, c2, mask=m_m)
    c1 = c1[:, None]                                                     # [BM, 1]
    c2 = c2[:, None]
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)[None, :]
        m_n = cols < N
        mask = m_m[:, None] & m_n
        keep = mask
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rows, cols, N, dropout_p, OFFSET_64)
        s = _pre_norm_sum(X, stride_xm, stride_xn, R, stride_rm, stride_rn, XB, rows, cols, m_n,
                          mask, keep, dropout_scale, HAS_RESIDUAL, HAS_INPUT_BIAS, HAS_DROPOUT)
        dy = tl.load(DY + rows * stride_dym + cols * stride_dyn, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        xhat = (s - mean) * rstd
        if HAS_WEIGHT:
            g = dy * tl.load(W + cols, mask=m_n, other=0.0).to(tl.float32)
        else:
            g = dy
        ds = (g - c2 - xhat * c1) * rstd
        if HAS_DSUM:
            ds += tl.load(DSUM + rows * stride_dsm + cols * stride_dsn, mask=mask,
                          other=0.0).to(tl.float32)
        o_out = rows * N + cols
        tl.store(DS + o_out, ds.to(DS.dtype.element_ty), mask=mask)
        if STORE_DX:  # dropout, or an input dtype other than the residual's
            if HAS_DROPOUT:
                dx = tl.where(keep, ds * dropout_scale, 0.0)
            else:
                dx = ds
            tl.store(DX + o_out, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_cols_kernel(
    DY, stride_dym, stride_dyn,     # grad of out [M, N]
    DSUM, stride_dsm, stride_dsn,   # grad of the returned pre-norm sum [M, N] (HAS_DSUM)
    X, stride_xm, stride_xn,        # forward input [M, N]
    R, stride_rm, stride_rn,        # forward residual [M, N] (HAS_RESIDUAL)
    XB,                             # input_bias [N] (HAS_INPUT_BIAS)
    W,                              # weight [N] (HAS_WEIGHT)
    MEAN, RSTD,                     # [M] fp32 from the forward
    C1, C2,                         # [M] fp32 row terms of the looped row kernel (NEED_DXB)
    DW_PART, DB_PART, DXB_PART,     # out: partial column sums [G, N] fp32
    M, N,
    SEED,                           # int64 [1] dropout seed (device memory), loaded iff HAS_DROPOUT
    dropout_p, dropout_scale,
    HAS_RESIDUAL: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_DSUM: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, NEED_DXB: tl.constexpr,
    OFFSET_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Column sums for the looped backward: grid (cdiv(N, BLOCK_N), G); program (j, g) sums
    column block j over row blocks g, g + G, ... into row g of the partial buffers. dinput_bias is
    summed from the fp32 d_input, recomputed from the stored row terms (not from the rounded
    d_input tensor)."""
    seed = load_seed(SEED, HAS_DROPOUT)  # read on the device: no host sync
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    n_progs = tl.num_programs(1)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                        # [BN]
    cols = o_n[None, :]                                                  # [1, BN]
    m_n = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=m_n, other=0.0).to(tl.float32)        # [1, BN]
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dxb_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for rb in range(pid_g, tl.cdiv(M, BLOCK_M), n_progs):
        o_m = tl.cast(rb, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_m = o_m < M
        rows = o_m[:, None]                                              # [BM, 1]
        mask = m_m[:, None] & m_n                                        # [BM, BN]
        dy = tl.load(DY + rows * stride_dym + cols * stride_dyn, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        if NEED_DB:
            db_acc += dy
        if NEED_DW or NEED_DXB:
            keep = mask
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, rows, cols, N, dropout_p, OFFSET_64)
            s = _pre_norm_sum(X, stride_xm, stride_xn, R, stride_rm, stride_rn, XB, rows, cols,
                              m_n, mask, keep, dropout_scale,
                              HAS_RESIDUAL, HAS_INPUT_BIAS, HAS_DROPOUT)
            mean = tl.load(MEAN + o_m, mask=m_m, other=0.0)[:, None]    # [BM, 1]
            rstd = tl.load(RSTD + o_m, mask=m_m, other=0.0)[:, None]
            xhat = tl.where(mask, (s - mean) * rstd, 0.0)                # [BM, BN]
            if NEED_DW:
                dw_acc += dy * xhat
            if NEED_DXB:
                if HAS_WEIGHT:
                    g = dy * w
                else:
                    g = dy
                c1 = tl.load(C1 + o_m, mask=m_m, other=0.0)[:, None]
                c2 = tl.load(C2 + o_m, mask=m_m, other=0.0)[:, None]
                ds = (g - c2 - xhat * c1) * rstd
                if HAS_DSUM:
                    ds += tl.load(DSUM + rows * stride_dsm + cols * stride_dsn, mask=mask,
                                  other=0.0).to(tl.float32)
                if HAS_DROPOUT:
                    ds = tl.where(keep, ds * dropout_scale, 0.0)
                dxb_acc += tl.where(mask, ds, 0.0)
    o_part = tl.cast(pid_g, tl.int64) * N + o_n
    if NEED_DW:
        tl.store(DW_PART + o_part, tl.sum(dw_acc, axis=0), mask=o_n < N)
    if NEED_DB:
        tl.store(DB_PART + o_part, tl.sum(db_acc, axis=0), mask=o_n < N)
    if NEED_DXB:
        tl.store(DXB_PART + o_part, tl.sum(dxb_acc, axis=0), mask=o_n < N)


@triton.jit
def _dropout_keep_mask_kernel(
    MASK,                           # out: [M, N] contiguous, uint8 (1 = kept)
    M, N,
    SEED,                           # int64 [1] dropout seed (device memory)
    dropout_p,
    OFFSET_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seed = tl.load(SEED)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    o_m = tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = o_m[:, None]                                                  # [BM, 1]
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]            # [1, BN]
    mask = (rows < M) & (cols < N)
    keep = _dropout_keep(seed, rows, cols, N, dropout_p, OFFSET_64)
    tl.store(MASK + rows * N + cols, keep.to(tl.uint8), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
_INT32_MAX = 2 ** 31 - 1


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: a couple of programs, so the partial-sum reduction is exercised


def _rows(t: Tensor, n: int) -> Tensor:
    """View ``t`` (..., n) as [M, n] without copying when its strides allow it (the leading dims
    merge into one row stride; the trailing normalised dims into one column stride). Only layouts
    that no (row stride, column stride) pair can express (e.g. a transposed batch) are copied, and
    so is a row whose extent would overflow int32 in-row offsets."""
    t2 = t.reshape(-1, n)  # a view when possible, otherwise a contiguous copy
    if n > 1 and abs(t2.stride(1)) * (n - 1) > _INT32_MAX:
        t2 = t2.contiguous()
    return t2


def _vec(p: Optional[Tensor], n: int) -> Optional[Tensor]:
    """A parameter (normalized_shape) as a contiguous [n] vector (copied only when strided)."""
    return None if p is None else p.reshape(n).contiguous()


def _one_pass_config(n: int, tile: int = TILE_ELEMS,
                     elems_per_thread: int = 16) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the one-pass kernels; see the module docstring."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(MAX_BLOCK_M, tile // block_n))
    num_warps = max(1, min(32, block_m * block_n // (32 * elems_per_thread)))
    return block_m, block_n, num_warps


def _offset_64(m: int, n: int) -> bool:
    return m * n > _INT32_MAX


def layer_norm_fwd(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    *,
    norm_ndim: int = 1,
    residual: Optional[Tensor] = None,
    input_bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
    store_sum: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """LayerNorm of ``s = dropout(x + input_bias) + residual`` over the last ``norm_ndim`` dims.

    Shapes: x, residual (..., *norm_shape) with N = prod(norm_shape); weight, bias, input_bias
    norm_shape (any dtype). Returns ``(out, pre_norm_sum, mean, rstd)``: out (x's shape, contiguous,
    in the promoted dtype of x and residual: a bf16 x with an fp32 residual gives fp32, each read
    in its own dtype), pre_norm_sum (same, or None unless ``store_sum``), mean and rstd [M] fp32.
    Dropout keeps element (row, col) of the [M, N] row matrix iff rand(seed, row * N + col) >= p;
    ``seed`` is an int64 (1,) tensor on x's device (e.g. from ``fastbert._rng.dropout_seed``) that
    the kernels load on the device (the host never reads it); ignored (may be None) when p == 0.
    ``out_dtype``: the output's dtype instead (plain LayerNorm under CUDA autocast: a 16-bit x
    normalised into fp32).
    """
    shape = x.shape
    n = math.prod(shape[x.dim() - norm_ndim:])
    m = x.numel() // n if n > 0 else math.prod(shape[:x.dim() - norm_ndim])
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty(shape, dtype=out_dtype or dtype, device=x.device)
    s_out = torch.empty(shape, dtype=dtype, device=x.device) if store_sum else None
    mean = torch.empty((m,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        mean.fill_(float("nan"))  # statistics of an empty row, as torch's mean of nothing
        rstd.fill_(float("nan"))
        return y, s_out, mean, rstd
    x2 = _rows(x, n)
    r2 = _rows(residual, n) if residual is not None else x2
    w, b, xb = _vec(weight, n), _vec(bias, n), _vec(input_bias, n)
    has_dropout = dropout_p > 0.0
    common = dict(
        HAS_RESIDUAL=residual is not None, HAS_INPUT_BIAS=xb is not None, HAS_DROPOUT=has_dropout,
        HAS_WEIGHT=w is not None, HAS_BIAS=b is not None, STORE_SUM=store_sum,
        OFFSET_64=_offset_64(m, n),
    )
    args = (x2, x2.stride(0), x2.stride(1), r2, r2.stride(0), r2.stride(1),
            xb if xb is not None else x2, w if w is not None else x2, b if b is not None else x2,
            y, s_out if s_out is not None else y, mean, rstd,
            m, n, float(eps), seed_arg(seed, dropout_p, x2), float(dropout_p),
            keep_scale(dropout_p))
    if n <= MAX_FUSED_N:
        block_m, block_n, num_warps = _one_pass_config(n)
        grid = (triton.cdiv(m, block_m),)
        _layer_norm_fwd_kernel[grid](*args, **common, BLOCK_M=block_m, BLOCK_N=block_n,
                                     num_warps=num_warps)
    else:
        _layer_norm_fwd_looped_kernel[(m,)](*args, **common, BLOCK_M=1, BLOCK_N=LOOPED_BLOCK_N,
                                            num_warps=LOOPED_NUM_WARPS)
    return y, s_out, mean, rstd


def layer_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    *,
    norm_ndim: int = 1,
    residual: Optional[Tensor] = None,
    input_bias: Optional[Tensor] = None,
    dsum: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
    need_dinput: bool = True,
    need_dweight: bool = False,
    need_dbias: bool = False,
    need_dinput_bias: bool = False,
    param_dtypes: Tuple[Optional[torch.dtype], ...] = (None, None, None),
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Backward of :func:`layer_norm_fwd`, given its inputs (the pre-norm sum is recomputed in
    fp32 from x, input_bias, the dropout ``seed`` (the forward's seed tensor) and residual) and
    its mean / rstd.

    Shapes: dy, x, residual, dsum (..., *norm_shape), any strides; mean, rstd [M]. ``dsum`` is the
    gradient of the returned pre-norm sum (add_layer_norm with return_residual). ``param_dtypes``
    are the dtypes of (weight, bias, input_bias) for their gradients (x's dtype where None).

    Returns ``(ds, dinput, dweight, dbias, dinput_bias)``: ds = grad of the pre-norm sum (= dx of
    layer_norm, and the residual's gradient of add_layer_norm), x's shape, the residual's dtype (x's
    without one), contiguous; dinput the input's gradient in x's dtype, stored under dropout or
    when x's dtype is not the residual's (under dropout if ``need_dinput`` or ``need_dinput_bias``,
    else if ``need_dinput``; None otherwise: it equals ds); the column sums, shape norm_shape, or
    None where not requested.
    """
    shape = x.shape
    norm_shape = shape[x.dim() - norm_ndim:]
    n = math.prod(norm_shape)
    m = x.numel() // n if n > 0 else math.prod(shape[:x.dim() - norm_ndim])
    device = x.device
    has_dropout = dropout_p > 0.0
    ds_dtype = x.dtype if residual is None else residual.dtype
    store_dx = ((has_dropout and (need_dinput or need_dinput_bias))
                or (ds_dtype != x.dtype and need_dinput))
    ds = torch.empty(shape, dtype=ds_dtype, device=device)
    dx = torch.empty(shape, dtype=x.dtype, device=device) if store_dx else None
    need = (need_dweight, need_dbias, need_dinput_bias)

    def finish(parts):
        # deterministic second stage: [G, N] fp32 partials -> [N] in the parameter's dtype
        outs = [part.sum(0).to(dt or x.dtype).reshape(norm_shape) if flag else None
                for flag, part, dt in zip(need, parts, param_dtypes)]
        return (ds, dx, *outs)

    if m == 0 or n == 0:
        return finish([torch.zeros((1, n), dtype=torch.float32, device=device)] * 3)
    dy2, x2 = _rows(dy, n), _rows(x, n)
    r2 = _rows(residual, n) if residual is not None else x2
    dsum2 = _rows(dsum, n) if dsum is not None else dy2
    w, xb = _vec(weight, n), _vec(input_bias, n)
    flags = dict(HAS_RESIDUAL=residual is not None, HAS_INPUT_BIAS=xb is not None,
                 HAS_DROPOUT=has_dropout, OFFSET_64=_offset_64(m, n))
    inputs = (x2, x2.stride(0), x2.stride(1), r2, r2.stride(0), r2.stride(1),
              xb if xb is not None else x2)
    rng = (seed_arg(seed, dropout_p, x2), float(dropout_p), keep_scale(dropout_p))
    sms = _num_sms(device)
    if n <= MAX_FUSED_N:
        block_m, block_n, num_warps = _one_pass_config(n, BWD_TILE_ELEMS, BWD_ELEMS_PER_THREAD)
        g = max(1, min(triton.cdiv(m, block_m), sms * max(1, 16 // num_warps)))
        parts = [torch.empty((g, n), dtype=torch.float32, device=device) if f else ds for f in need]
        _layer_norm_bwd_kernel[(g,)](
            dy2, dy2.stride(0), dy2.stride(1), dsum2, dsum2.stride(0), dsum2.stride(1), *inputs,
            w if w is not None else x2, mean, rstd, ds, dx if dx is not None else ds, *parts,
            m, n, *rng, **flags, HAS_WEIGHT=w is not None, HAS_DSUM=dsum is not None,
            STORE_DX=store_dx, NEED_DW=need_dweight, NEED_DB=need_dbias, NEED_DXB=need_dinput_bias,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        return finish(parts)
    c12 = torch.empty((2, m), dtype=torch.float32, device=device) if need_dinput_bias else mean
    _layer_norm_bwd_looped_kernel[(m,)](
        dy2, dy2.stride(0), dy2.stride(1), dsum2, dsum2.stride(0), dsum2.stride(1), *inputs,
        w if w is not None else x2, mean, rstd, ds, dx if dx is not None else ds, c12[0], c12[-1],
        m, n, *rng, **flags, HAS_WEIGHT=w is not None, HAS_DSUM=dsum is not None,
        STORE_DX=store_dx, STORE_C=need_dinput_bias, BLOCK_M=1, BLOCK_N=LOOPED_BLOCK_N,
        num_warps=LOOPED_NUM_WARPS)
    if not any(need):
        return finish([None] * 3)
    n_col_blocks = triton.cdiv(n, COLS_BLOCK_N)
    g = max(1, min(triton.cdiv(m, COLS_BLOCK_M), triton.cdiv(sms * 4, n_col_blocks)))
    parts = [torch.empty((g, n), dtype=torch.float32, device=device) if f else ds for f in need]
    _layer_norm_bwd_cols_kernel[(n_col_blocks, g)](
        dy2, dy2.stride(0), dy2.stride(1), dsum2, dsum2.stride(0), dsum2.stride(1), *inputs,
        w if w is not None else x2, mean, rstd, c12[0], c12[-1], *parts, m, n, *rng, **flags,
        HAS_WEIGHT=w is not None, HAS_DSUM=dsum is not None,
        NEED_DW=need_dweight, NEED_DB=need_dbias, NEED_DXB=need_dinput_bias,
        BLOCK_M=COLS_BLOCK_M, BLOCK_N=COLS_BLOCK_N, num_warps=8)
    return finish(parts)


def dropout_keep_mask(seed: Tensor, shape, dropout_p: float) -> Tensor:
    """The exact keep-mask (bool, True = kept) that the kernels draw for ``seed`` (the int64 (1,)
    seed tensor of a forward call; the mask is built on its device) over a tensor of ``shape``
    (..., N): element (row, col) of the [M, N] row matrix is kept iff
    rand(seed, row * N + col) >= dropout_p. For tests and references only."""
    check_seed(seed)
    shape = tuple(shape)
    n = shape[-1] if shape else 1
    m = math.prod(shape[:-1]) if shape else 1
    out = torch.empty((m, n), dtype=torch.uint8, device=seed.device)
    if m > 0 and n > 0:
        block_n = min(triton.next_power_of_2(n), 1024)
        block_m = max(1, min(MAX_BLOCK_M, TILE_ELEMS // block_n))
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _dropout_keep_mask_kernel[grid](out, m, n, seed, float(dropout_p),
                                        OFFSET_64=_offset_64(m, n), BLOCK_M=block_m,
                                        BLOCK_N=block_n, num_warps=8)
    return out.view(torch.bool).reshape(shape)
