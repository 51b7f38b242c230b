"""Measured dispatch: which backend ``backend="auto"`` tries first, from ``fastbert bench`` results.

Several ops have two fast backends (Triton and CUDA C++). Which one is faster depends on the GPU,
the dtype and the shape, so "auto" does not guess: it reads a *dispatch table* built from measured
benchmark results and, for a call on a CUDA tensor, tries the backends in the measured order of
the call's **shape class**. Where the table has no entry (no measurement for this GPU
architecture, op, dtype or shape class), the op's default priority applies (see
:mod:`fastbert.backends`). A backend that cannot serve a call is still skipped, with its reasons,
exactly as without a table.

Shape classes (see :func:`shape_class`) are coarse on purpose, so that a handful of benchmark cases
covers every call:

* attention: dtype, head dim (<=64, <=128, >128), key length (<=512, >512), masked or not, causal
  or not — e.g. ``"fp16/D<=64/Lk<=512/mask/full"``;
* LayerNorm, add+LayerNorm, GELU, bias+GELU, GEGLU: dtype and row width (<=1024, <=4096, >4096;
  GEGLU's is its output width N, half a packed input's) — e.g.
  ``"bf16/N<=1024"``; an add+LayerNorm whose residual has another dtype than its input (mixed
  precision) is a class of its own, e.g. ``"bf16+fp32/N<=1024"``.

The table is JSON::

    {"format": "fastbert-dispatch/1",
     "sources": ["bench/results/2026-12-01-h100/results.json"],
     "archs": {"sm90": {"layer_norm": {"fp16/N<=1024": {"order": ["cuda", "triton"],
                                                        "ms": {"cuda": 0.011, "triton": 0.013},
                                                        "cases": 4}}}}}

``order`` is fastest first; ``ms`` is each backend's geometric-mean p50 over the class's cases
(informational). The table shipped with fastbert (``fastbert/dispatch_table.json``; none yet, as no
GPU results are committed) is regenerated from the committed GPU results by
``python bench/make_dispatch_table.py``; point the environment
variable ``FASTBERT_DISPATCH_TABLE`` at a table of your own to dispatch by measurements of your GPU::

    fastbert bench --op attention --op norms --out my-bench
    fastbert dispatch my-bench/results.json --out my-table.json
    FASTBERT_DISPATCH_TABLE=my-table.json python train.py
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["FORMAT", "TABLE_ENV", "SHIPPED_TABLE", "MEASURED_OPS", "shape_class",
           "bench_shape_class", "build_table", "load_table", "active_table", "measured_order",
           "arch_of", "arch_of_capability", "reset_cache", "table_generation", "write_table",
           "summary_lines"]

FORMAT = "fastbert-dispatch/1"
TABLE_ENV = "FASTBERT_DISPATCH_TABLE"
SHIPPED_TABLE = Path(__file__).with_name("dispatch_table.json")
# Backends a table may order (the torch reference is always the fallback, never measured first).
FAST_BACKENDS = ("triton", "cuda")
# Two backends closer than this (ratio of geometric-mean times) count as a tie: the op's default
# priority decides, so that timing noise does not flip the order from one run to the next.
TIE = 1.03

_ATTENTION_OPS = ("scaled_dot_product_attention",)
_ROW_OPS = ("layer_norm", "add_layer_norm", "gelu", "bias_gelu", "geglu")
MEASURED_OPS = _ATTENTION_OPS + _ROW_OPS

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.float64: "fp64"}


# ----------------------------------------------------------------------------------------------
# Shape classes
# ----------------------------------------------------------------------------------------------
def _bucket(value: int, edges: Sequence[int], name: str) -> str:
    for edge in edges:
        if value <= edge:
            return f"{name}<={edge}"
    return f"{name}>{edges[-1]}"


def _attention_class(dtype: str, d: int, lk: int, masked: bool, causal: bool,
                     window: bool = False, gqa: bool = False) -> str:
    """A sliding window or grouped-query heads make a class of their own (the backends handle
    them differently: block skipping, K/V read in place or repeated), so that they do not decide
    the ranking of plain dense calls."""
    parts = [dtype, _bucket(d, (64, 128), "D"), _bucket(lk, (512,), "Lk"),
             "mask" if masked else "nomask", "causal" if causal else "full"]
    parts += ["window"] * window + ["gqa"] * gqa
    return "/".join(parts)


def _row_class(dtype: str, n: int) -> str:
    return f"{dtype}/{_bucket(n, (1024, 4096), 'N')}"


def shape_class(op: str, **call) -> Optional[str]:
    """The shape class of a call of ``op`` (the keyword arguments its dispatch receives), or None
    for an op that has no measured dispatch."""
    if op in _ATTENTION_OPS:
        q, k = call["query"], call["key"]
        gqa = q.dim() >= 3 and k.dim() >= 3 and k.shape[-3] != q.shape[-3]
        return _attention_class(_DTYPE_NAMES.get(q.dtype, str(q.dtype)), q.shape[-1], k.shape[-2],
                                call.get("attn_mask") is not None, bool(call.get("is_causal")),
                                call.get("window_size") is not None, gqa)
    if op in _ROW_OPS:
        x, r = call["input"], call.get("residual")
        dtype = _DTYPE_NAMES.get(x.dtype, str(x.dtype))
        if isinstance(r, torch.Tensor) and r.dtype != x.dtype:  # mixed precision: "bf16+fp32"
            dtype += "+" + _DTYPE_NAMES.get(r.dtype, str(r.dtype))
        n = x.shape[-1] if x.dim() else 1
        if op == "geglu" and call.get("gate") is None:  # packed: the output width is half
            n //= 2
        return _row_class(dtype, n)
    return None


def bench_shape_class(op: str, dtype: str, params: Mapping) -> Optional[str]:
    """The shape class of a benchmark row (its op, dtype name and case parameters), or None."""
    try:
        if op in _ATTENTION_OPS:
            return _attention_class(dtype, int(params["D"]), int(params["Lk"]),
                                    params.get("mask", "none") != "none", bool(params.get("causal")),
                                    params.get("window") is not None,
                                    int(params.get("Hkv", params.get("H", 0))) != int(params.get("H", 0)))
        if op in _ROW_OPS:
            return _row_class(dtype, int(params["N"]))
    except (KeyError, TypeError, ValueError):
        return None
    return None


def arch_of_capability(capability: str) -> Optional[str]:
    """"9.0" -> "sm90"."""
    try:
        major, minor = (int(x) for x in str(capability).split(".")[:2])
    except ValueError:
        return None
    return f"sm{major}{minor}"


def arch_of(device: torch.device) -> Optional[str]:
    """``"sm90"`` for a CUDA device of compute capability 9.0; None for a non-CUDA device.
    (``get_device_properties`` and ``current_device`` are constant-folded by torch.compile.)"""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return f"sm{props.major}{props.minor}"


# ----------------------------------------------------------------------------------------------
# Building a table from benchmark results
# ----------------------------------------------------------------------------------------------
def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _order(times: Mapping[str, float], default: Sequence[str]) -> List[str]:
    """Backends fastest first; within a factor ``TIE`` of the one before, the default order wins."""
    rank = {b: i for i, b in enumerate(default)}
    by_default = sorted(times, key=lambda b: rank.get(b, len(rank)))
    fastest = min(times.values())
    # Tied with the fastest -> keep default order among them, then the rest by time.
    tied = [b for b in by_default if times[b] <= fastest * TIE]
    rest = sorted((b for b in times if b not in tied), key=lambda b: times[b])
    return tied + rest


def build_table(runs: Iterable[Mapping], sources: Sequence[str] = (),
                default: Sequence[str] = FAST_BACKENDS) -> Dict:
    """A dispatch table from ``fastbert bench`` runs (the ``runs`` of results.json files).

    For each GPU architecture, op and shape class, only the cases where every fast backend that
    appears in the class was measured ("ok", result checked against the reference) are used, so
    that the comparison is like for like; each backend's time is the geometric mean of its p50
    over those cases. A class where fewer than two backends were measured gets no entry.
    A case measured again by a later run is taken from that run (all its backends together).
    """
    # (arch, op, class) -> case key -> backend -> p50 ms
    cases: Dict[Tuple[str, str, str], Dict[Tuple, Dict[str, float]]] = defaultdict(dict)
    for run in runs:
        env = run.get("env")
        arch = arch_of_capability(env.get("capability", "") if isinstance(env, Mapping) else "")
        if arch is None:
            continue
        measured: Dict[Tuple, Dict[str, float]] = defaultdict(dict)  # this run's cases
        for row in run.get("rows", ()):
            if not row.get("ours") or row.get("status") != "ok" or row.get("variant"):
                continue
            backend = row.get("backend")
            p50 = row.get("p50_ms")
            if (backend not in FAST_BACKENDS or isinstance(p50, bool)
                    or not isinstance(p50, (int, float)) or not p50 > 0):
                continue
            params = row.get("params")
            cls = bench_shape_class(row.get("op", ""), row.get("dtype", ""),
                                    params if isinstance(params, Mapping) else {})
            if cls is not None:
                measured[(arch, row["op"], cls, row.get("case"), row.get("pass"))][backend] = float(p50)
        for (arch_, op, cls, case, pass_), times in measured.items():
            cases[(arch_, op, cls)][(case, pass_)] = times  # a later run replaces the whole case
    archs: Dict[str, Dict] = {}
    for (arch, op, cls), by_case in sorted(cases.items()):
        backends = sorted({b for times in by_case.values() for b in times})
        complete = [times for times in by_case.values() if all(b in times for b in backends)]
        if len(backends) < 2 or not complete:
            continue
        ms = {b: _geomean([t[b] for t in complete]) for b in backends}
        archs.setdefault(arch, {}).setdefault(op, {})[cls] = {
            "order": _order(ms, default), "ms": {b: round(v, 6) for b, v in ms.items()},
            "cases": len(complete)}
    return {"format": FORMAT, "sources": list(sources), "archs": archs}


# ----------------------------------------------------------------------------------------------
# Loading and lookup
# ----------------------------------------------------------------------------------------------
def load_table(path) -> Dict:
    """Read and check a dispatch table; ``ValueError`` naming the file when it is not one."""
    path = Path(path)
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"dispatch table {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"dispatch table {path} is not valid JSON ({e})") from None
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise ValueError(f"dispatch table {path} is not a {FORMAT} table "
                         f"(format: {table.get('format') if isinstance(table, dict) else None!r})")
    archs = table.get("archs")
    if not isinstance(archs, dict):
        raise ValueError(f"dispatch table {path}: 'archs' must be an object")
    for arch, ops in archs.items():
        for op, classes in ops.items():
            for cls, entry in classes.items():
                order = entry.get("order") if isinstance(entry, dict) else None
                if (not isinstance(order, list) or not order
                        or any(b not in FAST_BACKENDS for b in order)):
                    raise ValueError(f"dispatch table {path}: {arch}/{op}/{cls} needs an 'order' "
                                     f"listing backends among {FAST_BACKENDS}, got {order!r}")
    return table


_EMPTY = {"format": FORMAT, "sources": [], "archs": {}}
_ACTIVE: Optional[Tuple[Optional[str], Dict]] = None  # (source, table)
_ACTIVE_ERROR: Optional[str] = None
_GENERATION = 0  # bumped by every (re)load, so that backends.select forgets what it remembered


def reset_cache() -> None:
    """(Re)load the active table: ``FASTBERT_DISPATCH_TABLE`` if set, else the shipped table if
    present, else an empty one. Called once at import (so that no file is read while
    torch.compile traces an op) and again after changing ``FASTBERT_DISPATCH_TABLE``. A bad table
    named by the variable is remembered, and every measured lookup then raises its ValueError."""
    global _ACTIVE, _ACTIVE_ERROR, _GENERATION
    _ACTIVE, _ACTIVE_ERROR = None, None
    _GENERATION += 1
    path = os.environ.get(TABLE_ENV)
    try:
        if path:
            _ACTIVE = (path, load_table(path))
        elif SHIPPED_TABLE.exists():
            _ACTIVE = (str(SHIPPED_TABLE), load_table(SHIPPED_TABLE))
        else:
            _ACTIVE = (None, _EMPTY)
    except ValueError as e:
        _ACTIVE_ERROR = f"{TABLE_ENV}: {e}" if path else str(e)


def table_generation() -> int:
    """How many times the active table has been (re)loaded: part of the key under which
    :func:`fastbert.backends.select` remembers its answers."""
    return _GENERATION


def active_table() -> Tuple[Optional[str], Dict]:
    """(where it came from or None, the table). ValueError when the table could not be loaded."""
    if _ACTIVE_ERROR is not None:
        raise ValueError(_ACTIVE_ERROR)
    assert _ACTIVE is not None
    return _ACTIVE


def measured_order(op: str, device: Optional[torch.device], call: Mapping) -> Optional[List[str]]:
    """The measured backend order for this call, or None (no table entry applies)."""
    if device is None or device.type != "cuda" or op not in MEASURED_OPS:
        return None
    archs = active_table()[1]["archs"]
    if not archs:
        return None
    ops = archs.get(arch_of(device))
    classes = ops.get(op) if ops else None
    if not classes:
        return None
    entry = classes.get(shape_class(op, **call))
    return list(entry["order"]) if entry else None


# ----------------------------------------------------------------------------------------------
# Writing (``fastbert dispatch`` and bench/make_dispatch_table.py)
# ----------------------------------------------------------------------------------------------
def write_table(results: Sequence, out, sources: Optional[Sequence[str]] = None) -> Dict:
    """Build a table from ``fastbert bench`` results.json files (oldest first) and write it to
    ``out`` (atomically); returns it. OSError / ValueError name the file that could not be read."""
    from .benchmarks import report

    runs = []
    for f in results:
        runs.extend(report.load_results(f)["runs"])
    table = build_table(runs, sources=list(sources) if sources is not None else [str(f) for f in results])
    out = Path(out)
    if out.is_dir() or not out.name:
        raise ValueError(f"--out {str(out)!r} is a directory; give the table's file name, e.g. "
                         f"{out / 'dispatch_table.json'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        tmp.replace(out)
    finally:
        if tmp.exists():  # a failed write or replace leaves nothing behind
            tmp.unlink()
    return table


def summary_lines(table: Mapping) -> List[str]:
    """One line per shape class: the order chosen and each backend's time."""
    lines = []
    for arch, ops in sorted(table["archs"].items()):
        for op, classes in sorted(ops.items()):
            for cls, entry in sorted(classes.items()):
                times = ", ".join(f"{b} {entry['ms'][b]:.4g} ms" for b in entry["order"])
                lines.append(f"{arch} {op:<30} {cls:<36} {' > '.join(entry['order']):<14} "
                             f"({times}; {entry['cases']} cases)")
    return lines


reset_cache()
