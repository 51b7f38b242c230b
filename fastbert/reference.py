"""Pure-PyTorch reference implementations of every fastbert op.

This module is the ground truth of the test suite and the ``backend="torch"`` fallback. It is
written for reading, not for speed: plain matmuls, softmax and elementwise math, no fused torch
kernels (no SDPA, no ``F.layer_norm``). Every function is differentiable with autograd.

Precision: each function computes in ``compute_dtype`` (default: float64 for float64 inputs,
float32 otherwise) and returns its result in the dtype of the input, so
``reference.layer_norm(x.double(), ...)`` is an fp64 reference and ``reference.layer_norm(x, ...)``
on fp16 ``x`` is an fp32-accumulated one.

Dropout: functions that take ``dropout_p`` also take ``dropout_mask``, a bool tensor that is True
where an element is *kept*. When it is given, it is used (scaled by ``1 / (1 - dropout_p)``); when
it is not and ``dropout_p > 0``, a fresh mask is drawn from torch's default generator. Tests use
the explicit mask to check a kernel's dropout exactly.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "attention_probs",
    "scaled_dot_product_attention",
    "varlen_attention",
    "repeat_kv_heads",
    "alibi_bias",
    "with_alibi",
    "window_mask",
    "with_window",
    "block_sparse_attention",
    "linformer_attention",
    "layout_to_mask",
    "layer_norm",
    "add_layer_norm",
    "gelu",
    "bias_gelu",
    "geglu",
]


def _compute_dtype(t: Tensor, compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _apply_dropout(x: Tensor, p: float, mask: Optional[Tensor]) -> Tensor:
    if p == 0.0 and mask is None:
        return x
    if p == 1.0:  # everything dropped (torch: input * 0, so NaN stays NaN)
        return x * 0.0
    if mask is None:
        mask = torch.rand(x.shape, device=x.device) >= p
    return x * mask.to(x.dtype) / (1.0 - p)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
def attention_probs(
    query: Tensor,
    key: Tensor,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    *,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """The attention weights softmax(Q K^T * scale + mask), before dropout, in the compute dtype.

    Shapes: query (..., Lq, D), key (..., Lk, D) -> (..., Lq, Lk). Mask and causal semantics as in
    :func:`scaled_dot_product_attention`; a row whose every key is masked gets all-zero weights.
    """
    cdt = _compute_dtype(query, compute_dtype)
    q, k = query.to(cdt), key.to(cdt)
    lq, lk = q.shape[-2], k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # [..., Lq, D] @ [..., D, Lk] -> [..., Lq, Lk]

    keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if is_causal:
        keep = torch.tril(keep)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = keep & attn_mask
        else:
            scores = scores + attn_mask.to(cdt)
    keep = keep.expand_as(scores)
    if lk == 0:  # no key at all: every row is fully masked (empty weights; P V is then zeros)
        return scores
    # A row is "alive" when at least one key takes part; -inf additive entries also remove keys.
    # A +inf logit makes its row NaN (exp(inf - inf)), as in torch's softmax; so does a NaN one.
    scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    alive = row_max != float("-inf")
    row_max = torch.where(alive, row_max, torch.zeros_like(row_max)).detach()
    exp = torch.exp(scores - row_max)  # exp(-inf) = 0 for masked keys
    denom = exp.sum(dim=-1, keepdim=True)
    return exp / torch.where(alive, denom, torch.ones_like(denom))


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    alibi_slopes: Optional[Tensor] = None,
    window_size: Optional[Tuple[int, int]] = None,
    dropout_mask: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """softmax(Q K^T * scale + mask) V, with SDPA's semantics.

    Shapes: query (..., Lq, D), key (..., Lk, D), value (..., Lk, Dv) -> (..., Lq, Dv); in
    fastbert the leading dims are (B, H). ``attn_mask`` broadcasts to (..., Lq, Lk): bool is True
    where a key takes part, float is added to the scores. ``is_causal`` keeps key j for query i
    iff j <= i (top-left aligned). ``scale`` defaults to 1/sqrt(D). ``enable_gqa``: key and value
    may have fewer heads (dim -3) than query, a divisor of its count; query head h then uses key /
    value head h // (H / Hkv) (grouped-query attention, as torch's ``enable_gqa``).
    ``alibi_slopes`` (H,) or (B, H): ALiBi, ``- slope * |i - j|`` added to the score of query i and
    key j (see :func:`alibi_bias`), on top of ``attn_mask``. ``window_size`` (left, right): query i
    sees keys i - left .. i + right only (-1: unbounded; see :func:`window_mask`).

    A query row whose every key is masked out returns 0 (and gets zero gradient), never NaN (as
    torch's SDPA math path in recent versions; ``nn.MultiheadAttention`` gives NaN). ``dropout_mask`` (bool, broadcastable to (..., Lq, Lk), True = keep) fixes
    which attention probabilities dropout keeps.
    """
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        key, value = repeat_kv_heads(key, value, query.shape[-3], dim=-3)
    cdt = _compute_dtype(query, compute_dtype)
    if window_size is not None:
        attn_mask = with_window(attn_mask, window_size, query.shape[-2], key.shape[-2],
                                query.device)
    if alibi_slopes is not None:
        attn_mask = with_alibi(attn_mask, alibi_slopes, query.shape[-2], key.shape[-2], cdt)
    probs = attention_probs(query, key, attn_mask, is_causal, scale, compute_dtype=cdt)
    probs = _apply_dropout(probs, dropout_p, dropout_mask)
    out = torch.matmul(probs, value.to(cdt))  # [..., Lq, Lk] @ [..., Lk, Dv] -> [..., Lq, Dv]
    return out.to(query.dtype)


def alibi_bias(slopes: Tensor, lq: int, lk: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The ALiBi bias ``- slope * |i - j|`` for query i and key j: slopes (H,) -> (H, Lq, Lk),
    (B, H) -> (B, H, Lq, Lk). Symmetric (bidirectional encoders: MosaicBERT, Jina-BERT) and aligned
    top-left like ``is_causal`` (FlashAttention aligns it bottom-right when Lq != Lk)."""
    dtype = slopes.dtype if dtype is None else dtype
    i = torch.arange(lq, device=slopes.device, dtype=dtype)[:, None]
    j = torch.arange(lk, device=slopes.device, dtype=dtype)[None, :]
    return -slopes.to(dtype)[..., None, None] * (i - j).abs()


def with_alibi(attn_mask: Optional[Tensor], slopes: Tensor, lq: int, lk: int,
               dtype: torch.dtype) -> Tensor:
    """``attn_mask`` (None, bool or float) with the ALiBi bias added, as one float mask."""
    bias = alibi_bias(slopes, lq, lk, dtype)
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        return bias.masked_fill(~attn_mask, float("-inf"))
    return attn_mask.to(dtype) + bias


def window_mask(window_size: Tuple[int, int], lq: int, lk: int,
                device: Optional[torch.device] = None) -> Tensor:
    """(Lq, Lk) bool, True where key j lies in query i's sliding window: ``i - left <= j <= i + right``
    (``window_size = (left, right)``; -1: unbounded on that side). Aligned top-left like
    ``is_causal``; ModernBERT's local layers use (64, 64), FlashAttention's ``window_size``."""
    left, right = window_size
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def with_window(attn_mask: Optional[Tensor], window_size: Tuple[int, int], lq: int, lk: int,
                device: Optional[torch.device] = None) -> Tensor:
    """``attn_mask`` (None, bool or float) restricted to the sliding window."""
    keep = window_mask(window_size, lq, lk, attn_mask.device if attn_mask is not None else device)
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.masked_fill(~keep, float("-inf"))


def repeat_kv_heads(key: Tensor, value: Tensor, num_heads: int, dim: int) -> Tuple[Tensor, Tensor]:
    """Key and value with each of their heads (along ``dim``) repeated to ``num_heads`` query heads:
    head h of the result is head h // (num_heads / Hkv) of the input (grouped-query attention)."""
    group = num_heads // key.shape[dim]
    return key.repeat_interleave(group, dim=dim), value.repeat_interleave(group, dim=dim)


def zeros_in_graph(shape: Tuple[int, ...], *inputs: Tensor) -> Tensor:
    """Zeros of ``shape`` in the last input's dtype, attached to the autograd graph of ``inputs``
    with zero gradients (attention with nothing to attend to). Each input enters as a sum over an
    empty slice of it: exactly 0 whatever it holds (an inf or NaN in a query row must not reach
    the others)."""
    out = inputs[-1].new_zeros(shape)
    for t in inputs:
        out = out + t.narrow(-1, 0, 0).sum()
    return out


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    *,
    compute_dtype: Optional[torch.dtype] = None,
    alibi_slopes: Optional[Tensor] = None,
    window_size: Optional[Tuple[int, int]] = None,
    dropout_mask: Optional[Sequence[Tensor]] = None,
    attn_mask: Optional[Tensor] = None,
) -> Tensor:
    """Attention over packed variable-length sequences (FlashAttention's varlen convention).

    Shapes: q (total_q, H, D), k (total_k, H, D), v (total_k, H, Dv), cu_seqlens_* (N + 1,) int32
    cumulative lengths starting at 0 -> (total_q, H, Dv). Sequence i owns rows
    ``cu_seqlens[i]:cu_seqlens[i+1]``; causal is top-left aligned within each sequence.
    ``max_seqlen_*`` are accepted for API compatibility; the reference does not need them. k and
    v may have fewer heads than q, a divisor of its count (grouped-query attention).
    ``alibi_slopes`` (H,) or (N, H): ALiBi within each sequence; ``window_size`` likewise.
    ``dropout_mask``: one bool keep-mask per sequence, broadcastable to (H, Lq_i, Lk_i) (e.g. the
    kernels' masks from ``fastbert.kernels.attention.varlen_attention_dropout_masks``).
    ``attn_mask`` broadcastable to (N, H, Lq_max, Lk_max), bool (True = attend) or float (added):
    sequence i uses ``attn_mask[i or 0, :, :Lq_i, :Lk_i]``, positions within the sequence.
    An empty sequence (no query or no key) gives 0, with zero gradients for its tokens.
    """
    if dropout_mask is not None and len(dropout_mask) != cu_seqlens_q.numel() - 1:
        raise ValueError(f"dropout_mask must hold one mask per sequence "
                         f"({cu_seqlens_q.numel() - 1}), got {len(dropout_mask)}")
    if k.shape[1] != q.shape[1]:
        k, v = repeat_kv_heads(k, v, q.shape[1], dim=1)
    outs = []
    n = cu_seqlens_q.numel() - 1
    # a float mask stays in the graph even where no sequence reads it (zero gradient, not none)
    extra = [attn_mask] if attn_mask is not None and attn_mask.is_floating_point() else []
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    for i in range(n):
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)  # [H, Lq_i, D]
        ki = k[ck[i]:ck[i + 1]].transpose(0, 1)
        vi = v[ck[i]:ck[i + 1]].transpose(0, 1)
        if qi.shape[1] == 0 or ki.shape[1] == 0:  # empty sequence: nothing to attend, output 0
            # (its tokens stay in the graph: zero gradients rather than none)
            oi = zeros_in_graph((vi.shape[0], qi.shape[1], vi.shape[-1]), *extra, qi, ki, vi)
        else:
            slopes = None
            if alibi_slopes is not None:
                slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[i]
            mi = None
            if attn_mask is not None:
                m4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
                mi = m4[i if m4.shape[0] > 1 else 0, :, :qi.shape[1], :ki.shape[1]]
            oi = scaled_dot_product_attention(qi, ki, vi, mi, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, alibi_slopes=slopes,
                                              window_size=window_size,
                                              compute_dtype=compute_dtype,
                                              dropout_mask=None if dropout_mask is None
                                              else dropout_mask[i])
        outs.append(oi.transpose(0, 1))
    if not outs:
        return zeros_in_graph((0,) + tuple(q.shape[1:-1]) + (v.shape[-1],), *extra, q, k, v)
    return torch.cat(outs, dim=0)


def layout_to_mask(layout: Tensor, block_size: int, lq: int, lk: int) -> Tensor:
    """Expand a block layout (H or 1, nbq, nbk) to a token mask (H or 1, lq, lk), True = attend:
    token (i, j) takes layout[..., i // block_size, j // block_size]."""
    rows = torch.arange(lq, device=layout.device) // block_size
    cols = torch.arange(lk, device=layout.device) // block_size
    return layout[..., rows[:, None], cols[None, :]]


def block_sparse_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: Tensor,
    block_size: int = 64,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    *,
    dropout_mask: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Block-sparse attention: query block i sees key block j iff ``layout[h, i, j]``.

    Shapes: query (B, H, Lq, D), key/value (B, H, Lk, D), layout bool (H or 1, ceil(Lq/bs),
    ceil(Lk/bs)) -> (B, H, Lq, D). ``attn_mask`` (SDPA semantics) is combined with the layout.
    The reference expands the layout to a dense token mask.
    """
    lq, lk = query.shape[-2], key.shape[-2]
    mask = layout_to_mask(layout.bool(), block_size, lq, lk).unsqueeze(0)  # [1, H|1, Lq, Lk]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            mask = mask & attn_mask
        else:
            cdt = _compute_dtype(query, compute_dtype)
            neg_inf = torch.tensor(float("-inf"), dtype=cdt, device=query.device)
            mask = torch.where(mask, attn_mask.to(cdt), neg_inf)
    return scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                        scale=scale, dropout_mask=dropout_mask,
                                        compute_dtype=compute_dtype)


def linformer_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    proj_k: Tensor,
    proj_v: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    *,
    dropout_mask: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Linformer attention (Wang et al., 2020).

    Shapes: query (B, H, Lq, D), key (B, H, Lk, D), value (B, H, Lk, Dv), proj_k/proj_v (k, Lk) or
    (H, k, Lk), key_padding_mask (B, Lk) bool, True = padding -> (B, H, Lq, Dv) (value's head dim).

    K' = E K and V' = F V project the keys and values along the sequence axis to k rows
    (padded positions are zeroed first, so they contribute nothing), then
    out = softmax(Q K'^T * scale) V'.
    """
    cdt = _compute_dtype(query, compute_dtype)
    k, v = key.to(cdt), value.to(cdt)
    if key_padding_mask is not None:
        # where(), not a product: padded positions contribute nothing, even when they hold NaN.
        keep = (~key_padding_mask.bool())[:, None, :, None]  # [B, 1, Lk, 1]
        k = torch.where(keep, k, torch.zeros((), dtype=cdt, device=k.device))
        v = torch.where(keep, v, torch.zeros((), dtype=cdt, device=v.device))
    e, f = proj_k.to(cdt), proj_v.to(cdt)
    if e.dim() == 2:
        e = e.unsqueeze(0)
    if f.dim() == 2:
        f = f.unsqueeze(0)
    k_proj = torch.matmul(e.unsqueeze(0), k)  # [1, H|1, k, Lk] @ [B, H, Lk, D] -> [B, H, k, D]
    v_proj = torch.matmul(f.unsqueeze(0), v)
    out = scaled_dot_product_attention(query.to(cdt), k_proj, v_proj, dropout_p=dropout_p,
                                       scale=scale, dropout_mask=dropout_mask, compute_dtype=cdt)
    return out.to(query.dtype)


# ----------------------------------------------------------------------------------------------
# Normalisation and activations
# ----------------------------------------------------------------------------------------------
def layer_norm(
    input: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last ``len(normalized_shape)`` dims.

    The variance is the biased one, as in ``F.layer_norm``. Shapes: input (..., *normalized_shape),
    weight/bias normalized_shape -> input's shape.
    """
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    cdt = _compute_dtype(input, compute_dtype)
    dims = tuple(range(-len(normalized_shape), 0))
    x = input.to(cdt)
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.to(cdt)
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(input.dtype)


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float = 1e-5,
    *,
    input_bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    return_residual: bool = False,
    dropout_mask: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """layer_norm(dropout(input + input_bias) + residual) over the last dim (BERT's output sublayer).

    Shapes: input/residual (..., N), weight/bias/input_bias (N,) -> (..., N). With
    ``return_residual=True`` also returns the pre-norm sum ``dropout(input + input_bias) + residual``,
    which pre-LN models carry as the next residual. input and residual may differ in dtype (a
    Linear's bf16 output and an fp32 residual stream): both results are in their promoted dtype, as
    torch's ``+`` gives.
    """
    out_dtype = torch.promote_types(input.dtype, residual.dtype)
    cdt = compute_dtype or (torch.float64 if out_dtype == torch.float64 else torch.float32)
    h = input.to(cdt)
    if input_bias is not None:
        h = h + input_bias.to(cdt)
    h = _apply_dropout(h, dropout_p, dropout_mask)
    s = h + residual.to(cdt)
    out = layer_norm(s, (input.shape[-1],), weight, bias, eps, compute_dtype=cdt).to(out_dtype)
    if return_residual:
        return out, s.to(out_dtype)
    return out


def gelu(input: Tensor, approximate: str = "none", *,
         compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """GELU: x * Phi(x) with Phi the standard normal CDF ("none", via erf), or the tanh form
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) ("tanh")."""
    cdt = _compute_dtype(input, compute_dtype)
    x = input.to(cdt)
    if approximate == "tanh":
        y = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    else:
        y = 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    return y.to(input.dtype)


def bias_gelu(input: Tensor, bias: Optional[Tensor], approximate: str = "none", *,
              compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """gelu(input + bias); shapes input (..., N), bias (N,) -> (..., N)."""
    cdt = _compute_dtype(input, compute_dtype)
    x = input.to(cdt)
    if bias is not None:
        x = x + bias.to(cdt)
    return gelu(x, approximate, compute_dtype=cdt).to(input.dtype)


def geglu(input: Tensor, gate: Optional[Tensor] = None, approximate: str = "none", *,
          compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """GEGLU, ``gelu(input) * gate``. Without ``gate``, ``input`` (..., 2N) holds both halves
    (``input, gate = input.chunk(2, dim=-1)``: the first half goes through GELU) -> (..., N);
    with ``gate``, input and gate are (..., N) -> (..., N)."""
    cdt = _compute_dtype(input, compute_dtype)
    if gate is None:
        input, gate = input.chunk(2, dim=-1)
    return (gelu(input.to(cdt), approximate, compute_dtype=cdt) * gate.to(cdt)).to(input.dtype)
