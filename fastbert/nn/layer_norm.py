"""``fastbert.nn.LayerNorm``: ``torch.nn.LayerNorm`` running :func:`fastbert.layer_norm`."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import ops
from ..ops.layer_norm import _check_eps, check_normalized_shape
from ._utils import NoTorchScript, adopt, check_backend, check_factory_dtype, check_torch_computation

__all__ = ["LayerNorm"]


class LayerNorm(nn.LayerNorm, NoTorchScript):
    """Drop-in for :class:`torch.nn.LayerNorm` (same constructor, parameters and ``state_dict``).

    Args: as ``torch.nn.LayerNorm`` (normalized_shape, eps=1e-5, elementwise_affine=True,
    bias=True, device, dtype), plus ``backend`` (None/"auto", "triton", "cuda", "torch"), passed to
    :func:`fastbert.layer_norm` on every call.

    Shapes: input (..., *normalized_shape) -> same shape. Statistics are computed in fp32 (fp64 for
    fp64 input). It is a subclass of ``torch.nn.LayerNorm``, so code that checks
    ``isinstance(m, nn.LayerNorm)`` (e.g. weight initialisers) keeps working.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, backend: Optional[str] = None) -> None:
        # Checked here with clear errors (torch fails inside torch.empty on some, and accepts a
        # negative or NaN eps that fastbert.layer_norm refuses on every call).
        shape = check_normalized_shape(normalized_shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"normalized_shape must hold sizes >= 0, got {shape}")
        eps = _check_eps(eps)
        check_factory_dtype(dtype)
        super().__init__(shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.backend = check_backend(backend)

    @classmethod
    def from_torch(cls, module: nn.LayerNorm, *, backend: Optional[str] = None) -> "LayerNorm":
        """A fastbert LayerNorm sharing ``module``'s weight and bias Parameter objects."""
        if not isinstance(module, nn.LayerNorm):
            raise TypeError(f"module must be a torch.nn.LayerNorm, got {type(module).__name__}")
        check_torch_computation(module, nn.LayerNorm, cls)
        return adopt(cls, module, backend=check_backend(backend))

    def forward(self, input: Tensor) -> Tensor:
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"
