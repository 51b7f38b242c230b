"""Block-sparse attention: public function, checks and dispatch (op ``"block_sparse_attention"``)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import reference
from .._validation import (check_attn_mask, check_dropout, check_int, check_same, check_scale,
                           check_tensor)
from ..backends import register, select
from .attention import _check_qkv

__all__ = ["block_sparse_attention"]


def _check_layout(layout, h: int, nbq: int, nbk: int) -> None:
    check_tensor("layout", layout, ndim=(3,), floating=False)
    if layout.is_floating_point() or layout.is_complex():
        raise TypeError(f"layout must be a bool (or 0/1 integer) tensor, got dtype {layout.dtype}")
    if layout.shape[0] not in (1, h) or tuple(layout.shape[1:]) != (nbq, nbk):
        raise ValueError(f"layout must have shape (H or 1, ceil(Lq/block_size), ceil(Lk/block_size)) "
                         f"= ({h} or 1, {nbq}, {nbk}), got {tuple(layout.shape)}")


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
    backend: Optional[str] = None,
) -> Tensor:
    """Attention restricted to the blocks of a layout.

    Args:
        query: (B, H, Lq, D); key: (B, H, Lk, D); value: (B, H, Lk, Dv).
        layout: bool (H or 1, ceil(Lq / block_size), ceil(Lk / block_size)); query block i sees key
            block j iff ``layout[h, i, j]``. Build one with :mod:`fastbert.sparsity`.
        block_size: tokens per block side. Lq and Lk need not be multiples of it.
        attn_mask: optional SDPA-style mask (e.g. key padding), combined with the layout.
        dropout_p, scale, backend: as in :func:`fastbert.scaled_dot_product_attention`.

    Returns:
        (B, H, Lq, Dv). A query row that sees no key returns 0.
    """
    _check_qkv(query, key, value, 4, "(B, H, L, D)")
    if key.shape[:2] != query.shape[:2]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must have the same "
                         "batch and head dims (B, H, L, D)")
    block_size = check_int("block_size", block_size, minimum=1)
    b, h, lq, _ = query.shape
    lk = key.shape[2]
    _check_layout(layout, h, -(-lq // block_size), -(-lk // block_size))
    if layout.device != query.device:
        raise ValueError(f"layout is on {layout.device} but query is on {query.device}")
    check_attn_mask(attn_mask, query, (b, h, lq, lk))
    dropout_p = check_dropout(dropout_p)
    scale = check_scale(scale)
    impl = select("block_sparse_attention", backend, query.device, query=query, key=key,
                  value=value, layout=layout, block_size=block_size, attn_mask=attn_mask,
                  dropout_p=dropout_p, scale=scale)
    return impl.fn(query, key, value, layout, block_size, attn_mask, dropout_p, scale)


@register("block_sparse_attention", "torch")
def _block_sparse_torch(query, key, value, layout, block_size, attn_mask, dropout_p, scale):
    return reference.block_sparse_attention(query, key, value, layout, block_size, attn_mask,
                                            dropout_p, scale)
