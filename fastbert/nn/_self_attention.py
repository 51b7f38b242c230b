"""The projections shared by fastbert's self-attention layers (block-sparse and Linformer)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .._validation import check_bool, check_dropout, type_name
from ._utils import NoTorchScript, check_backend, check_factory_dtype, check_input, check_positive_int


class SelfAttentionBase(nn.Module, NoTorchScript):
    """In-projection (``in_proj_weight`` (3E, E), ``in_proj_bias`` (3E,)) and ``out_proj``, named and
    initialised as in ``torch.nn.MultiheadAttention`` (xavier-uniform in-projection, zero biases)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float, bias: bool, batch_first: bool,
                 device, dtype, backend: Optional[str]) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        embed_dim = check_positive_int("embed_dim", embed_dim)
        num_heads = check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        dropout = check_dropout(dropout, "dropout")
        bias = check_bool("bias", bias)
        batch_first = check_bool("batch_first", batch_first)
        check_factory_dtype(dtype)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.backend = check_backend(backend)
        self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def _heads(self, x: Tensor, key_padding_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (N, L, E) or (L, N, E) -> batch-first x and q, k, v (N, H, L, D) views."""
        check_input("x", x, self.in_proj_weight)
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            layout = "(N, L, E)" if self.batch_first else "(L, N, E)"
            raise ValueError(f"x must be {layout} with E = {self.embed_dim}, got shape {tuple(x.shape)}")
        if not self.batch_first:
            x = x.transpose(0, 1)
        n, length, _ = x.shape
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
                what = (f"dtype {key_padding_mask.dtype}" if isinstance(key_padding_mask, Tensor)
                        else type_name(key_padding_mask))
                raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got {what}")
            if tuple(key_padding_mask.shape) != (n, length):
                raise ValueError(f"key_padding_mask must have shape (N, L) = ({n}, {length}), got "
                                 f"{tuple(key_padding_mask.shape)}")
            if key_padding_mask.device != x.device:
                raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but x is on "
                                 f"{x.device}")
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [N, L, E] -> [N, L, 3E]
        qkv = qkv.view(n, length, 3, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # 3 x [N, H, L, D]
        return x, q, k, v

    def _output(self, out: Tensor) -> Tensor:
        """(N, H, L, D) -> out_proj -> (N, L, E) or (L, N, E)."""
        n, _, length, _ = out.shape
        y = self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))
        return y if self.batch_first else y.transpose(0, 1)
