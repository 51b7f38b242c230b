"""Dense and variable-length multi-head attention: public functions, checks and dispatch.

Backend implementations register themselves with :func:`fastbert.backends.register` under the op
names ``"scaled_dot_product_attention"`` and ``"varlen_attention"``; the torch (reference) one is
registered here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._validation import (check_attn_mask, check_bool, check_cu_seqlens, check_dropout, check_int,
                           check_same, check_scale, check_tensor)
from ..backends import register, select

__all__ = ["scaled_dot_product_attention", "varlen_attention"]


def _check_qkv(query, key, value, ndim: int, layout: str, names=("query", "key", "value")):
    nq, nk, nv = names
    check_tensor(nq, query, ndim=(ndim,))
    check_tensor(nk, key, ndim=(ndim,))
    check_tensor(nv, value, ndim=(ndim,))
    check_same(nq, query, nk, key)
    check_same(nq, query, nv, value)
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"{nk} head dim {key.shape[-1]} must equal {nq} head dim {query.shape[-1]} "
                         f"(shapes {layout}: {nq} {tuple(query.shape)}, {nk} {tuple(key.shape)})")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"{nk} {tuple(key.shape)} and {nv} {tuple(value.shape)} must agree in all "
                         f"but the last dim ({layout})")


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Multi-head attention with the semantics of ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        query: (B, H, Lq, D).
        key: (B, H, Lk, D).
        value: (B, H, Lk, Dv).
        attn_mask: optional, broadcastable to (B, H, Lq, Lk). A bool mask is True where a key takes
            part; a floating mask is added to the scores (it may require grad).
        dropout_p: dropout probability on the attention weights, in [0, 1).
        is_causal: query i sees keys j <= i (top-left aligned); may be combined with ``attn_mask``.
        scale: score scale, default 1/sqrt(D).
        backend: None/"auto", "triton", "cuda" or "torch" (default from ``FASTBERT_BACKEND``).

    Returns:
        (B, H, Lq, Dv) in the dtype of ``query``. Unlike torch, a query row whose every key is masked
        returns 0 and gets zero gradient, never NaN.

    Inputs may be non-contiguous views, e.g. a (B, L, H, D) tensor ``.transpose(1, 2)``.
    """
    _check_qkv(query, key, value, 4, "(B, H, L, D)")
    if key.shape[:2] != query.shape[:2]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must have the same "
                         "batch and head dims (B, H, L, D)")
    b, h, lq, _ = query.shape
    lk = key.shape[2]
    check_attn_mask(attn_mask, query, (b, h, lq, lk))
    dropout_p = check_dropout(dropout_p)
    is_causal = check_bool("is_causal", is_causal)
    scale = check_scale(scale)
    if lq == 0 or lk == 0 or b == 0 or h == 0:
        # Nothing to attend to: every row is fully masked and returns 0.
        out = value.new_zeros((b, h, lq, value.shape[-1]))
        return out + 0.0 * (query.sum() + key.sum() + value.sum())
    impl = select("scaled_dot_product_attention", backend, query.device, query=query, key=key,
                  value=value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                  scale=scale)
    return impl.fn(query, key, value, attn_mask, dropout_p, is_causal, scale)


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
    backend: Optional[str] = None,
) -> Tensor:
    """Attention over packed variable-length sequences, with no padding stored or computed.

    Args:
        q: (total_q, H, D) tokens of all sequences, packed.
        k: (total_k, H, D).
        v: (total_k, H, Dv).
        cu_seqlens_q: (N + 1,) int32 cumulative query lengths, starting at 0 and ending at total_q.
        cu_seqlens_k: (N + 1,) int32 cumulative key lengths.
        max_seqlen_q / max_seqlen_k: the longest query / key sequence (upper bounds are fine).
        dropout_p, is_causal, scale, backend: as in :func:`scaled_dot_product_attention`; causal is
            top-left aligned within each sequence.

    Returns:
        (total_q, H, Dv). See :func:`fastbert.unpad_input` to build the inputs from a padded batch.

    The lengths are checked on the host (one device sync in eager mode).
    """
    _check_qkv(q, k, v, 3, "(total, H, D)", names=("q", "k", "v"))
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same number of heads")
    cq = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    ck = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q has {len(cq)} entries but cu_seqlens_k has {len(ck)}; "
                         "both must describe the same batch")
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = check_int("max_seqlen_k", max_seqlen_k)
    longest_q = max(b - a for a, b in zip(cq, cq[1:]))
    longest_k = max(b - a for a, b in zip(ck, ck[1:]))
    if longest_q > max_seqlen_q:
        raise ValueError(f"max_seqlen_q = {max_seqlen_q} but a query sequence has {longest_q} tokens")
    if longest_k > max_seqlen_k:
        raise ValueError(f"max_seqlen_k = {max_seqlen_k} but a key sequence has {longest_k} tokens")
    dropout_p = check_dropout(dropout_p)
    is_causal = check_bool("is_causal", is_causal)
    scale = check_scale(scale)
    impl = select("varlen_attention", backend, q.device, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q,
                  cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                  dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    return impl.fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   is_causal, scale)


@register("scaled_dot_product_attention", "torch")
def _sdpa_torch(query, key, value, attn_mask, dropout_p, is_causal, scale):
    return reference.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                                  is_causal, scale)


@register("varlen_attention", "torch")
def _varlen_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                  is_causal, scale):
    return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, dropout_p, is_causal, scale)
