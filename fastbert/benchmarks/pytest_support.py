"""What ``bench/bench_<family>.py`` need to run the cases under pytest-benchmark.

Each (case, implementation) becomes one benchmark test: the implementation is prepared (skipped
with its reason when unavailable here), checked against ``fastbert.reference`` (the test fails on a
wrong result), timed with CUDA events (p20/p50/p80 and TFLOP/s or GB/s go into the benchmark's
``extra_info``), then handed to pytest-benchmark, which times synchronised calls with its own
statistics so that runs can be compared with ``pytest-benchmark compare``.

The quick selection is used unless ``FASTBERT_BENCH_FULL=1``; ``FASTBERT_BENCH_IMPL`` (comma
separated substrings) restricts the implementations.
"""
from __future__ import annotations

import os
from typing import List

import torch

from .common import Case, Impl, Unavailable, reason_text
from .report import metric_value
from .runner import _check, _drop_grads, _timed_fn, all_cases
from .timing import CudaTimer, l2_cache_bytes, rotation_count

__all__ = ["benchmark_params", "run_benchmark", "NEEDS_GPU"]

NEEDS_GPU = ("needs a CUDA GPU: fastbert's benchmarks time GPU kernels (run `fastbert check` to "
             "check the kernels on a CPU)")


def benchmark_params(family: str) -> List:
    """pytest params (case, impl) with readable ids for one family."""
    import pytest

    full = os.environ.get("FASTBERT_BENCH_FULL", "") not in ("", "0")
    only = [x for x in os.environ.get("FASTBERT_BENCH_IMPL", "").split(",") if x]
    out = []
    for case in all_cases(quick=not full, families=(family,)):
        for impl in case.impls:
            if only and not any(x in impl.name for x in only):
                continue
            out.append(pytest.param(case, impl, id=f"{case.name}-{impl.name}"))
    return out


def run_benchmark(benchmark, case: Case, impl: Impl, *, rounds: int = 20) -> None:
    """Prepare, check and time ``impl`` on ``case`` inside a pytest-benchmark test."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip(NEEDS_GPU)
    # as many input sets as `fastbert bench` rotates through, so that graph-replayed calls read
    # their inputs from memory, not from an L2 the previous call just filled
    n_sets = rotation_count(case.footprint, l2_cache_bytes()) if case.rotate else 1
    states = [case.setup("cuda") for _ in range(n_sets)]
    state = states[0]
    try:
        prep = impl.prepare(case, state)
    except Unavailable as e:
        pytest.skip(f"{impl.name} unavailable: {reason_text(e)}")
    leaves_fn = prep.leaves or case.leaves
    upstream = prep.upstream or (lambda s: s.do)
    res = _check(case, impl, prep, state, leaves_fn, upstream)
    assert res is None or res.ok, f"{case.id} {impl.name}: wrong result: {res}"
    fn = _timed_fn(case, prep, states, upstream)
    leaves = [t for s in states for t in leaves_fn(s)]
    t = CudaTimer().measure(fn, n_inputs=len(states),
                            grad_to_none=leaves if case.pass_ != "fwd" else None,
                            graph=case.pass_ in ("fwd", "fwd+bwd") and prep.graph_safe)
    benchmark.extra_info.update({
        "case": case.id, "impl": impl.name, "metric": case.metric, "work": case.work_of(impl),
        "p20_ms": t.p20_ms, "p50_ms": t.p50_ms, "p80_ms": t.p80_ms, "timing": t.method,
        "value_at_p50": metric_value(case.metric, case.work_of(impl), t.p50_ms),
        "params": case.params, "check": str(res) if res else None})
    counter = [0]

    def call():
        _drop_grads(leaves)
        fn(counter[0])
        counter[0] += 1
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=rounds, warmup_rounds=3, iterations=1)
    _drop_grads(leaves)
