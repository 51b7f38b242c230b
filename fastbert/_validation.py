"""Argument checks shared by the public ops: clear ``TypeError``/``ValueError`` messages that name
the argument and what was expected, raised before any backend sees the call."""
from __future__ import annotations

import numbers
import weakref
from collections import OrderedDict
from typing import List, Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def type_name(value) -> str:
    """The type of ``value`` for an error message: ``int``, ``Tensor``, or ``numpy.bool`` for a type
    from outside the builtins (whose bare name can read like a builtin's)."""
    cls = type(value)
    if any(c.__name__ == "Proxy" and c.__module__.startswith("torch.fx") for c in cls.__mro__):
        return (f"{cls.__name__} (torch.fx.symbolic_trace cannot trace fastbert's ops and modules, "
                "which check their inputs' values; use torch.export.export or torch.compile)")
    if cls.__module__ in ("builtins", "torch") or cls.__module__.startswith("torch."):
        return cls.__name__
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def check_tensor(name: str, t, *, ndim: Optional[Sequence[int]] = None, floating: bool = True) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type_name(t)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got dtype {t.dtype}")
    if ndim is not None and t.dim() not in tuple(ndim):
        want = " or ".join(str(n) for n in ndim)
        raise ValueError(f"{name} must be {want}-D, got shape {tuple(t.shape)}")


def check_same(ref_name: str, ref: Tensor, name: str, t: Tensor, *, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                         "all tensors must be on one device")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def check_dropout(dropout_p, name: str = "dropout_p") -> float:
    """A dropout probability: a float in [0, 1] (1 drops everything, as torch allows)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {type_name(dropout_p)}")
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {dropout_p}")
    return float(dropout_p)


def check_scale(scale) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type_name(scale)}")
    if not float(scale) > 0.0 or float(scale) == float("inf"):
        raise ValueError(f"scale must be a finite positive float, got {scale}")
    return float(scale)


# The largest scale the Triton attention kernels take: they get scale * log2(e) as an fp32
# argument, which beyond this is inf (every score inf or NaN).
TRITON_MAX_SCALE = float(torch.finfo(torch.float32).max) / 1.4426950408889634


def triton_scale_reasons(scale: Optional[float]) -> List[str]:
    """The Triton attention backends' refusal of a ``scale`` beyond :data:`TRITON_MAX_SCALE`."""
    if scale is not None and float(scale) > TRITON_MAX_SCALE:
        return [f"scale {scale} > {TRITON_MAX_SCALE:.4g}: the Triton attention kernels take "
                "scale * log2(e) as a float32 argument (the float32 maximum / log2(e))"]
    return []


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type_name(value)}")
    return value


def check_int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type_name(value)}")
    if torch.compiler.is_compiling() or isinstance(value, torch.SymInt):
        # traced: the value may be a symbol (e.g. a max_seqlen read from a tensor), on which an
        # `if` cannot branch; torch._check asserts it instead
        torch._check(value >= minimum)  # no message: torch 2.11's Dynamo cannot trace one
        return value
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def unless_known_false(condition) -> bool:
    """``condition`` (a comparison of sizes) as a bool; while torch.compile traces, True unless it
    is known to be False (a size only known at run time, such as a packed length read from the
    data, cannot decide it), without adding a guard on it."""
    if torch.compiler.is_compiling():
        from torch.fx.experimental.symbolic_shapes import guard_or_true

        return guard_or_true(condition)
    return bool(condition)


def check_attn_mask(attn_mask, query: Tensor, target_shape: Sequence[int], name: str = "attn_mask") -> None:
    """A mask is bool (True = attend) or floating (added to scores) and broadcasts to target_shape."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type_name(attn_mask)}")
    if type(attn_mask).__name__ == "CausalBias":
        raise TypeError(f"{name} is one of torch's causal-bias objects, which only "
                        "fastbert.scaled_dot_product_attention accepts; pass a bool or float mask "
                        "tensor here")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a bool tensor (True = take part) or a floating tensor "
                        f"added to the scores, got dtype {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise ValueError(f"{name} is on {attn_mask.device} but query is on {query.device}")
    shape = tuple(attn_mask.shape)
    target = tuple(target_shape)
    if not shape:
        raise ValueError(f"{name} must have at least 1 dim (a mask broadcastable to (..., Lq, Lk)); "
                         "got a 0-dim tensor")
    # sizes only known at run time (a packed length read from the data, in a one-graph compile)
    # cannot be compared while tracing: left to the kernels, not failing the trace
    ok = len(shape) <= len(target) and all(
        unless_known_false(s == 1) or unless_known_false(s == t)
        for s, t in zip(reversed(shape), reversed(target)))
    if not ok:
        dims = "(B, H, Lq, Lk)" if len(target) == 4 else "(..., H, Lq, Lk)"
        raise ValueError(f"{name} of shape {shape} does not broadcast to {dims} = {target}")


_FAKE_KEY = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "FAKE", None)


def _fake_mode():
    """The active FakeTensorMode (shape propagation: tensors without values), or None."""
    return None if _FAKE_KEY is None else torch._C._get_dispatch_mode(_FAKE_KEY)


def host_checks_allowed(device: torch.device) -> bool:
    """False while torch.compile traces or a CUDA graph is being captured, and for tensors without
    values (meta tensors, FakeTensorMode: shapes only): checks that read tensor values on the host
    (a device sync) are skipped then, and run in eager mode."""
    if torch.compiler.is_compiling():
        return False
    if device.type == "meta" or _capturing(device):
        return False
    return _fake_mode() is None


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``device``'s kind."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def mask_reads_allowed(device: torch.device) -> bool:
    """Whether a padding-free model may read a padding mask's values on the host to decide how to
    run (left padding, gaps, float values): in eager mode, and under a torch.compile that can
    break the graph there (the read becomes a graph break, and the decision stays right). Not in
    a one-graph compile with Dynamo's ``capture_scalar_outputs`` (the read would be traced as an
    unbacked value: see :func:`mask_assert`), nor during CUDA-graph capture. The compile
    check comes first: Dynamo cannot trace ``torch.cuda.is_current_stream_capturing()``."""
    if torch.compiler.is_compiling():
        from torch._dynamo import config  # loaded: it is tracing

        return not config.capture_scalar_outputs
    return not _capturing(device)


def mask_assert(condition: Tensor) -> None:
    """In a one-graph compile (where :func:`mask_reads_allowed` is False but values can be traced):
    a runtime assertion that the 0-d bool ``condition`` holds, so that a mask the compiled model
    cannot serve fails the call instead of giving a wrong answer. Nothing during CUDA-graph capture
    (no host read is possible there)."""
    if torch.compiler.is_compiling():
        # as an integer: torch 2.11 inserts no run-time check for a bool .item() (2.14 does)
        torch._check(condition.to(torch.int64).item() == 1)


# cu_seqlens tensors whose values were checked on the host, so that a model calling
# varlen_attention once per layer with the same tensor syncs the device once, not once per layer.
# Keyed by id(); an entry holds a weak reference (the id may be reused after the tensor dies), the
# tensor's version counter (bumped by any in-place write), its data pointer and the packed length.
# Inference tensors (made under torch.inference_mode) have no version counter: they are remembered
# by reference, pointer and length only, so an in-place write to one between calls goes unseen,
# as every value check does under torch.compile and CUDA graph capture.
_CU_CHECKED: "OrderedDict[int, tuple]" = OrderedDict()
_CU_CHECKED_MAX = 16


def tensor_version(t: Tensor) -> Optional[int]:
    """``t``'s version counter (bumped by every in-place write), for cache keys; None for an
    inference tensor, which has none."""
    return None if t.is_inference() else t._version


def _cu_cache_get(cu: Tensor, total: int) -> Optional[list]:
    hit = _CU_CHECKED.get(id(cu))
    if hit is None:
        return None
    ref, version, ptr, checked_total, values = hit
    if ref() is not cu or version != tensor_version(cu) or ptr != cu.data_ptr() or checked_total != total:
        del _CU_CHECKED[id(cu)]
        return None
    _CU_CHECKED.move_to_end(id(cu))
    return values


def _cu_cache_put(cu: Tensor, total: int, values: list) -> None:
    try:
        ref = weakref.ref(cu)
    except TypeError:  # not weak-referenceable (a tensor subclass): just do not cache
        return
    _CU_CHECKED[id(cu)] = (ref, tensor_version(cu), cu.data_ptr(), total, values)
    while len(_CU_CHECKED) > _CU_CHECKED_MAX:
        _CU_CHECKED.popitem(last=False)


def check_cu_seqlens(name: str, cu: Tensor, total: int, device: torch.device,
                     values: bool = True) -> Optional[list]:
    """Checks a cumulative-lengths tensor and, with ``values``, returns it as a Python list (one
    host sync, remembered for the same unmodified tensor: later checks of it cost no sync);
    without, checks only its type, dtype, shape and device and returns None."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type_name(cu)}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 (or int64) tensor, got dtype {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the packed tensors are on {device}")
    if not values:
        return None
    cached = _cu_cache_get(cu, total)
    if cached is not None:
        return cached
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be non-decreasing (cumulative sequence lengths), got {values}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] = {values[-1]} does not match the packed length {total}")
    _cu_cache_put(cu, total, values)
    return values
