"""Helpers shared by the fastbert modules: backend argument checks, adopting an existing module,
and deciding whether a submodule may be fused (read its parameters) or must be called."""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Type, TypeVar

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .. import backends
from .._validation import type_name

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


def check_positive_int(name: str, value) -> int:
    """A module size argument (embed_dim, num_heads, ...): an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type_name(value)}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_factory_dtype(dtype) -> None:
    """The ``dtype`` of a module's parameters: None or a floating dtype."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type_name(dtype)}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype for the module's parameters, got {dtype}")


def check_input(name: str, t, param: torch.Tensor) -> None:
    """A module input: a tensor with the dtype (unless autocast is on) and device of the module's
    parameter ``param`` (the matmuls that use it need both)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type_name(t)}")
    if t.dtype != param.dtype and not torch.is_autocast_enabled(t.device.type):
        raise TypeError(f"{name} has dtype {t.dtype} but the module's parameters are {param.dtype}; "
                        f"pass {name}.to({param.dtype}) or convert the module")
    if t.device != param.device:
        raise ValueError(f"{name} is on {t.device} but the module's parameters are on "
                         f"{param.device}")


class NoTorchScript:
    """Mixin of every fastbert module: ``torch.jit.script`` (which calls ``__prepare_scriptable__``
    on each module it compiles) gets a clear error instead of one from inside TorchScript's
    compiler: the modules call ``torch.library`` ops through Python (keyword-only arguments,
    autocast queries, closures) that TorchScript cannot compile."""

    def __prepare_scriptable__(self):
        raise NotImplementedError(
            f"{type(self).__name__}: fastbert modules do not support TorchScript (torch.jit.script); "
            "use torch.compile, or torch.export for a deployable graph")


def _own_forward(module: nn.Module) -> bool:
    """Whether ``module.forward`` set on the instance is the class's own forward bound to it."""
    fwd = module.__dict__.get("forward")
    return getattr(fwd, "__self__", None) is module and \
        getattr(fwd, "__func__", None) is getattr(type(module), "forward", None)


def check_torch_computation(module: nn.Module, base: type, new_cls: type,
                            methods: Tuple[str, ...] = ("forward",)) -> None:
    """For ``from_torch``: a TypeError if ``module``'s class, a subclass of torch's ``base``,
    overrides one of ``methods`` (e.g. its forward), which the fastbert module made from it would
    silently not run. ``base`` itself, ``new_cls`` (fastbert's own) and subclasses that override
    none of them pass."""
    cls = type(module)
    if cls is base or isinstance(module, new_cls):
        return
    changed = [m for m in methods if getattr(cls, m, None) is not getattr(base, m, None)]
    if changed:
        raise TypeError(f"module is a {type_name(module)}, a subclass of torch.nn.{base.__name__} "
                        f"with its own {' / '.join(changed)}, which fastbert.nn.{new_cls.__name__} "
                        "would not run: keep the subclass, or rewrite it on the fastbert module")


_CALL_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def runs_plainly(module: nn.Module, *classes: type) -> bool:
    """Whether calling ``module`` computes exactly what its class's forward computes from its
    parameters, so that a fused op may read them instead of calling it: its type is one of
    ``classes`` exactly (a subclass, e.g. a quantized Linear, a LayerNorm variant or a module
    torch.nn.utils.parametrize changed, may compute something else), it has no hooks (a fused op
    would skip them: pruning and spectral_norm are hooks) and no forward set on its instance (a
    LoRA patch, accelerate's device hooks). Anything else in a fused sublayer's place is called."""
    if type(module) not in classes or any(getattr(module, a) for a in _CALL_HOOKS):
        return False
    return "forward" not in module.__dict__ or _own_forward(module)


def plain_linear(module: nn.Module) -> bool:
    """:func:`runs_plainly` for a Linear (``nn.MultiheadAttention.out_proj``'s class included)."""
    return runs_plainly(module, nn.Linear, NonDynamicallyQuantizableLinear)


class NoDropout(nn.Dropout):
    """Dropout(0), standing in where a model has no dropout: fastbert's own module, so it follows
    the mode of the fastbert module holding it (:func:`set_own_mode`), and fused as nn.Dropout is."""


def dropout_rate(dropout: nn.Module) -> Optional[float]:
    """The rate a fused op applies in place of calling the ``nn.Dropout`` ``dropout``: its ``p`` when
    it is in training mode, 0 when not (its own mode, as calling it would use: Monte-Carlo dropout
    turns the Dropout modules of an eval-mode model on); None when it is not a plain nn.Dropout (the
    caller then calls it)."""
    if not runs_plainly(dropout, nn.Dropout, NoDropout):
        return None
    return float(dropout.p) if dropout.training else 0.0


def set_own_mode(module: nn.Module, mode: bool) -> nn.Module:
    """``module.train(mode)`` for ``module`` and the fastbert modules below it only, not for the
    modules they share with the model they were built on (a padding-free encoder holds a
    HuggingFace model's modules, whose modes are that model's: Monte-Carlo dropout switches its
    Dropouts to training mode in an eval-mode model). A torch container (ModuleList, ModuleDict)
    holding fastbert modules only, e.g. an encoder's ``layers``, is fastbert's too."""
    for m in module.modules():
        if _own(m):
            m.training = mode
    return module


def _own(m: nn.Module) -> bool:
    if type(m).__module__.startswith("fastbert."):
        return True
    return (type(m) in (nn.ModuleList, nn.ModuleDict)
            and all(c is not None and _own(c) for c in m._modules.values()))


def adopt(cls: Type[M], module: nn.Module, **attrs) -> M:
    """A new ``cls`` instance that takes over ``module``'s state without copying any tensor.

    Every attribute of ``module`` is carried over; its parameter, buffer and submodule dicts are
    copied (so the two modules can diverge later) but hold the very same Parameter, buffer and
    submodule objects. Hooks are not carried over. ``attrs`` are then set on the new module.
    ``module`` itself is left untouched. A module whose ``forward`` was replaced on the instance
    (accelerate's device hooks do that) is refused with ValueError; one whose instance ``forward``
    is just its own class's, bound to it (transformers 4.5x leaves that behind after wrapping a
    module's forward to collect its outputs), is not.
    """
    if "forward" in module.__dict__:
        if not _own_forward(module):
            raise ValueError(f"this {type(module).__name__}'s forward is replaced on the instance (e.g. "
                             "by accelerate's hooks); a fastbert module would bypass it")
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, value in module.__dict__.items():
        if name == "forward":
            continue  # the class's own, bound to ``module`` (checked above): never the new one's
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
