"""``fastbert.nn.LinformerSelfAttention``: Linformer self-attention (Wang et al., 2020) on
:func:`fastbert.linformer_attention`."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ._self_attention import SelfAttentionBase
from ._utils import check_positive_int
from .._validation import check_bool

__all__ = ["LinformerSelfAttention"]


class LinformerSelfAttention(SelfAttentionBase):
    """Multi-head self-attention over ``k`` learned projections of the keys and values.

    Args:
        embed_dim, num_heads: model width E and heads H.
        max_seq_len: the longest input L_max; the projections are (k, L_max) and a shorter input
            of L tokens uses their first L columns.
        k: projected length (the paper's k).
        share_heads: one projection shared by all heads (``proj_k`` (k, L_max)) if True (default,
            the paper's "headwise sharing"), else one per head ((H, k, L_max)).
        share_kv: the keys and values use the same projection (the paper's "key-value sharing"):
            there is no ``proj_v`` parameter.
        dropout, bias, batch_first, device, dtype, backend: as in
            :class:`fastbert.nn.BlockSparseSelfAttention`.

    Parameters: ``in_proj_weight``, ``in_proj_bias``, ``out_proj`` (as ``torch.nn.MultiheadAttention``),
    ``proj_k`` and, unless ``share_kv``, ``proj_v``, initialised N(0, 1/k).

    forward(x, key_padding_mask=None) -> same shape as x; ``key_padding_mask`` (N, L) bool with
    True = padding: padded positions contribute nothing to the projections.
    """

    def __init__(self, embed_dim: int, num_heads: int, max_seq_len: int, k: int = 256, *,
                 share_heads: bool = True, share_kv: bool = False, dropout: float = 0.0,
                 bias: bool = True, batch_first: bool = True, device=None, dtype=None,
                 backend: Optional[str] = None) -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, batch_first, device, dtype, backend)
        self.max_seq_len = max_seq_len = check_positive_int("max_seq_len", max_seq_len)
        self.k = k = check_positive_int("k", k)
        self.share_heads = check_bool("share_heads", share_heads)
        self.share_kv = check_bool("share_kv", share_kv)
        shape = (k, max_seq_len) if self.share_heads else (num_heads, k, max_seq_len)
        self.proj_k = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        nn.init.normal_(self.proj_k, std=1.0 / math.sqrt(k))
        if self.share_kv:
            self.register_parameter("proj_v", None)
        else:
            self.proj_v = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
            nn.init.normal_(self.proj_v, std=1.0 / math.sqrt(k))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, max_seq_len={self.max_seq_len}, "
                f"k={self.k}, share_heads={self.share_heads}, share_kv={self.share_kv}, "
                f"backend={self.backend!r}")

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        x_bf, q, k, v = self._heads(x, key_padding_mask)
        length = q.shape[2]
        if length > self.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds max_seq_len = {self.max_seq_len}")
        proj_k = _first_columns(self.proj_k, length)
        proj_v = proj_k if self.proj_v is None else _first_columns(self.proj_v, length)
        out = ops.linformer_attention(q, k, v, proj_k, proj_v, key_padding_mask=key_padding_mask,
                                      dropout_p=self.dropout if self.training else 0.0,
                                      backend=self.backend)
        return self._output(out)


def _first_columns(proj: Tensor, length) -> Tensor:
    """The projection's first ``length`` columns (the positions of a shorter input). A view, except
    for a length known only at run time (``torch.export`` with a dynamic length): such a view is
    contiguous only at ``length == max_seq_len``, and tracing guards on that (an export up to
    max_seq_len failed), so that length gets the columns gathered into a new tensor instead."""
    if isinstance(length, torch.SymInt):
        return proj.index_select(-1, torch.arange(length, device=proj.device))
    return proj[..., :length]
