"""``fastbert.nn.TransformerEncoderLayer``: ``torch.nn.TransformerEncoderLayer`` with the output
sublayers fused (out-projection bias + dropout + residual + LayerNorm in one
:func:`fastbert.add_layer_norm`, linear1's bias + GELU in one :func:`fastbert.bias_gelu`)."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .._validation import check_dropout, type_name
from ._utils import adopt, check_backend, check_input, check_positive_int
from .attention import MultiheadAttention, _check_mask_dtype
from .gelu import gelu_approximation
from .layer_norm import LayerNorm

__all__ = ["TransformerEncoderLayer"]


def _activation_fn(activation: Union[str, Callable[[Tensor], Tensor]]) -> Callable[[Tensor], Tensor]:
    if isinstance(activation, str):
        if activation == "relu":
            return F.relu
        if activation == "gelu":
            return F.gelu
        raise RuntimeError(f"activation should be relu/gelu, not {activation}")
    if not callable(activation):
        raise TypeError(f"activation must be 'relu', 'gelu' or a callable, got {type_name(activation)}")
    return activation


class TransformerEncoderLayer(nn.Module):
    """Drop-in for :class:`torch.nn.TransformerEncoderLayer`.

    Same constructor (d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=relu,
    layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device, dtype) plus a
    keyword-only ``backend``; same submodule names and ``state_dict`` keys (``self_attn.*``,
    ``linear1``, ``linear2``, ``norm1``, ``norm2``), so torch checkpoints load as is; same forward
    ``(src, src_mask=None, src_key_padding_mask=None, is_causal=False)`` and mask semantics as
    :class:`fastbert.nn.MultiheadAttention` (bool True = do not attend, float added).

    Shapes: src (S, N, E), or (N, S, E) with ``batch_first``, or unbatched (S, E) -> same shape.

    What runs (fastbert ops, ``backend`` passed through):

    * post-norm (default): ``x = add_layer_norm(attn(x) @ Wo, x, norm1, input_bias=bo,
      dropout=dropout1)``, then ``x = add_layer_norm(ff(x) @ W2, x, norm2, input_bias=b2,
      dropout=dropout2)``;
    * pre-norm (``norm_first``): ``layer_norm`` for norm1, then one ``add_layer_norm(...,
      return_residual=True)`` gives both the new residual stream and norm2 of it;
    * the feed-forward's first bias and GELU run as one ``bias_gelu`` (any other activation is
      applied as given, after ``linear1``).

    It does not accept nested tensors; :func:`fastbert.optimize` turns off
    ``torch.nn.TransformerEncoder``'s nested-tensor fast path when it swaps its layers.
    """

    __constants__ = ["norm_first"]

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu,
                 layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False,
                 bias: bool = True, device=None, dtype=None, *, backend: Optional[str] = None) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        backend = check_backend(backend)
        dim_feedforward = check_positive_int("dim_feedforward", dim_feedforward)
        dropout = check_dropout(dropout, "dropout")
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first, backend=backend, **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, backend=backend, **factory)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, backend=backend, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        activation = _activation_fn(activation)
        # Kept for code that reads it (torch's TransformerEncoder does): 1 relu, 2 gelu, 0 other.
        if activation is F.relu or isinstance(activation, nn.ReLU):
            self.activation_relu_or_gelu = 1
        elif activation is F.gelu or isinstance(activation, nn.GELU):
            self.activation_relu_or_gelu = 2
        else:
            self.activation_relu_or_gelu = 0
        self.activation = activation
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.TransformerEncoderLayer, *,
                   backend: Optional[str] = None) -> "TransformerEncoderLayer":
        """A fastbert layer sharing every Parameter (and submodule but ``self_attn``) of ``module``;
        ``self_attn`` becomes a :class:`fastbert.nn.MultiheadAttention` on the same parameters."""
        if not isinstance(module, nn.TransformerEncoderLayer):
            raise TypeError(f"module must be a torch.nn.TransformerEncoderLayer, got "
                            f"{type(module).__name__}")
        backend = check_backend(backend)
        new = adopt(cls, module, backend=backend)
        new.self_attn = MultiheadAttention.from_torch(module.self_attn, backend=backend)
        return new

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}, backend={self.backend!r}"

    # ------------------------------------------------------------------------------------------
    def _feed_forward(self, x: Tensor) -> Tensor:
        """dropout(activation(linear1(x))) @ W2^T, without linear2's bias (fused by the caller)."""
        approximate = gelu_approximation(self.activation)
        if approximate is not None:
            h = ops.bias_gelu(F.linear(x, self.linear1.weight), self.linear1.bias, approximate,
                              backend=self.backend)
        else:
            h = self.activation(self.linear1(x))
        return F.linear(self.dropout(h), self.linear2.weight)

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if not isinstance(src, Tensor):
            raise TypeError(f"src must be a torch.Tensor, got {type_name(src)}")
        if src.is_nested:
            raise NotImplementedError("fastbert.nn.TransformerEncoderLayer does not take nested "
                                      "tensors; pass a padded batch with src_key_padding_mask")
        if src.dim() not in (2, 3):
            raise ValueError(f"src must be (S, N, E), (N, S, E) with batch_first, or unbatched "
                             f"(S, E); got shape {tuple(src.shape)}")
        e = self.self_attn.embed_dim
        if src.shape[-1] != e:
            raise ValueError(f"src must end in d_model = {e}, got shape {tuple(src.shape)}")
        check_input("src", src, self.linear1.weight)
        _check_mask_dtype("src_mask", src_mask)
        _check_mask_dtype("src_key_padding_mask", src_key_padding_mask)
        for name, m in (("src_mask", src_mask), ("src_key_padding_mask", src_key_padding_mask)):
            if m is not None and m.device != src.device:
                raise ValueError(f"{name} is on {m.device} but src is on {src.device}")
        batched = src.dim() == 3
        if batched and not self.self_attn.batch_first:
            x = src.transpose(0, 1)
        elif not batched:
            x = src.unsqueeze(0)
            if src_key_padding_mask is not None:
                if src_key_padding_mask.dim() != 1:
                    raise ValueError(f"for unbatched src, src_key_padding_mask must be 1-D (S,), got "
                                     f"shape {tuple(src_key_padding_mask.shape)}")
                src_key_padding_mask = src_key_padding_mask.unsqueeze(0)
        else:
            x = src
        n, s, _ = x.shape
        if src_key_padding_mask is not None and tuple(src_key_padding_mask.shape) != (n, s):
            raise ValueError(f"src_key_padding_mask must have shape (N, S) = ({n}, {s}), got "
                             f"{tuple(src_key_padding_mask.shape)}")
        if src_mask is not None:
            h = self.self_attn.num_heads
            if src_mask.dim() not in (2, 3) or tuple(src_mask.shape[-2:]) != (s, s) or (
                    src_mask.dim() == 3 and src_mask.shape[0] != n * h):
                raise ValueError(f"src_mask must have shape (S, S) = ({s}, {s}) or (N * nhead, S, S) = "
                                 f"({n * h}, {s}, {s}), got {tuple(src_mask.shape)}")
        attn, out_proj = self.self_attn, self.self_attn.out_proj
        p1 = self.dropout1.p if self.training else 0.0
        p2 = self.dropout2.p if self.training else 0.0
        n1, n2 = self.norm1, self.norm2

        if self.norm_first:
            h = ops.layer_norm(x, n1.normalized_shape, n1.weight, n1.bias, n1.eps, backend=self.backend)
            ctx, _ = attn.attend(h, h, h, key_padding_mask=src_key_padding_mask, attn_mask=src_mask,
                                 is_causal=is_causal, same_qkv=True)
            # y = norm2(x1) and x1 = x + dropout1(ctx @ Wo^T + bo) in one fused op.
            y, x = ops.add_layer_norm(F.linear(ctx, out_proj.weight), x, n2.weight, n2.bias, n2.eps,
                                      input_bias=out_proj.bias, dropout_p=p1, return_residual=True,
                                      backend=self.backend)
            f = self._feed_forward(y)
            if self.linear2.bias is not None:
                f = f + self.linear2.bias
            x = x + F.dropout(f, p=p2, training=p2 > 0.0)
        else:
            ctx, _ = attn.attend(x, x, x, key_padding_mask=src_key_padding_mask, attn_mask=src_mask,
                                 is_causal=is_causal, same_qkv=True)
            x = ops.add_layer_norm(F.linear(ctx, out_proj.weight), x, n1.weight, n1.bias, n1.eps,
                                   input_bias=out_proj.bias, dropout_p=p1, backend=self.backend)
            x = ops.add_layer_norm(self._feed_forward(x), x, n2.weight, n2.bias, n2.eps,
                                   input_bias=self.linear2.bias, dropout_p=p2, backend=self.backend)

        if not batched:
            return x.squeeze(0)
        if not self.self_attn.batch_first:
            return x.transpose(0, 1)
        return x
