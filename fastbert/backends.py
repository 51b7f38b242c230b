"""Backends: what each one supports, why it cannot serve a call, and how one is chosen.

fastbert has three backends:

* ``"cuda"``   – hand-written CUDA C++ kernels in the extension ``fastbert._C`` (csrc/);
* ``"triton"`` – Triton kernels (kernels/, installed as ``fastbert.kernels``). On CUDA tensors they
  run compiled; on CPU tensors they run under Triton's interpreter when ``TRITON_INTERPRET=1``
  (that is how the test suite checks them without a GPU; it is slow and for testing only);
* ``"torch"``  – the pure-PyTorch reference (``fastbert.reference``), which serves everything.

Every op registers one implementation per backend with :func:`register`, together with a
function that returns the reasons (a list of strings) why that implementation cannot serve a
given call — an empty list means it can. :func:`select` walks the backends: an explicitly
requested backend that cannot serve raises :class:`BackendError` listing every reason; ``"auto"``
takes the first capable backend in the op's priority order and falls back to ``"torch"``. For ops
with two fast backends, the priority of a call on a CUDA tensor comes from measurements when the
dispatch table has them for this GPU architecture and the call's shape class
(:mod:`fastbert.dispatch`); otherwise from the op's default order.

The default backend is ``"auto"``; the environment variable ``FASTBERT_BACKEND`` changes it.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import dispatch
from .kernels._tiles import interpreting as _interpreting

__all__ = [
    "BACKENDS",
    "BackendError",
    "register",
    "select",
    "auto_order",
    "explain",
    "resolve",
    "backend_reasons",
    "implementations",
    "op_names",
    "interpreter_enabled",
    "cuda_extension",
    "cuda_ops",
    "clear_select_cache",
]

BACKENDS = ("cuda", "triton", "torch")
# Order in which "auto" tries backends unless an op declares its own (measured) order.
DEFAULT_PRIORITY = ("triton", "cuda", "torch")


class BackendError(RuntimeError):
    """No backend (or not the requested one) can serve a call; the message lists every reason."""


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read as
    Triton reads it: see ``fastbert.kernels._tiles.interpreting``, which imports no Triton).
    Imported with this module, not lazily: a global set while torch.compile first traced an op
    failed the guard Dynamo put on it, and the next call compiled again."""
    return _interpreting()


_TRITON_ERROR: Optional[str] = None
_TRITON_CHECKED = False


def constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo (about 0.8 s of
    ``import fastbert``) when it has not been imported yet: the decorator only sets this marker,
    which Dynamo reads when it traces (torch 2.11 to 2.14; tests/test_library.py checks that the
    installed torch still does exactly this)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


# The environment probes below (can triton be imported, does the CUDA extension load, is the
# interpreter usable) run inside select(), which torch.compile traces: marked as constant results,
# Dynamo runs them as they are instead of tracing an import (a graph break: fullgraph=True failed
# in a process that had not called an op eagerly first).
@constant_result
def _triton_import_error() -> Optional[str]:
    # Cached in module globals (not functools.lru_cache, which Dynamo warns about when tracing).
    global _TRITON_ERROR, _TRITON_CHECKED
    if not _TRITON_CHECKED:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            _TRITON_ERROR = f"triton is not importable ({type(e).__name__}: {e})"
        _TRITON_CHECKED = True
    return _TRITON_ERROR


_C = None
_C_ERROR: Optional[str] = None


def _version_tuple(version: str) -> tuple:
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@constant_result
def _interpreter_problem() -> Optional[str]:
    """A known-broken combination for Triton's CPU interpreter, or None.

    Seen here: Triton 3.6's interpreter fails on NumPy 2.4 ("only 0-dimensional arrays can be
    converted to Python scalars"), where NumPy 2.3 and Triton 3.7.1 / 3.8 work.
    """
    import numpy
    import triton

    if _version_tuple(triton.__version__) < (3, 7) and _version_tuple(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails with NumPy {numpy.__version__}; "
                "use numpy<2.4 or triton>=3.7 to run Triton kernels on CPU")
    return None


def cuda_extension():
    """The loaded ``fastbert._C`` module, or None (see :func:`cuda_extension_error`)."""
    global _C, _C_ERROR
    if _C is None and _C_ERROR is None:
        try:
            _C = importlib.import_module("fastbert._C")
        except ImportError as e:
            _C_ERROR = ("the CUDA extension fastbert._C is not built or failed to load "
                        f"({e}); reinstall with `FASTBERT_BUILD_CUDA=1 pip install "
                        "--no-build-isolation .` (the torch in this environment and nvcc are "
                        "needed at build time; with build isolation the build cannot see torch)")
    return _C


@constant_result
def cuda_extension_error() -> Optional[str]:
    cuda_extension()
    return _C_ERROR


_CUDA_FAMILIES_READY: set = set()
_CUDA_REGISTRARS: dict = {}


def register_cuda_family(family: str, register_fakes: Callable[[], None]) -> None:
    """Records ``register_fakes``, the op family's fake / autograd registrations for
    ``torch.ops.fastbert_cuda`` (which need the extension's schemas, so run on first use)."""
    _CUDA_REGISTRARS[family] = register_fakes


@constant_result
def _cuda_family_ready(family: str) -> bool:
    # A probe Dynamo runs instead of tracing (like cuda_extension_error): the extension's import
    # and the registrations happen at trace time, so a first call under
    # torch.compile(fullgraph=True) needs no eager call before it.
    if cuda_extension() is None:
        return False
    if family not in _CUDA_FAMILIES_READY:
        _CUDA_REGISTRARS[family]()
        _CUDA_FAMILIES_READY.add(family)
    return True


def cuda_ops(family: str):
    """``torch.ops.fastbert_cuda`` with the extension loaded and the family's registrations (see
    :func:`register_cuda_family`) run once."""
    if not _cuda_family_ready(family):
        raise RuntimeError(cuda_extension_error())
    return torch.ops.fastbert_cuda


def backend_reasons(backend: str, device: Optional[torch.device] = None,
                    explicit: bool = True) -> List[str]:
    """Reasons why ``backend`` cannot run at all here (or on ``device``), independent of the op."""
    reasons: List[str] = []
    if backend == "torch":
        return reasons
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return [err]
        if device is None:
            if not torch.cuda.is_available() and not interpreter_enabled():
                reasons.append("no CUDA GPU is visible and TRITON_INTERPRET=1 is not set")
        elif device.type == "cpu":
            problem = _interpreter_problem() if interpreter_enabled() else None
            if not interpreter_enabled():
                reasons.append("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
            elif problem:
                reasons.append(problem)
            elif not explicit:
                reasons.append("the Triton interpreter is for testing: 'auto' never picks it; "
                               "pass backend='triton' to use it")
        elif device.type != "cuda":
            reasons.append(f"tensors on {device.type} (Triton serves cuda, or cpu under the interpreter)")
        elif interpreter_enabled():
            reasons.append("TRITON_INTERPRET=1 is set, so Triton cannot run on CUDA tensors")
        return reasons
    if backend == "cuda":
        err = cuda_extension_error()
        if err:
            return [err]
        if device is None:
            if not torch.cuda.is_available():
                reasons.append("no CUDA GPU is visible")
        elif device.type != "cuda":
            reasons.append(f"tensors on {device.type}; the CUDA backend needs CUDA tensors")
        return reasons
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


Reasons = Callable[..., List[str]]


@dataclass
class Implementation:
    op: str
    backend: str
    fn: Callable
    reasons: Reasons  # (**call) -> list of reasons this implementation cannot serve the call


@dataclass
class _Op:
    name: str
    impls: Dict[str, Implementation] = field(default_factory=dict)
    priority: Sequence[str] = DEFAULT_PRIORITY


_OPS: Dict[str, _Op] = {}


def _no_reasons(**call) -> List[str]:
    return []


def register(op: str, backend: str, reasons: Optional[Reasons] = None,
             priority: Optional[Sequence[str]] = None):
    """Decorator: register ``fn`` as ``op``'s implementation on ``backend``.

    ``reasons(**call)`` receives the op's normalised arguments and returns why it cannot serve
    them (empty list: it can). It may look only at the tensors' dtypes, shapes, strides and device
    and at the other arguments' values: :func:`select` remembers its answers by those.
    ``priority`` optionally sets the op's "auto" order.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn):
        entry = _OPS.setdefault(op, _Op(op))
        entry.impls[backend] = Implementation(op, backend, fn, reasons or _no_reasons)
        if priority is not None:
            entry.priority = tuple(priority)
        clear_select_cache()
        return fn

    return deco


def op_names() -> List[str]:
    return sorted(_OPS)


def implementations(op: str) -> Dict[str, Implementation]:
    return dict(_OPS[op].impls)


def resolve(backend: Optional[str]) -> str:
    """Normalise a ``backend`` argument: None/"auto" -> the default (``FASTBERT_BACKEND`` or auto)."""
    if backend is None:
        backend = os.environ.get("FASTBERT_BACKEND", "auto") or "auto"
        where = "the FASTBERT_BACKEND environment variable"
    else:
        where = "backend"
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    backend = backend.lower()
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"{where} must be one of 'auto', 'cuda', 'triton', 'torch'; got {backend!r}")
    return backend


def _impl_reasons(impl: Implementation, device: Optional[torch.device], explicit: bool,
                  call: dict) -> List[str]:
    reasons = backend_reasons(impl.backend, device, explicit=explicit)
    if reasons:
        return reasons
    if impl.backend != "torch" and call.get("dropout_p") == 1.0:
        # torch allows p = 1 (everything dropped: the result is trivial); the kernels' 1 / (1 - p)
        # scale does not, so the reference computes it
        return ["dropout_p = 1 (every element dropped) is computed by the torch backend"]
    return list(impl.reasons(**call))


def auto_order(op: str, device: Optional[torch.device], call: dict) -> Sequence[str]:
    """The order in which "auto" tries the backends for this call: the measured order of its
    shape class (:func:`fastbert.dispatch.measured_order`) followed by the op's default priority
    for the backends the measurement does not rank; or the default priority alone."""
    default = _OPS[op].priority
    measured = dispatch.measured_order(op, device, call)
    if not measured:
        return default
    return tuple(measured) + tuple(b for b in default if b not in measured)


def _signature(call: dict) -> tuple:
    """What the reasons functions may look at: each tensor's dtype, shape, strides and whether it
    requires grad, whether grad mode is on (an inference-only kernel declines a call that needs
    gradients), and the other arguments' values (the device is part of select's key: a call's
    tensors share it)."""
    sig = [torch.is_grad_enabled()]
    for v in call.values():
        if isinstance(v, torch.Tensor):
            sig.append((v.dtype, v.shape, v.stride(), v.requires_grad))
        elif isinstance(v, list):
            sig.append(tuple(v))
        else:
            sig.append(v)
    return tuple(sig)


# select's answers, by op, requested backend, device, interpreter setting, dispatch table and call
# signature. A model calls each op with a handful of signatures, so the reasons of every backend
# are worked out once per signature instead of once per call (they cost 5-15 us of Python).
_SELECTED: Dict[tuple, Implementation] = {}
_SELECTED_MAX = 4096


def clear_select_cache() -> None:
    """Forget select's remembered answers (done by :func:`register` and when the dispatch table is
    reloaded; tests that change what a backend reports call it too)."""
    _SELECTED.clear()


def select(op: str, backend: Optional[str], device: Optional[torch.device], **call) -> Implementation:
    """Pick the implementation of ``op`` that serves ``call`` (see the module docstring).

    The answer is remembered for calls with the same signature (dtypes, shapes, strides,
    requires_grad, grad mode, device, non-tensor arguments): reasons functions must depend on
    nothing else. A call that no backend can
    serve is worked out again each time, so it raises each time."""
    backend = resolve(backend)
    if torch.compiler.is_compiling():
        # traced once per graph anyway; symbolic sizes (e.g. a max_seqlen read from a tensor)
        # cannot be hashed into a key
        return _select(op, backend, device, call)
    try:
        key = (op, backend, device, interpreter_enabled(), dispatch.table_generation(),
               _signature(call))
        impl = _SELECTED.get(key)
    except TypeError:  # an unhashable argument: work it out, remember nothing
        key, impl = None, None
    if impl is None:
        impl = _select(op, backend, device, call)
        if key is not None:
            if len(_SELECTED) >= _SELECTED_MAX:
                _SELECTED.clear()
            _SELECTED[key] = impl
    return impl


def _select(op: str, backend: str, device: Optional[torch.device], call: dict) -> Implementation:
    entry = _OPS[op]
    if backend != "auto":
        impl = entry.impls.get(backend)
        if impl is None:
            raise BackendError(f"{op}: backend {backend!r} has no implementation of this op "
                               f"(implemented: {sorted(entry.impls)})")
        reasons = _impl_reasons(impl, device, True, call)
        if reasons:
            raise BackendError(f"{op}: backend {backend!r} cannot serve this call: " + "; ".join(reasons))
        return impl
    all_reasons = []
    for name in auto_order(op, device, call):
        impl = entry.impls.get(name)
        if impl is None:
            all_reasons.append(f"{name}: not implemented")
            continue
        reasons = _impl_reasons(impl, device, False, call)
        if not reasons:
            return impl
        all_reasons.append(f"{name}: " + "; ".join(reasons))
    raise BackendError(f"{op}: no backend can serve this call: " + " | ".join(all_reasons))


def explain(op: str, device: Optional[torch.device] = None, **call) -> Dict[str, List[str]]:
    """For each backend, the reasons it cannot serve ``call`` (empty list: it can)."""
    entry = _OPS[op]
    out = {}
    for name in BACKENDS:
        impl = entry.impls.get(name)
        if impl is None:
            out[name] = ["not implemented"]
        else:
            out[name] = _impl_reasons(impl, device, True, call) if call else backend_reasons(name, device)
    return out
