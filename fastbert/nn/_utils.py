"""Helpers shared by the fastbert modules: backend argument checks and adopting an existing module."""
from __future__ import annotations

from typing import Optional, Type, TypeVar

import torch
from torch import nn

from .. import backends

M = TypeVar("M", bound=nn.Module)

# Module internals that must not be shared between the adopted module and the new one (the
# containers are copied, their contents — the very same Parameter objects — are shared).
_COPIED_CONTAINERS = ("_parameters", "_buffers", "_modules")
_FRESH = ("_non_persistent_buffers_set",)


def check_backend(backend: Optional[str]) -> Optional[str]:
    """Validate a module's ``backend`` argument at construction; ``None`` stays ``None`` so that the
    ``FASTBERT_BACKEND`` environment variable is read at call time."""
    if backend is not None:
        backends.resolve(backend)  # raises TypeError / ValueError naming the argument
    return backend


def adopt(cls: Type[M], module: nn.Module, **attrs) -> M:
    """A new ``cls`` instance that takes over ``module``'s state without copying any tensor.

    Every attribute of ``module`` is carried over; its parameter, buffer and submodule dicts are
    copied (so the two modules can diverge later) but hold the very same Parameter, buffer and
    submodule objects. Hooks are not carried over. ``attrs`` are then set on the new module.
    ``module`` itself is left untouched. A module whose ``forward`` was replaced on the instance
    (accelerate's device hooks do that) is refused with ValueError.
    """
    if "forward" in module.__dict__:
        raise ValueError(f"this {type(module).__name__}'s forward is replaced on the instance (e.g. by "
                         "accelerate's hooks); a fastbert module would bypass it")
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, value in module.__dict__.items():
        if name in _COPIED_CONTAINERS:
            new.__dict__[name] = type(value)(value)
        elif name in _FRESH:
            new.__dict__[name] = set(value)
        elif "hook" in name:
            continue  # fresh, empty hook dicts from nn.Module.__init__
        else:
            new.__dict__[name] = value
    for name, value in attrs.items():
        setattr(new, name, value)
    return new


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors, float32 otherwise (fastbert.reference's convention)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
