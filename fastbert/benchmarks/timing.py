"""Timing: CUDA events around each call, warm-up, L2 flushed, median with p20/p80; CUDA graphs for
small latency-bound calls.

* **Events, L2 flushed** (the default, as ``triton.testing.do_bench``): the call is first timed a
  few times to size the warm-up and the number of repetitions (``warmup_ms``, ``rep_ms``); before
  each timed call a buffer larger than L2 is zeroed (outside the timed region) and the gradients of
  ``grad_to_none`` are dropped, so no call finds the previous one's data in cache.
* **CUDA graph** (``graph=True`` and a call shorter than ``GRAPH_BELOW_MS``): a call that short is
  bound by the host's launch overhead, which the events would measure instead of the GPU work. The
  calls of one rotation over the input sets are captured into a graph (repeated to at least
  ``GRAPH_MIN_CALLS`` calls) and the graph's replays are timed; the input sets rotate so that the
  data does not sit in L2 (no flush happens inside a graph). If capture fails, events are used and
  the reason is kept in ``Timing.note``. The runner asks for graphs for forward and
  forward + backward calls; a backward alone replays a forward graph recorded outside the capture,
  which a CUDA graph cannot take, so it is timed with events.

``fn(i)`` is called with the repetition index; implementations pick input set ``i % n_inputs``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

__all__ = ["Timing", "quantile", "summarize", "CudaTimer", "CpuTimer", "rotation_count",
           "GRAPH_BELOW_MS"]

GRAPH_BELOW_MS = 0.1      # calls under 100 us are launch-bound: time them in a CUDA graph
GRAPH_MIN_CALLS = 20      # calls captured per graph replay (amortises the replay's own launch)
FLUSH_BYTES = 256 << 20   # at least this many bytes are zeroed to flush L2 (H100: 50 MB)


@dataclass
class Timing:
    p20_ms: float
    p50_ms: float
    p80_ms: float
    reps: int
    method: str             # "events", "cudagraph" or "cpu"
    note: str = ""


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of an ascending sequence (numpy's default method)."""
    if not sorted_values:
        raise ValueError("quantile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float], method: str, note: str = "") -> Timing:
    s = sorted(float(t) for t in times_ms)
    return Timing(quantile(s, 0.2), quantile(s, 0.5), quantile(s, 0.8), len(s), method, note)


def rotation_count(footprint_bytes: int, l2_bytes: int, max_sets: int = 8) -> int:
    """Input sets to rotate through so that one rotation spans about 3x the L2 cache: calls whose
    inputs fit in L2 would otherwise read them from cache, which a real model rarely does (a
    footprint between 1x and 3x the L2 still gets at least two sets: one set re-read call after
    call would partly hit)."""
    if footprint_bytes <= 0 or l2_bytes <= 0 or footprint_bytes >= 3 * l2_bytes:
        return 1
    return max(2, min(max_sets, math.ceil(3 * l2_bytes / footprint_bytes)))


def l2_cache_bytes(device=None) -> int:
    """The L2 cache size of a CUDA device in bytes (0 when unknown)."""
    index = torch.cuda.current_device() if device is None else torch.device(device).index
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
    return int(getattr(props, "L2_cache_size", 0) or 0)


def _drop_grads(tensors: Optional[Sequence[torch.Tensor]]) -> None:
    if tensors:
        for t in tensors:
            t.grad = None


class CudaTimer:
    """Times ``fn`` on the current CUDA device (see the module docstring)."""

    def __init__(self, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 10,
                 max_reps: int = 2000, use_graphs: bool = True):
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.min_reps = min_reps
        self.max_reps = max_reps
        self.use_graphs = use_graphs
        self._flush_buf = None

    def _flush(self) -> None:
        if self._flush_buf is None:
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            l2 = int(getattr(props, "L2_cache_size", 0) or 0)
            self._flush_buf = torch.empty(max(FLUSH_BYTES, 4 * l2), dtype=torch.int8, device="cuda")
        self._flush_buf.zero_()

    def _estimate(self, fn: Callable[[int], object], grad_to_none) -> float:
        fn(0)
        torch.cuda.synchronize()
        times = []
        for i in range(3):
            _drop_grads(grad_to_none)
            self._flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return max(sorted(times)[1], 1e-4)

    def measure(self, fn: Callable[[int], object], *, n_inputs: int = 1,
                grad_to_none: Optional[Sequence[torch.Tensor]] = None, graph: bool = False) -> Timing:
        est = self._estimate(fn, grad_to_none)
        note = ""
        if graph and self.use_graphs and est < GRAPH_BELOW_MS:
            try:
                return self._measure_graph(fn, n_inputs, est, grad_to_none)
            except Exception as e:  # capture refused (host sync, unsupported op): use events
                torch.cuda.synchronize()
                first = (str(e).splitlines() or [""])[0][:120]
                note = f"CUDA graph capture failed ({type(e).__name__}: {first}); events used"
        n_warmup = max(1, min(1000, int(self.warmup_ms / est)))
        n_rep = max(self.min_reps, min(self.max_reps, int(self.rep_ms / est)))
        for i in range(n_warmup):
            fn(i)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        for i in range(n_rep):
            _drop_grads(grad_to_none)
            self._flush()
            starts[i].record()
            fn(i)
            ends[i].record()
        torch.cuda.synchronize()
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)], "events", note)

    def _measure_graph(self, fn: Callable[[int], object], n_inputs: int, est_ms: float,
                       grad_to_none=None) -> Timing:
        """Forward (or forward + backward: the gradients are dropped before each captured call,
        so no accumulation kernel is captured) replayed from a CUDA graph."""
        calls = n_inputs * max(1, math.ceil(GRAPH_MIN_CALLS / n_inputs))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
            for i in range(max(3, n_inputs)):
                _drop_grads(grad_to_none)
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(calls):
                _drop_grads(grad_to_none)
                fn(i)
        g.replay()
        torch.cuda.synchronize()
        replay_ms = max(est_ms * calls, 1e-3)
        n_rep = max(self.min_reps, min(200, int(self.rep_ms / replay_ms)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        for i in range(n_rep):
            starts[i].record()
            g.replay()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / calls for s, e in zip(starts, ends)]
        del g
        return summarize(times, "cudagraph", f"{calls} calls per graph replay")


class CpuTimer:
    """Wall-clock timer for CPU tensors. Used by the unit tests to drive the whole pipeline without
    a GPU; ``fastbert bench`` itself never reports CPU timings."""

    def __init__(self, reps: int = 3):
        self.reps = reps

    def measure(self, fn: Callable[[int], object], *, n_inputs: int = 1,
                grad_to_none: Optional[Sequence[torch.Tensor]] = None, graph: bool = False) -> Timing:
        fn(0)
        times: List[float] = []
        for i in range(self.reps):
            _drop_grads(grad_to_none)
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
        return summarize(times, "cpu")
