"""``fastbert.nn.GELU``: ``torch.nn.GELU`` running :func:`fastbert.gelu`; ``fastbert.nn.GEGLU``,
the gated form on :func:`fastbert.geglu`; and the helper that recognises GELU activations (torch's
and HuggingFace's) for the fused bias + GELU."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops.gelu import _check_approximate
from ._utils import NoTorchScript, adopt, check_backend, check_torch_computation, runs_plainly

__all__ = ["GELU", "GEGLU", "gelu_approximation"]


class GELU(nn.GELU, NoTorchScript):
    """Drop-in for :class:`torch.nn.GELU`: ``approximate="none"`` (erf) or ``"tanh"``, plus
    ``backend`` passed to :func:`fastbert.gelu`. Any input shape."""

    def __init__(self, approximate: str = "none", *, backend: Optional[str] = None) -> None:
        # Checked here (torch.nn.GELU only fails on the first call).
        super().__init__(approximate=_check_approximate(approximate))
        self.backend = check_backend(backend)

    @classmethod
    def from_torch(cls, module: nn.GELU, *, backend: Optional[str] = None) -> "GELU":
        if not isinstance(module, nn.GELU):
            raise TypeError(f"module must be a torch.nn.GELU, got {type(module).__name__}")
        check_torch_computation(module, nn.GELU, cls)
        return adopt(cls, module, backend=check_backend(backend))

    def forward(self, input: Tensor) -> Tensor:
        return ops.gelu(input, self.approximate, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"


class GEGLU(nn.Module, NoTorchScript):
    """``gelu(a) * g`` where ``a, g = input.chunk(2, dim=-1)``: the gated activation between a
    GLU-variant MLP's two matmuls (ModernBERT's ``act(input) * gate``), on :func:`fastbert.geglu`.

    Shapes: input (..., 2N) -> (..., N). ``approximate``: ``"none"`` (erf) or ``"tanh"``. No
    parameters. Use ``nn.Linear(d, 2 * N)`` before it and ``nn.Linear(N, d)`` after.
    """

    def __init__(self, approximate: str = "none", *, backend: Optional[str] = None) -> None:
        super().__init__()
        self.approximate = _check_approximate(approximate)
        self.backend = check_backend(backend)

    def forward(self, input: Tensor) -> Tensor:
        return ops.geglu(input, None, self.approximate, backend=self.backend)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}, backend={self.backend!r}"


# HuggingFace activation classes (transformers.activations) that compute GELU, by class name:
# GELUActivation -> F.gelu (erf) unless built with use_gelu_python (same math, kept: "none");
# NewGELUActivation, FastGELUActivation -> the tanh formula written out; GELUTanh (alias
# PytorchGELUTanh) -> F.gelu(approximate="tanh").
_HF_GELU = {
    "GELUActivation": "none",
    "NewGELUActivation": "tanh",
    "FastGELUActivation": "tanh",
    "GELUTanh": "tanh",
    "PytorchGELUTanh": "tanh",
    "AccurateGELUActivation": "tanh",  # the tanh formula written out ("gelu_accurate")
}


def gelu_approximation(act) -> Optional[str]:
    """``"none"`` or ``"tanh"`` when ``act`` (a module or function) computes GELU, else None.

    Recognises ``F.gelu``, ``torch.nn.GELU`` (and fastbert's), and HuggingFace's GELU activation
    modules, where they run plainly (no subclass, hook or instance forward: see
    :func:`~fastbert.nn._utils.runs_plainly`; a fused op would not call them). Anything else (ReLU,
    QuickGELU, clipped GELU, a hooked GELU, ...) returns None.
    """
    if act is F.gelu:
        return "none"
    if not isinstance(act, nn.Module):  # any other function (F.relu, ...); never read a function
        return None                     # type's __module__, which torch 2.11's Dynamo cannot trace
    cls = type(act)
    if not runs_plainly(act, cls):
        return None
    if cls is nn.GELU or cls is GELU:
        return act.approximate
    if cls.__module__.startswith("transformers.") and cls.__name__ in _HF_GELU:
        return _HF_GELU[cls.__name__]
    return None
