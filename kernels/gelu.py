"""GELU and bias + GELU in Triton: kernels and launchers.

``y = gelu(x + bias)`` over rows of a ``[M, N]`` matrix (bias [N], optional), exact (erf) or tanh
form, forward and backward; the math is fp32 whatever the storage dtype (fp16, bf16, fp32).

    erf:  gelu(z) = z * Phi(z),  Phi(z) = (1 + erf(z / sqrt 2)) / 2
          gelu'(z) = Phi(z) + z * exp(-z^2 / 2) / sqrt(2 pi)
    tanh: gelu(z) = z / 2 * (1 + t),  t = tanh(u),  u = sqrt(2 / pi) * (z + 0.044715 z^3)
          gelu'(z) = (1 + t) / 2 + z / 2 * (1 - t^2) * sqrt(2 / pi) * (1 + 3 * 0.044715 z^2)

The tanh form is evaluated through sigmoids, ``(1 + t) / 2 = sigmoid(2u)`` and
``(1 - t) / 2 = sigmoid(-2u)``, both from one ``exp(-2|u|)``: no overflow, no NaN for a finite z
(the derivative's polynomial is evaluated on z bounded to 1e4, beyond which its term is 0), and no
cancellation in ``1 - t^2`` where |u| is large (computing ``1 - t * t`` from a rounded ``t`` loses
all its digits there), with only ``tl.exp``, available in every Triton version we support.

The bias gradient is the column sum of dx, reduced deterministically: the backward grid is
``(G, column blocks)``; program (g, j) walks row blocks g, g + G, ... of column block j and writes
its fp32 partial sums to row g of a ``[G, N]`` buffer, which a final ``sum(0)`` reduces. Two runs
on the same GPU model give identical bits; ``G`` follows the SM count, so another model may
differ in the last bits.

Block sizes: timings **not measured** (no GPU in the session that wrote them; tune in
bench/bench_norms.py); register counts from compiling ahead of time for sm_90 (triton.compile +
the bundled ptxas). ``[BLOCK_M, BLOCK_N]`` tiles of ``TILE_ELEMS = 4096`` elements with
``BLOCK_N = min(next_pow2(N), 1024)`` (BERT's 3072-wide intermediate is 3 column blocks of 1024,
4 rows each) and 8 warps = 16 elements per thread, two 16-byte vectors per fp16 tensor: enough
bytes in flight for a memory-bound kernel. Forward: 32-44 registers (erf or tanh). Backward:
74 (tanh) / 98 (erf) registers, so two 8-warp programs per SM stay resident; with a bias the grid
is ``(G, column_blocks)`` with ``G * column_blocks ~= 2 * num_SMs``, so the ``[G, N]`` partials
are < 1% of the traffic at 16384 rows.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["bias_gelu_fwd", "bias_gelu_bwd", "geglu_fwd", "geglu_bwd"]

Tensor = torch.Tensor

TILE_ELEMS = 4096
MAX_BLOCK_N = 1024
MAX_BLOCK_M = 256
NUM_WARPS = 8
_INT32_MAX = 2 ** 31 - 1


@triton.jit
def _sigmoid_pair(a):
    """(sigmoid(a), sigmoid(-a)), each with full relative precision and no overflow."""
    e = tl.exp(-tl.abs(a))                                          # in (0, 1]
    r = 1.0 / (1.0 + e)                                             # sigmoid(|a|)
    pos = a >= 0
    return tl.where(pos, r, e * r), tl.where(pos, e * r, r)


@triton.jit
def _gelu(z, APPROX_TANH: tl.constexpr):
    """gelu(z) for fp32 z."""
    if APPROX_TANH:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)       # sqrt(2 / pi) * (...)
        sp, _ = _sigmoid_pair(2.0 * u)                               # (1 + tanh(u)) / 2
        y = z * sp
    else:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # z / sqrt(2)
    return y


@triton.jit
def _gelu_and_grad(z, APPROX_TANH: tl.constexpr):
    """(gelu(z), d gelu(z) / dz) for fp32 z, sharing their common terms."""
    if APPROX_TANH:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        sp, sn = _sigmoid_pair(2.0 * u)                              # (1 + t) / 2, (1 - t) / 2
        # the second term is exactly 0 once |z| >= 1e4 (sp * sn underflows); z is bounded in it so
        # that z * du cannot reach inf and give 0 * inf = NaN for a finite z (|z| > 1.9e19), and
        # (z - z) keeps the NaN of an infinite z, as torch and the float64 reference give
        zb = tl.minimum(tl.maximum(z, -1.0e4), 1.0e4)
        du = 0.7978845608028654 * (1.0 + 0.134145 * zb * zb)        # 3 * 0.044715 = 0.134145
        y = z * sp
        d = sp + 2.0 * zb * sp * sn * du + (z - z)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327            # 1 / sqrt(2 pi)
        y = z * cdf
        d = cdf + z * pdf
    return y, d


@triton.jit
def _bias_gelu_fwd_kernel(
    X, stride_xm, stride_xn,        # input [M, N], any strides
    BIAS,                           # bias [N] contiguous, any float dtype (HAS_BIAS)
    Y,                              # out [M, N] contiguous, input dtype
    M, N,
    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),): one [BM, BN] tile per program (one flat axis:
    a second one would be limited to 65535 column blocks)."""
    n_col = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // n_col
    pid_n = tl.program_id(0) % n_col
    rows = (tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]  # [BM, 1] int64
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]                      # [1, BN]
    m_n = cols < N
    mask = (rows < M) & m_n                                                        # [BM, BN]
    z = tl.load(X + rows * stride_xm + cols * stride_xn, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS + cols, mask=m_n, other=0.0).to(tl.float32)
    y = _gelu(z, APPROX_TANH)
    tl.store(Y + rows * N + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY, stride_dym, stride_dyn,     # grad of out [M, N], any strides
    X, stride_xm, stride_xn,        # forward input [M, N], any strides
    BIAS,                           # bias [N] (HAS_BIAS)
    DX,                             # out: grad of input [M, N] contiguous, input dtype
    DB_PART,                        # out: partial column sums of dx [G, N] fp32 (NEED_DBIAS)
    M, N, G,                        # G: row groups
    HAS_BIAS: tl.constexpr, NEED_DBIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (G * cdiv(N, BLOCK_N),), one flat axis: program (g, j) handles column block j of row
    blocks g, g + G, ...; its dbias partial accumulates in a [BM, BN] fp32 register tile."""
    pid_g = tl.program_id(0) % G
    n_progs = G
    pid_n = tl.program_id(0) // G
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                                  # [BN]
    cols = o_n[None, :]                                                            # [1, BN]
    m_n = cols < N
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=m_n, other=0.0).to(tl.float32)               # [1, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for rb in range(pid_g, tl.cdiv(M, BLOCK_M), n_progs):
        rows = (tl.cast(rb, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]  # [BM, 1]
        mask = (rows < M) & m_n                                                    # [BM, BN]
        z = tl.load(X + rows * stride_xm + cols * stride_xn, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += b
        dy = tl.load(DY + rows * stride_dym + cols * stride_dyn, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        dx = dy * _gelu_and_grad(z, APPROX_TANH)[1]                                # 0 where masked
        tl.store(DX + rows * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DBIAS:
            acc += dx
    if NEED_DBIAS:
        tl.store(DB_PART + tl.cast(pid_g, tl.int64) * N + o_n, tl.sum(acc, axis=0), mask=o_n < N)


@triton.jit
def _geglu_kernel(
    A, stride_am, stride_an,        # the GELU input [M, N], any strides
    G, stride_gm, stride_gn,        # the gate [M, N], any strides
    DY, stride_dym, stride_dyn,     # backward: grad of the output [M, N], any strides
    OUT, stride_om,                 # forward: y; backward: grad of a [M, N], unit column stride
    DG, stride_dgm,                 # backward: grad of g [M, N], unit column stride (with OUT, the
    M, N,                           # two halves of one [M, 2N] buffer when the input was packed)
    BWD: tl.constexpr, APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Forward y = gelu(a) * g; backward da = dy * g * gelu'(a), dg = dy * gelu(a) (gelu
    recomputed). Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),): one [BM, BN] tile per program."""
    n_col = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = tl.program_id(0) // n_col, tl.program_id(0) % n_col
    rows = (tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rows < M) & (cols < N)
    a = tl.load(A + rows * stride_am + cols * stride_an, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows * stride_gm + cols * stride_gn, mask=mask, other=0.0).to(tl.float32)
    if BWD:
        dy = tl.load(DY + rows * stride_dym + cols * stride_dyn, mask=mask, other=0.0).to(tl.float32)
        y, d = _gelu_and_grad(a, APPROX_TANH)
        tl.store(OUT + rows * stride_om + cols, (dy * g * d).to(OUT.dtype.element_ty), mask=mask)
        tl.store(DG + rows * stride_dgm + cols, (dy * y).to(DG.dtype.element_ty), mask=mask)
    else:
        y = _gelu(a, APPROX_TANH) * g
        tl.store(OUT + rows * stride_om + cols, y.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _rows(t: Tensor) -> Tensor:
    """``t`` as [M, N] rows over its last dim (a 0-d tensor is one 1-wide row). A view when the
    leading dims merge into one row stride; a contiguous copy only for layouts that no
    (row stride, column stride) pair can express, or whose row extent overflows int32."""
    t2 = t.reshape(1, 1) if t.dim() == 0 else t.reshape(-1, t.shape[-1])
    if t2.shape[1] > 1 and t2.stride(1) * (t2.shape[1] - 1) > _INT32_MAX:
        t2 = t2.contiguous()
    return t2


def _config(n: int) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for rows of width n: a tile of about TILE_ELEMS elements whose column
    block wastes little of the last block of each row. The widest power of two from 1024 down to
    128 whose padding of n is at most n / 8 (least padding if none is): 1152 (ModernBERT-base's
    MLP) gets 256, where 1024 would leave 7/8 of every second column block masked; 768 gets 256;
    3072 and 4096 get 1024. Widths under 128 take one block of next_power_of_2(n)."""
    top = min(triton.next_power_of_2(n), MAX_BLOCK_N)
    candidates = [bn for bn in (1024, 512, 256, 128) if bn <= top] or [top]
    waste = {bn: triton.cdiv(n, bn) * bn - n for bn in candidates}
    fits = [bn for bn in candidates if 8 * waste[bn] <= n]
    block_n = fits[0] if fits else min(candidates, key=lambda bn: (waste[bn], -bn))
    block_m = max(1, min(MAX_BLOCK_M, TILE_ELEMS // block_n))
    return block_m, block_n


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: a couple of row groups, so the partial-sum reduction is exercised


def bias_gelu_fwd(x: Tensor, bias: Optional[Tensor], approximate: str = "none") -> Tensor:
    """gelu(x + bias). Shapes: x (..., N) any strides (0-d allowed without bias), bias (N,) any
    float dtype or None -> x's shape and dtype, contiguous."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    x2 = _rows(x)
    m, n = x2.shape
    b = bias.contiguous() if bias is not None else None
    block_m, block_n = _config(n)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _bias_gelu_fwd_kernel[grid](x2, x2.stride(0), x2.stride(1), b if b is not None else x2, y, m, n,
                                HAS_BIAS=b is not None, APPROX_TANH=approximate == "tanh",
                                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS)
    return y


def bias_gelu_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str = "none",
                  need_dbias: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """Backward of :func:`bias_gelu_fwd`. Shapes: dy, x (..., N) any strides, bias (N,) or None.
    Returns (dx: x's shape and dtype, contiguous; dbias: (N,) in bias's dtype, or None unless
    ``need_dbias``), dbias = column sum of dx accumulated in fp32, deterministically."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.shape[-1] if x.dim() > 0 else 1
    need_dbias = need_dbias and bias is not None
    if x.numel() == 0:
        return dx, (torch.zeros((n,), dtype=bias.dtype, device=x.device) if need_dbias else None)
    x2, dy2 = _rows(x), _rows(dy)
    m = x2.shape[0]
    b = bias.contiguous() if bias is not None else None
    block_m, block_n = _config(n)
    n_col_blocks = triton.cdiv(n, block_n)
    row_blocks = triton.cdiv(m, block_m)
    if need_dbias:
        g = max(1, min(row_blocks, triton.cdiv(2 * _num_sms(x.device), n_col_blocks)))
        part = torch.empty((g, n), dtype=torch.float32, device=x.device)
    else:
        g, part = row_blocks, dx  # no reduction: one row block per program
    _bias_gelu_bwd_kernel[(g * n_col_blocks,)](
        dy2, dy2.stride(0), dy2.stride(1), x2, x2.stride(0), x2.stride(1),
        b if b is not None else x2, dx, part, m, n, g,
        HAS_BIAS=b is not None, NEED_DBIAS=need_dbias, APPROX_TANH=approximate == "tanh",
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS)
    return dx, (part.sum(0).to(bias.dtype) if need_dbias else None)


def _halves(x: Tensor, gate: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(activated half, gate) as views: ``x`` (..., 2N) split on its last dim when ``gate`` is None."""
    if gate is not None:
        return x, gate
    n = x.shape[-1] // 2
    return x[..., :n], x[..., n:]


def _launch_geglu(a: Tensor, g: Tensor, out: Tensor, approximate: str, dy: Optional[Tensor] = None,
                  dg: Optional[Tensor] = None) -> None:
    """The forward (dy None: out = gelu(a) * g) or backward (out = da, and dg) over [..., N] views."""
    a2, g2, out2 = _rows(a), _rows(g), _rows(out)
    dy2 = _rows(dy) if dy is not None else a2
    dg2 = _rows(dg) if dg is not None else out2
    # the outputs are views of fresh contiguous tensors, which _rows never copies
    assert out2.data_ptr() == out.data_ptr() and (dg is None or dg2.data_ptr() == dg.data_ptr())
    m, n = a2.shape
    block_m, block_n = _config(n)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _geglu_kernel[grid](a2, a2.stride(0), a2.stride(1), g2, g2.stride(0), g2.stride(1),
                        dy2, dy2.stride(0), dy2.stride(1), out2, out2.stride(0), dg2, dg2.stride(0),
                        m, n, BWD=dy is not None, APPROX_TANH=approximate == "tanh",
                        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS)


def geglu_fwd(x: Tensor, gate: Optional[Tensor], approximate: str = "none") -> Tensor:
    """gelu(a) * g. Shapes: x (..., N) and gate (..., N), or x (..., 2N) holding (a, g) and gate
    None; any strides, one dtype -> (..., N) in that dtype, contiguous."""
    a, g = _halves(x, gate)
    y = torch.empty(a.shape, dtype=x.dtype, device=x.device)
    if y.numel() > 0:
        _launch_geglu(a, g, y, approximate)
    return y


def geglu_bwd(dy: Tensor, x: Tensor, gate: Optional[Tensor],
              approximate: str = "none") -> Tuple[Tensor, Optional[Tensor]]:
    """Backward of :func:`geglu_fwd` -> (dx, dgate): with a gate, each of its input's shape; packed
    (gate None), dx of x's shape (..., 2N) holding both halves' gradients and dgate None. The
    results are contiguous, in x's dtype."""
    a, g = _halves(x, gate)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dgate = torch.empty(g.shape, dtype=g.dtype, device=g.device) if gate is not None else None
    da, dg = _halves(dx, dgate)  # views of fresh contiguous tensors: written in place
    if a.numel() > 0:
        _launch_geglu(a, g, da, approximate, dy=dy, dg=dg)
    return dx, dgate
