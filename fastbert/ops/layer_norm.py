"""LayerNorm and residual + bias + dropout + LayerNorm: public functions, checks and dispatch
(ops ``"layer_norm"`` and ``"add_layer_norm"``)."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple, Union

from torch import Tensor

from .. import reference
from .._validation import check_bool, check_dropout, check_same, check_tensor
from ..backends import register, select

__all__ = ["layer_norm", "add_layer_norm"]


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return float(eps)


def _check_param(name: str, p, shape: Tuple[int, ...], ref: Tensor) -> None:
    if p is None:
        return
    check_tensor(name, p)
    check_same("input", ref, name, p, dtype=False)
    if tuple(p.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(p.shape)}")


def layer_norm(
    input: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """LayerNorm over the trailing ``normalized_shape`` dims, as ``torch.nn.functional.layer_norm``.

    Shapes: input (..., *normalized_shape); weight, bias: normalized_shape or None -> input's shape.
    Statistics are computed in fp32 (fp64 for fp64 input).
    """
    check_tensor("input", input)
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        normalized_shape = (int(normalized_shape),)
    try:
        normalized_shape = tuple(int(s) for s in normalized_shape)
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got "
                        f"{type(normalized_shape).__name__}") from None
    n = len(normalized_shape)
    if n == 0 or n > input.dim() or tuple(input.shape[input.dim() - n:]) != normalized_shape:
        raise ValueError(f"normalized_shape {normalized_shape} must match the trailing dims of "
                         f"input of shape {tuple(input.shape)}")
    _check_param("weight", weight, normalized_shape, input)
    _check_param("bias", bias, normalized_shape, input)
    eps = _check_eps(eps)
    impl = select("layer_norm", backend, input.device, input=input, normalized_shape=normalized_shape,
                  weight=weight, bias=bias, eps=eps)
    return impl.fn(input, normalized_shape, weight, bias, eps)


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
    backend: Optional[str] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``layer_norm(dropout(input + input_bias) + residual)`` over the last dim, fused.

    This is BERT's output sublayer after the dense matmul (``input`` is the matmul output without
    its bias, ``input_bias`` that bias).

    Shapes: input, residual (..., N); weight, bias, input_bias (N,) or None -> (..., N).
    With ``return_residual=True`` returns ``(out, pre_norm_sum)``, the sum being what a pre-LN model
    carries on as its residual stream.
    """
    check_tensor("input", input)
    check_tensor("residual", residual)
    check_same("input", input, "residual", residual)
    if residual.shape != input.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must have the shape of input "
                         f"{tuple(input.shape)}")
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dim")
    shape = (input.shape[-1],)
    _check_param("weight", weight, shape, input)
    _check_param("bias", bias, shape, input)
    _check_param("input_bias", input_bias, shape, input)
    eps = _check_eps(eps)
    dropout_p = check_dropout(dropout_p)
    return_residual = check_bool("return_residual", return_residual)
    impl = select("add_layer_norm", backend, input.device, input=input, residual=residual,
                  weight=weight, bias=bias, eps=eps, input_bias=input_bias, dropout_p=dropout_p,
                  return_residual=return_residual)
    return impl.fn(input, residual, weight, bias, eps, input_bias, dropout_p, return_residual)


@register("layer_norm", "torch")
def _layer_norm_torch(input, normalized_shape, weight, bias, eps):
    return reference.layer_norm(input, normalized_shape, weight, bias, eps)


@register("add_layer_norm", "torch")
def _add_layer_norm_torch(input, residual, weight, bias, eps, input_bias, dropout_p, return_residual):
    return reference.add_layer_norm(input, residual, weight, bias, eps, input_bias=input_bias,
                                    dropout_p=dropout_p, return_residual=return_residual)
