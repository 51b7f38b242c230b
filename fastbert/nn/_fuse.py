"""Fusing a sublayer only where its modules run plainly: the decisions shared by the layers that
read their submodules' parameters instead of calling them (:class:`fastbert.nn.TransformerEncoderLayer`,
the padding-free encoders of :mod:`fastbert.models`, the HuggingFace integration).

A Linear, LayerNorm or Dropout that does not run plainly (:func:`runs_plainly`: a LoRA adapter in
its place, a hook, pruning, a subclass) is called as the original model calls it, so the result is
the original's; what does run plainly is fused."""
from __future__ import annotations

from typing import Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ._utils import dropout_rate, plain_linear, runs_plainly
from .layer_norm import LayerNorm


def plain_layer_norm(norm: nn.Module) -> bool:
    """:func:`runs_plainly` for a LayerNorm (torch's or fastbert's)."""
    return runs_plainly(norm, nn.LayerNorm, LayerNorm)


def matmul(x: Tensor, linear: nn.Module) -> Tuple[Tensor, Optional[Tensor]]:
    """``(x @ W^T, b)`` for a plain Linear (:func:`plain_linear`), whose bias the caller fuses into
    the next op; ``(linear(x), None)`` for any other module in its place."""
    if plain_linear(linear):
        return F.linear(x, linear.weight), linear.bias
    return linear(x), None


def layer_norm(x: Tensor, norm: nn.Module, backend: Optional[str]) -> Tensor:
    """``norm(x)``: :func:`fastbert.layer_norm` on its parameters where it runs plainly."""
    if plain_layer_norm(norm):
        return ops.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps, backend=backend)
    return norm(x)


def add_norm(h: Tensor, bias: Optional[Tensor], dropout: Optional[nn.Module], residual: Tensor,
             norm: nn.Module, backend: Optional[str], return_residual: bool = False):
    """``norm(residual + dropout(h + bias))`` (with ``return_residual``, also the sum): one
    :func:`fastbert.add_layer_norm` when ``dropout`` (None: no dropout) and ``norm`` run plainly.
    The Dropout acts in its own training mode, as when called (:func:`dropout_rate`)."""
    p = 0.0 if dropout is None else dropout_rate(dropout)
    if p is not None and plain_layer_norm(norm):
        return ops.add_layer_norm(h, residual, norm.weight, norm.bias, norm.eps, input_bias=bias,
                                  dropout_p=p, return_residual=return_residual, backend=backend)
    total = residual + unfused_dropout(h, bias, dropout)
    return (norm(total), total) if return_residual else norm(total)


def unfused_dropout(h: Tensor, bias: Optional[Tensor], dropout: Optional[nn.Module]) -> Tensor:
    """``dropout(h + bias)`` with the bias in h's dtype (as a Linear under autocast gives it)."""
    if bias is not None:
        h = h + bias.to(h.dtype)
    return h if dropout is None else dropout(h)
