"""GELU and bias + GELU: public functions, checks and dispatch (ops ``"gelu"`` and ``"bias_gelu"``)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import reference
from .._validation import check_same, check_tensor
from ..backends import register, select

__all__ = ["gelu", "bias_gelu"]

APPROXIMATIONS = ("none", "tanh")


def _check_approximate(approximate) -> str:
    if not isinstance(approximate, str):
        raise TypeError(f"approximate must be a str, got {type(approximate).__name__}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be 'none' (erf) or 'tanh', got {approximate!r}")
    return approximate


def gelu(input: Tensor, approximate: str = "none", *, backend: Optional[str] = None) -> Tensor:
    """GELU, as ``torch.nn.functional.gelu``: exact (erf) or ``approximate="tanh"``. Any shape."""
    check_tensor("input", input)
    approximate = _check_approximate(approximate)
    impl = select("gelu", backend, input.device, input=input, approximate=approximate)
    return impl.fn(input, approximate)


def bias_gelu(input: Tensor, bias: Optional[Tensor], approximate: str = "none", *,
              backend: Optional[str] = None) -> Tensor:
    """``gelu(input + bias)`` fused: BERT's intermediate activation after the dense matmul.

    Shapes: input (..., N), bias (N,) or None -> (..., N). The bias gradient is the column sum.
    """
    check_tensor("input", input)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dim")
    if bias is not None:
        check_tensor("bias", bias, ndim=(1,))
        check_same("input", input, "bias", bias, dtype=False)
        if bias.shape[0] != input.shape[-1]:
            raise ValueError(f"bias must have shape ({input.shape[-1]},) to match input's last dim, "
                             f"got {tuple(bias.shape)}")
    approximate = _check_approximate(approximate)
    impl = select("bias_gelu", backend, input.device, input=input, bias=bias, approximate=approximate)
    return impl.fn(input, bias, approximate)


@register("gelu", "torch")
def _gelu_torch(input, approximate):
    return reference.gelu(input, approximate)


@register("bias_gelu", "torch")
def _bias_gelu_torch(input, bias, approximate):
    return reference.bias_gelu(input, bias, approximate)
