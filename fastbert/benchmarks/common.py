"""What every benchmark case is made of, the work formulas, and the correctness checks.

A :class:`Case` is one shape of one op in one pass ("fwd", "bwd" or "fwd+bwd"): its parameters,
the work of one call (flops, or bytes for memory-bound ops) and a list of :class:`Impl` — fastbert
on each backend and the peers (torch eager, each SDPA backend, FlexAttention, torch.compile,
Liger-Kernel, ...). The runner (:mod:`fastbert.benchmarks.runner`) builds the case's inputs, asks
each implementation to :meth:`Impl.prepare` itself (raising :class:`Unavailable` with the reason
when it cannot run here), checks its result against ``fastbert.reference`` and only then times it.

Work formulas (FlashAttention's conventions):

* attention flops = 4 * B * H * Lq * Lk * D (two matmuls of 2 * Lq * Lk * D each); x0.5 causal;
  backward x2.5; forward + backward x3.5. Varlen sums the formula over the real sequences, and
  dense key padding over each sequence's real keys, so the padded peers of those cases are
  credited with the useful work only (same work, fair speedup).
* memory-bound ops: bytes = each tensor the op must read, plus each tensor it must write, once
  (see :func:`norm_bytes`).
"""
from __future__ import annotations

import math
import re
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "PASSES", "PASS_FLOP_FACTOR", "Unavailable", "Prepared", "Impl", "Case", "CheckResult",
    "attention_flops", "varlen_attention_flops", "block_sparse_flops", "linformer_flops",
    "bert_flops", "modernbert_flops", "norm_bytes", "dtype_name", "slug", "compare", "fastbert_impl",
    "configure_compile", "reason_text",
]

PASSES = ("fwd", "bwd", "fwd+bwd")
# Backward of attention does 2.5x the forward's matmul work (FlashAttention's convention: five
# matmuls against two), so forward + backward is 3.5x.
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
# A plain matmul's backward does twice its forward (dX and dW).
LINEAR_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}


class Unavailable(Exception):
    """An implementation cannot run a case here; the message says why (recorded, never hidden)."""


@dataclass
class Prepared:
    """An implementation made ready for one case.

    ``forward(state)`` returns the output tensor. ``leaves(state)`` lists the tensors whose
    gradients are the backward result (default: the case's); ``upstream(state)`` the gradient fed
    to ``output.backward`` (default ``state.do``); ``adapt(state, out, grads)`` maps the output and
    gradients to the case's canonical layout before the check (e.g. padded -> packed).
    ``graph_safe`` says whether the forward may be captured in a CUDA graph (no host syncs).
    """
    forward: Callable[[Any], Tensor]
    leaves: Optional[Callable[[Any], List[Tensor]]] = None
    upstream: Optional[Callable[[Any], Tensor]] = None
    adapt: Optional[Callable[[Any, Tensor, List[Optional[Tensor]]], Tuple[Tensor, list]]] = None
    graph_safe: bool = True
    note: str = ""


@dataclass
class Impl:
    """One implementation of a case: ``prepare(case, state) -> Prepared`` or raise Unavailable.

    ``variant`` marks an implementation that computes a different function on purpose (e.g. the
    dense baselines of a block-sparse case); the case's check compares it with that function.
    ``work`` overrides the case's work for it (e.g. dense flops in a Linformer case).
    ``skip_in_quick`` (a reason) leaves it out of ``--quick`` runs, recorded as skipped.
    """
    name: str
    prepare: Callable[["Case", Any], Prepared]
    ours: bool = False
    backend: Optional[str] = None
    variant: Optional[str] = None
    work: Optional[float] = None
    skip_in_quick: Optional[str] = None   # reason recorded instead of running under --quick


@dataclass
class CheckResult:
    ok: bool
    err: float
    allowed: float
    what: str = "output"

    def __str__(self) -> str:
        return f"{self.what}: worst error {self.err:.3e} (allowed {self.allowed:.3e} there)"


@dataclass
class Case:
    """One benchmark case; see the module docstring."""
    family: str                    # "attention", "sparse", "norms", "bert" (the --op families)
    op: str                        # the fastbert op name (also accepted by --op)
    name: str                      # unique within the family, readable: "fwd-B32-H12-L512-D64-fp16-pad"
    pass_: str                     # "fwd", "bwd" or "fwd+bwd"
    dtype: torch.dtype
    params: Dict[str, Any]         # shapes and options, recorded with every result
    metric: str                    # "TFLOP/s" or "GB/s"
    work: float                    # flops or bytes of one call
    x_key: str                     # the parameter plotted on the x axis
    series: str                    # cases of one series form one plot panel
    setup: Callable[[torch.device], Any]          # builds one set of inputs (a namespace)
    impls: List[Impl]
    dtype_label: Optional[str] = None  # recorded dtype when not dtype's name, e.g. "bf16+fp32"
    leaves: Callable[[Any], List[Tensor]] = field(default=lambda s: [])
    check: Optional[Callable[[Any, Tensor, list, Optional[str]], CheckResult]] = None
    footprint: int = 0             # bytes of one input set + output (decides input rotation)
    rotate: bool = True            # False: inputs never fit in L2 or cannot be duplicated
    quick: bool = False            # part of the --quick selection

    def __post_init__(self):
        if self.pass_ not in PASSES:
            raise ValueError(f"pass must be one of {PASSES}, got {self.pass_!r}")
        if self.metric not in ("TFLOP/s", "GB/s"):
            raise ValueError(f"metric must be 'TFLOP/s' or 'GB/s', got {self.metric!r}")

    @property
    def id(self) -> str:
        return f"{self.family}/{self.name}"

    def work_of(self, impl: Impl) -> float:
        return self.work if impl.work is None else impl.work


# ----------------------------------------------------------------------------------------------
# Work formulas
# ----------------------------------------------------------------------------------------------
def attention_flops(b: int, h: int, lq: int, lk: int, d: int, *, causal: bool = False,
                    pass_: str = "fwd", dv: Optional[int] = None) -> float:
    """4 * B * H * Lq * Lk * D (QK^T and PV), x0.5 causal, x2.5 backward, x3.5 forward + backward.

    The causal x0.5 is FlashAttention's convention for a square mask; with Lq != Lk the pairs a
    causal mask keeps depend on its alignment, so that is refused (count them, as
    :func:`window_pairs` does)."""
    if causal and lq != lk:
        raise ValueError(f"attention_flops: the causal x0.5 convention needs Lq == Lk, got "
                         f"Lq={lq}, Lk={lk}")
    dv = d if dv is None else dv
    flops = 2.0 * b * h * lq * lk * d + 2.0 * b * h * lq * lk * dv
    if causal:
        flops *= 0.5
    return flops * PASS_FLOP_FACTOR[pass_]


def varlen_attention_flops(seqlens: Sequence[int], h: int, d: int, *, causal: bool = False,
                           pass_: str = "fwd") -> float:
    """Useful attention flops of a variable-length batch: the formula summed over its sequences."""
    return sum(attention_flops(1, h, n, n, d, causal=causal, pass_=pass_) for n in seqlens)


def block_sparse_flops(layout: Tensor, block_size: int, b: int, h: int, lq: int, lk: int, d: int,
                       *, pass_: str = "fwd") -> float:
    """Flops of the visited blocks only: 4 * D * (attended query-key pairs), summed over heads.

    ``layout`` is (H or 1, nbq, nbk); the last block row/column may be shorter than block_size."""
    layout = layout.bool().cpu()
    nbq, nbk = layout.shape[-2:]
    rows = torch.full((nbq,), block_size, dtype=torch.float64)
    cols = torch.full((nbk,), block_size, dtype=torch.float64)
    rows[-1] = lq - block_size * (nbq - 1)
    cols[-1] = lk - block_size * (nbk - 1)
    pairs = (layout.double() * rows[:, None] * cols[None, :]).sum()
    if layout.shape[0] == 1:
        pairs = pairs * h
    return float(4.0 * b * d * pairs) * PASS_FLOP_FACTOR[pass_]


def linformer_flops(b: int, h: int, lq: int, lk: int, k: int, d: int, *, pass_: str = "fwd") -> float:
    """Projections E K and F V (2 * 2 * k * Lk * D each per head) plus attention over k keys."""
    proj = 2 * (2.0 * b * h * k * lk * d)
    return proj * LINEAR_FLOP_FACTOR[pass_] + attention_flops(b, h, lq, k, d, pass_=pass_)


def bert_flops(seqlens: Sequence[int], *, hidden: int = 768, layers: int = 12,
               intermediate: int = 3072, pass_: str = "fwd") -> float:
    """Useful flops of a BERT encoder on sequences of the given real lengths.

    Per layer and sequence of n tokens: 2 * n * (4 * h^2 + 2 * h * i) for the Q, K, V, output and
    the two FFN matmuls, plus 4 * n^2 * h for attention. Backward counts 2x the matmuls and 2.5x
    attention. BERT-base at B32 L384: 2.26 TFLOP forward.
    """
    lin = sum(2.0 * n * (4 * hidden * hidden + 2 * hidden * intermediate) for n in seqlens)
    att = sum(4.0 * n * n * hidden for n in seqlens)
    return layers * (lin * LINEAR_FLOP_FACTOR[pass_] + att * PASS_FLOP_FACTOR[pass_])


def modernbert_flops(seqlens: Sequence[int], *, hidden: int = 768, layers: int = 22,
                     intermediate: int = 1152, global_every: int = 3, window: int = 64,
                     pass_: str = "fwd", layer_types: Optional[Sequence[str]] = None) -> float:
    """Useful flops of a ModernBERT encoder on sequences of the given real lengths.

    Per layer and sequence of n tokens: 2 * n * (4 * h^2 + 3 * h * i) for Wqkv, Wo and the GeGLU
    MLP (Wi: h -> 2i, Wo: i -> h), plus 4 * h * (attended query-key pairs): n^2 in the global
    layers (layer 0 and every ``global_every``-th after it, as transformers builds them), the pairs
    with |q - k| <= ``window`` (half of ``local_attention``) in the others. ``layer_types`` (a
    transformers 5.x config's list of "full_attention" / "sliding_attention", one per layer) names
    the global layers instead of ``global_every``. Backward counts 2x the matmuls and 2.5x
    attention. ModernBERT-base at B32 L512: 3.91 TFLOP forward (BERT's formula at its sizes: 3.54).
    """
    if global_every < 1 or window < 0:
        raise ValueError(f"global_every must be >= 1 and window >= 0, got {global_every}, {window}")
    if layer_types is None:
        n_global = len(range(0, layers, global_every))
    else:
        kinds = set(layer_types) - {"full_attention", "sliding_attention"}
        if len(layer_types) != layers or kinds:
            raise ValueError(f"layer_types must hold {layers} entries, each 'full_attention' or "
                             f"'sliding_attention', got {list(layer_types)}")
        n_global = sum(t == "full_attention" for t in layer_types)
    lin = sum(2.0 * n * (4 * hidden * hidden + 3 * hidden * intermediate) for n in seqlens)
    full = sum(float(n) * n for n in seqlens)
    # |q - k| <= w within n tokens: the diagonal, and n - d pairs at each distance d = 1..w each side
    local = sum(n + 2.0 * (min(window, n - 1) * n - min(window, n - 1) * (min(window, n - 1) + 1) / 2)
                for n in seqlens if n > 0)
    att = 4.0 * hidden * (n_global * full + (layers - n_global) * local)
    return layers * lin * LINEAR_FLOP_FACTOR[pass_] + att * PASS_FLOP_FACTOR[pass_]


def norm_bytes(op: str, pass_: str, rows: int, cols: int, itemsize: int,
               param_itemsize: Optional[int] = None,
               residual_itemsize: Optional[int] = None) -> float:
    """Bytes that ``op`` must move, each tensor read or written once.

    ``itemsize`` is the input's; ``residual_itemsize`` (add_layer_norm only) a residual of another
    dtype (mixed precision: e.g. a bf16 input with an fp32 residual stream), in which case the
    results take the larger itemsize and the input's and residual's gradients are written apart.

    forward  layer_norm:     read x, weight, bias; write y
             add_layer_norm: read input, residual, input_bias, weight, bias; write y
             gelu:           read x; write y
             bias_gelu:      read x, bias; write y
             geglu:          read the (rows, 2 * cols) input; write y
    backward layer_norm:     read dy, x, weight; write dx, dweight, dbias (row statistics are
                             recomputable, so they are not counted)
             add_layer_norm: read dy, input, residual, input_bias, weight; write dinput (the same
                             values are the residual's gradient when dropout_p = 0), dweight, dbias,
                             dinput_bias
             gelu:           read dy, x; write dx
             bias_gelu:      read dy, x, bias; write dx, dbias
             geglu:          read dy and the (rows, 2 * cols) input; write its gradient
    ``fwd+bwd`` is the sum of both. For geglu, ``cols`` is the output width N (the input holds
    2N: the GELU half and the gate).
    """
    p = itemsize if param_itemsize is None else param_itemsize
    big = rows * cols * itemsize
    vec = cols * p
    table = {
        ("layer_norm", "fwd"): 2 * big + 2 * vec,
        ("add_layer_norm", "fwd"): 3 * big + 3 * vec,
        ("gelu", "fwd"): 2 * big,
        ("bias_gelu", "fwd"): 2 * big + vec,
        ("geglu", "fwd"): 3 * big,
        ("layer_norm", "bwd"): 3 * big + 3 * vec,
        ("add_layer_norm", "bwd"): 4 * big + 5 * vec,
        ("gelu", "bwd"): 3 * big,
        ("bias_gelu", "bwd"): 3 * big + 2 * vec,
        ("geglu", "bwd"): 5 * big,
    }
    if residual_itemsize is not None and residual_itemsize != itemsize:
        if op != "add_layer_norm":
            raise ValueError(f"residual_itemsize is for add_layer_norm, not {op!r}")
        elems = rows * cols
        x, r, o = itemsize, residual_itemsize, max(itemsize, residual_itemsize)
        table[("add_layer_norm", "fwd")] = elems * (x + r + o) + 3 * vec
        table[("add_layer_norm", "bwd")] = elems * (o + x + r + x + r) + 5 * vec
    if pass_ == "fwd+bwd":
        return float(table[(op, "fwd")] + table[(op, "bwd")])
    try:
        return float(table[(op, pass_)])
    except KeyError:
        raise ValueError(f"no byte formula for op {op!r} pass {pass_!r}") from None


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (file-name safe)."""
    text = re.sub(r"^nvidia\s+", "", text.strip(), flags=re.I).lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def reason_text(exc: BaseException, limit: int = 300) -> str:
    """One readable line from an exception (its first non-empty line, shortened)."""
    msg = str(exc).strip()
    first = next((line.strip() for line in msg.splitlines() if line.strip()), "")
    text = f"{type(exc).__name__}: {first}" if not isinstance(exc, Unavailable) else first
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ns(**kwargs) -> types.SimpleNamespace:
    return types.SimpleNamespace(**kwargs)


def compare(items: Sequence[Tuple[str, Optional[Tensor], Tensor, Optional[Tensor]]],
            factor: float = 2.0) -> CheckResult:
    """Check several (name, out, ref, lowp_ref) with fastbert's rule; returns the worst.

    ``ref`` is computed in high precision; ``lowp_ref`` by PyTorch in the output's precision (see
    :mod:`fastbert.testing`). A missing output (e.g. no gradient reached an input) fails.
    """
    from ..testing import check_close

    worst = CheckResult(True, 0.0, 0.0, "nothing")
    worst_ratio = -1.0
    for name, out, ref, lowp in items:
        if out is None:
            return CheckResult(False, math.inf, 0.0, f"{name} (missing)")
        if tuple(out.shape) != tuple(ref.shape):
            return CheckResult(False, math.inf, 0.0,
                               f"{name} shape {tuple(out.shape)} != {tuple(ref.shape)}")
        ok, err, allowed = check_close(out, ref, lowp, factor=factor)
        ratio = err / allowed if allowed > 0 else (0.0 if err == 0 else math.inf)
        if not ok:
            return CheckResult(False, err, allowed, name)
        if ratio > worst_ratio:
            worst, worst_ratio = CheckResult(True, err, allowed, name), ratio
    return worst


def fastbert_impl(backend: str, op: str, forward: Callable[[Any, str], Tensor], *,
                  name: Optional[str] = None, variant: Optional[str] = None,
                  work: Optional[float] = None, graph_safe: bool = True,
                  adapt=None, leaves=None, upstream=None) -> Impl:
    """fastbert's ``op`` on ``backend`` ("triton" or "cuda").

    Availability is asked from :mod:`fastbert.backends` (``explain``: reasons of the backend on
    this device) and then from the op itself, whose dispatch raises ``BackendError`` listing every
    reason when the backend cannot serve this very call; either way the reason is recorded.
    """
    def prepare(case: Case, state) -> Prepared:
        from .. import backends

        if op not in backends.op_names():
            raise Unavailable(f"op {op!r} is not registered in fastbert.backends")
        impls = backends.implementations(op)
        if backend not in impls:
            raise Unavailable(f"{op} has no {backend} implementation in this checkout "
                              f"(implemented: {', '.join(sorted(impls))})")
        device = getattr(state, "device", None)
        reasons = backends.backend_reasons(backend, device, explicit=True)
        if reasons:
            raise Unavailable("; ".join(reasons))
        try:  # the op's own dispatch: BackendError lists why this call cannot be served (with
            # grad mode as timed: an inference-only kernel declines a call that needs gradients)
            with torch.set_grad_enabled(case.pass_ != "fwd"):
                forward(state, backend)
        except backends.BackendError as e:
            raise Unavailable(str(e)) from None
        except NotImplementedError as e:
            raise Unavailable(f"not implemented: {e}") from None
        return Prepared(lambda s: forward(s, backend), graph_safe=graph_safe, adapt=adapt,
                        leaves=leaves, upstream=upstream)

    return Impl(name or f"fastbert-{backend}", prepare, ours=True, backend=backend,
                variant=variant, work=work)


def configure_compile(limit: int = 256) -> None:
    """Settings torch.compile needs for benchmarking.

    * Every case is a new static shape: raise dynamo's recompile limits (past 8 recompiles of one
      function it silently falls back to eager).
    * The "bwd" pass times ``out.backward(retain_graph=True)`` repeatedly on one forward; AOTAutograd's
      donated buffers forbid ``retain_graph``, so they are turned off (a memory saving, not a speed
      one).
    """
    try:
        import torch._dynamo.config as cfg
    except Exception:  # pragma: no cover - torch without dynamo
        return
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4 * limit))
    try:
        import torch._functorch.config as fcfg
        if hasattr(fcfg, "donated_buffer"):
            fcfg.donated_buffer = False
    except Exception:  # pragma: no cover
        pass


def leaves_grads(tensors: Sequence[Tensor]) -> List[Optional[Tensor]]:
    return [t.grad for t in tensors]
