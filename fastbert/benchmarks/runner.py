"""``fastbert bench``: measure every op against the peers installed here, on a CUDA GPU.

The CLI (``fastbert/cli.py``) calls :func:`add_arguments` on its ``bench`` sub-parser and
:func:`run` with the parsed arguments. ``bench/bench_<family>.py`` call the same functions.

A run: measure the device's ceilings (copy GB/s, bf16 matmul TFLOP/s); then, for every case
(one shape of one op in one pass), build its inputs and, for each implementation, ask it to
prepare (it may be unavailable here, with a reason), check its result against
``fastbert.reference``, and only then time it (CUDA events, warm-up, L2 flushed, p20/p50/p80;
CUDA graphs for launch-bound calls). Results are printed as a table and written to ``--out`` as
JSON and CSV after every case, then plotted. Exit code: 0, or 1 when a fastbert implementation
gave a wrong result or failed, or 2 for bad arguments or no GPU.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from .common import Case, CheckResult, Impl, Prepared, Unavailable, reason_text, slug
from .timing import CpuTimer, CudaTimer, Timing, l2_cache_bytes, rotation_count

__all__ = ["add_arguments", "run", "run_cases", "select_cases", "all_cases", "FAMILIES",
           "NO_GPU_MESSAGE", "Progress"]

FAMILIES = ("attention", "sparse", "norms", "bert")
DEVICE = "cuda"   # where `run` measures (the unit tests point it at the CPU)
OPS_BY_FAMILY = {
    "attention": ("scaled_dot_product_attention", "varlen_attention"),
    "sparse": ("block_sparse_attention", "linformer_attention"),
    "norms": ("layer_norm", "add_layer_norm", "bias_gelu", "gelu", "geglu"),
    "bert": ("bert",),
}
NO_GPU_MESSAGE = (
    "fastbert bench: no CUDA GPU is visible (torch.cuda.is_available() is False), and every number "
    "it reports is a GPU timing.\n"
    "To check that fastbert's kernels give correct results on this machine, run `fastbert check`.\n"
    "`fastbert bench --list` shows the benchmark cases without running them.")


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
def _finite_float(*, allow_zero: bool) -> Callable[[str], float]:
    """An argparse type: a finite number > 0 (>= 0 with ``allow_zero``); argparse reports a bad
    value as a usage error (exit 2), before any GPU work."""
    bound = ">= 0" if allow_zero else "> 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}")
        return value

    parse.__name__ = "number"  # argparse's fallback message names the type
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``fastbert bench``'s options to ``parser``."""
    parser.add_argument("--op", action="append", metavar="NAME", default=None,
                        help="benchmark only this op family (attention, sparse, norms, bert) or "
                             "op (scaled_dot_product_attention, varlen_attention, "
                             "block_sparse_attention, linformer_attention, layer_norm, "
                             "add_layer_norm, bias_gelu, gelu, geglu); repeat or separate with "
                             "commas")
    parser.add_argument("--quick", action="store_true",
                        help="a small selection of shapes and short timings (a few minutes on an H100)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="directory for results.json, results.csv and the plots (appended to; "
                             "default ./fastbert-bench/<date>-<gpu>)")
    parser.add_argument("--list", dest="list_cases", action="store_true",
                        help="list the selected cases and their implementations, run nothing")
    parser.add_argument("--impl", action="append", metavar="NAME", default=None,
                        help="run only implementations whose name contains NAME (repeatable)")
    parser.add_argument("--budget-s", type=_finite_float(allow_zero=False), default=None, metavar="S",
                        help="stop starting new cases after S seconds (the rest are recorded as "
                             "skipped); results so far are kept")
    parser.add_argument("--warmup-ms", type=_finite_float(allow_zero=True), default=None, metavar="MS",
                        help="warm-up time per measurement (default 25, --quick 10)")
    parser.add_argument("--rep-ms", type=_finite_float(allow_zero=False), default=None, metavar="MS",
                        help="timed repetitions per measurement (default 100, --quick 40)")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")


def _split(values: Optional[Iterable[str]]) -> List[str]:
    out: List[str] = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
def all_cases(quick: bool = False, families: Sequence[str] = FAMILIES) -> List[Case]:
    out: List[Case] = []
    for fam in families:
        module = importlib.import_module(f"{__package__}.{fam}")
        out += module.cases(quick=quick)
    return out


def select_cases(ops: Sequence[str], quick: bool = False) -> List[Case]:
    """The cases of the named families or ops (all when ``ops`` is empty). Unknown names raise
    ValueError listing the valid ones."""
    known = {f: f for f in FAMILIES}
    known.update({op: fam for fam, names in OPS_BY_FAMILY.items() for op in names})
    unknown = [o for o in ops if o not in known]
    if unknown:
        raise ValueError(f"unknown --op {', '.join(map(repr, unknown))}; choose from: "
                         f"{', '.join(known)}")
    if not ops:
        return all_cases(quick=quick)
    fams = [f for f in FAMILIES if f in {known[o] for o in ops}]
    return [c for c in all_cases(quick=quick, families=fams) if c.family in ops or c.op in ops]


def format_case_list(cases: Sequence[Case], impl_filter: Optional[Sequence[str]] = None) -> str:
    """One line per case: id, metric, work, and the implementations ``--impl`` selects."""
    lines = []
    for c in cases:
        work = f"{c.work / 1e9:.3g} {'GFLOP' if c.metric == 'TFLOP/s' else 'GB'}"
        lines.append(f"{c.id:<58} {c.metric:<8} {work:>12}  {'quick' if c.quick else '':<5}  "
                     + ", ".join(i.name for i in _selected_impls(c, impl_filter)))
    lines.append(f"{len(cases)} cases")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------
class Progress:
    """A tqdm bar on stderr when tqdm is installed, else one "[i/n] case" line per case."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.count, self.enabled = total, 0, enabled
        self.stream = stream or sys.stderr
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=self.stream, unit="case", dynamic_ncols=True,
                                leave=True)
            except ImportError:
                self.bar = None

    def update(self, desc: str) -> None:
        self.count += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(desc[:60])
            self.bar.update(1)
        else:
            print(f"[{self.count}/{self.total}] {desc}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# Running cases
# ----------------------------------------------------------------------------------------------
def _base_row(case: Case, impl: Impl) -> Dict:
    from .common import dtype_name

    return {"family": case.family, "op": case.op, "case": case.name, "pass": case.pass_,
            "dtype": case.dtype_label or dtype_name(case.dtype), "impl": impl.name, "ours": impl.ours,
            "backend": impl.backend, "variant": impl.variant, "status": None, "reason": None,
            "metric": case.metric, "work": case.work_of(impl), "p20_ms": None, "p50_ms": None,
            "p80_ms": None, "reps": None, "timing": None, "value": None,
            "speedup_vs_best_peer": None, "best_peer": None, "pct_of_ceiling": None,
            "peak_mem_mb": None, "check": None, "x_key": case.x_key,
            "x": case.params.get(case.x_key), "series": case.series, "params": dict(case.params)}


def _drop_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _cleanup(device, collect: bool = False) -> None:
    """Give the case's GPU memory back. A full gc pass costs ~0.4 s with torch, inductor and
    transformers loaded, so it runs once per case, not per implementation."""
    if collect:
        gc.collect()
    if _is_cuda(device):
        torch.cuda.empty_cache()


def _selected_impls(case: Case, impl_filter: Optional[Sequence[str]]) -> List[Impl]:
    """The case's implementations that ``--impl`` names (substrings; all without a filter)."""
    return [i for i in case.impls if not impl_filter or any(f in i.name for f in impl_filter)]


def _no_kernel(exc: BaseException) -> bool:
    from ..backends import BackendError  # fastbert's dispatch declining the call: unavailable

    return (isinstance(exc, (NotImplementedError, BackendError))
            or "No available kernel" in str(exc))


def _check(case: Case, impl: Impl, prep: Prepared, state, leaves_fn, upstream) -> Optional[CheckResult]:
    leaves = leaves_fn(state)
    _drop_grads(leaves)
    if case.pass_ == "fwd":
        with torch.no_grad():
            out = prep.forward(state)
        grads: list = []
    else:
        out = prep.forward(state)
        out.backward(upstream(state))
        grads = [t.grad for t in leaves]
    if prep.adapt is not None:
        out, grads = prep.adapt(state, out, grads)
    try:
        if case.check is None:
            return None
        return case.check(state, out.detach(), grads, impl.variant)
    finally:
        _drop_grads(leaves)


def _timed_fn(case: Case, prep: Prepared, states: list, upstream) -> Callable[[int], object]:
    n = len(states)
    forward = prep.forward
    if case.pass_ == "fwd":
        def fn(i):
            with torch.no_grad():
                return forward(states[i % n])
    elif case.pass_ == "fwd+bwd":
        def fn(i):
            s = states[i % n]
            forward(s).backward(upstream(s))
    else:  # "bwd": the forward runs once per input set, outside the timed region
        outs = [forward(s) for s in states]
        ups = [upstream(s) for s in states]

        def fn(i):
            outs[i % n].backward(ups[i % n], retain_graph=True)
    return fn


def _peak_mem_mb(fn, leaves) -> Optional[float]:
    _drop_grads(leaves)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    r = fn(0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del r
    return peak / 2**20


def run_impl(case: Case, impl: Impl, states: list, timer, *, quick: bool = False) -> Dict:
    """One row: prepare, check, time ``impl`` on ``case`` (never raises for the impl's failures)."""
    row = _base_row(case, impl)
    device = getattr(states[0], "device", torch.device("cpu"))
    if quick and impl.skip_in_quick:
        row.update(status="skipped", reason=impl.skip_in_quick)
        return row
    stage = "prepare"
    fn = prep = None
    leaves: list = []
    try:
        prep = impl.prepare(case, states[0])
        leaves_fn = prep.leaves or case.leaves
        upstream = prep.upstream or (lambda s: s.do)
        leaves = [t for s in states for t in leaves_fn(s)]
        stage = "check"
        res = _check(case, impl, prep, states[0], leaves_fn, upstream)
        if res is not None and not res.ok:
            row.update(status="wrong", reason=f"result differs from fastbert.reference: {res}",
                       check=str(res))
            return row
        row["check"] = "no check" if res is None else str(res)
        stage = "timing"
        fn = _timed_fn(case, prep, states, upstream)
        graph = case.pass_ in ("fwd", "fwd+bwd") and prep.graph_safe
        t: Timing = timer.measure(fn, n_inputs=len(states),
                                  grad_to_none=leaves if case.pass_ != "fwd" else None, graph=graph)
        row.update(status="ok", p20_ms=t.p20_ms, p50_ms=t.p50_ms, p80_ms=t.p80_ms, reps=t.reps,
                   timing=t.method)
        notes = [x for x in (t.note, prep.note, f"{len(states)} input sets rotated"
                             if len(states) > 1 else "") if x]
        if notes:
            row["reason"] = "; ".join(notes)
        if _is_cuda(device):
            try:
                row["peak_mem_mb"] = _peak_mem_mb(fn, leaves)
            except Exception as e:  # the timing stands; only the memory figure is missing
                row["reason"] = "; ".join(x for x in (row["reason"], f"peak memory not measured: "
                                                      f"{reason_text(e, 120)}") if x)
    except Unavailable as e:
        row.update(status="unavailable", reason=reason_text(e, 400))
    except Exception as e:  # a failing implementation is a result, not a crash
        if _no_kernel(e) and stage in ("prepare", "check"):
            row.update(status="unavailable", reason=f"{stage}: {reason_text(e, 400)}")
        else:
            row.update(status="error", reason=f"{stage}: {reason_text(e, 400)}")
        if _is_cuda(device):
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
    finally:
        _drop_grads(leaves)
        del fn, prep
    return row


def run_case(case: Case, *, device="cuda", timer=None, l2_bytes: int = 0,
             impl_filter: Optional[Sequence[str]] = None, quick: bool = False) -> List[Dict]:
    impls = _selected_impls(case, impl_filter)
    torch.manual_seed(sum(map(ord, case.id)))
    try:
        n_sets = rotation_count(case.footprint, l2_bytes) if case.rotate else 1
        states = [case.setup(device) for _ in range(n_sets)]
    except Exception as e:
        rows = []
        for impl in impls:
            row = _base_row(case, impl)
            row.update(status="error", reason=f"setup: {reason_text(e, 400)}")
            rows.append(row)
        _cleanup(device, collect=_is_cuda(device))
        return rows
    rows = []
    for impl in impls:
        rows.append(run_impl(case, impl, states, timer, quick=quick))
        _cleanup(device)
    del states
    _cleanup(device, collect=_is_cuda(device))
    return rows


def run_cases(cases: Sequence[Case], *, device="cuda", timer=None, ceilings: Optional[Dict] = None,
              budget_s: Optional[float] = None, impl_filter: Optional[Sequence[str]] = None,
              quick: bool = False, progress: bool = True,
              on_case: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """Run ``cases`` and return their rows (see :func:`run_impl`). ``timer`` defaults to a
    :class:`CudaTimer` on CUDA and a :class:`CpuTimer` on CPU (tests)."""
    from .report import annotate_case

    if timer is None:
        timer = CudaTimer() if _is_cuda(device) else CpuTimer()
    l2 = 0
    if _is_cuda(device):
        l2 = l2_cache_bytes(device)
    start = time.monotonic()
    bar = Progress(len(cases), enabled=progress)
    rows: List[Dict] = []
    try:
        for case in cases:
            bar.update(case.id)
            if budget_s is not None and time.monotonic() - start > budget_s:
                case_rows = []
                for impl in _selected_impls(case, impl_filter):
                    row = _base_row(case, impl)
                    row.update(status="skipped", reason=f"time budget of {budget_s:.0f} s used up")
                    case_rows.append(row)
            else:
                case_rows = run_case(case, device=device, timer=timer, l2_bytes=l2,
                                     impl_filter=impl_filter, quick=quick)
            annotate_case(case_rows, ceilings)
            rows += case_rows
            if on_case is not None:
                on_case(case_rows)
    finally:
        bar.close()
    return rows


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
def make_timer(**kw):
    return CudaTimer(**kw) if _is_cuda(DEVICE) else CpuTimer()


def default_out_dir(gpu: Optional[str]) -> Path:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return Path("fastbert-bench") / f"{date}-{slug(gpu or 'unknown-gpu')}"


def _unwritable(out_dir: Path) -> Optional[str]:
    """Why results cannot be written under ``out_dir`` (created if missing), or None."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return e.strerror or str(e)
    return None


def run(args: argparse.Namespace) -> int:
    """Run ``fastbert bench`` with parsed arguments; returns the exit code."""
    from . import report

    ops = _split(getattr(args, "op", None))
    for flag in ("op", "impl"):
        if getattr(args, flag, None) is not None and not _split(getattr(args, flag)):
            print(f"fastbert bench: --{flag} was given no name", file=sys.stderr)
            return 2
    quick = bool(getattr(args, "quick", False))
    try:
        cases = select_cases(ops, quick=quick)
    except ValueError as e:
        print(f"fastbert bench: {e}", file=sys.stderr)
        return 2
    impl_filter = _split(getattr(args, "impl", None)) or None
    if impl_filter is not None:
        cases = [c for c in cases if _selected_impls(c, impl_filter)]
        if not cases:
            names = sorted({i.name for c in select_cases(ops, quick=quick) for i in c.impls})
            print(f"fastbert bench: no implementation matches --impl {', '.join(impl_filter)} in "
                  f"the selected cases; they have: {', '.join(names)}", file=sys.stderr)
            return 2
    if getattr(args, "list_cases", False):
        print(format_case_list(cases, impl_filter))
        return 0
    if not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return 2
    from ..backends import interpreter_enabled
    if interpreter_enabled():
        print("fastbert bench: TRITON_INTERPRET=1 is set, so the Triton backend cannot run on the "
              "GPU; unset it to benchmark the Triton kernels", file=sys.stderr)
    if not cases:
        print("fastbert bench: no case selected", file=sys.stderr)
        return 2

    warmup = args.warmup_ms if getattr(args, "warmup_ms", None) is not None else (10.0 if quick else 25.0)
    rep = args.rep_ms if getattr(args, "rep_ms", None) is not None else (40.0 if quick else 100.0)
    timer = make_timer(warmup_ms=warmup, rep_ms=rep, min_reps=5 if quick else 10)
    env = report.environment()
    out_dir = Path(args.out) if getattr(args, "out", None) else default_out_dir(env.get("gpu"))
    problem = _unwritable(out_dir)
    if problem:  # said before minutes of measuring, not after
        print(f"fastbert bench: cannot write the results to {out_dir}: {problem}", file=sys.stderr)
        return 2
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record = {"run_id": f"{started}-{uuid.uuid4().hex[:6]}", "started": started, "finished": None,
              "env": env, "args": {"op": ops, "quick": quick, "impl": getattr(args, "impl", None),
                                   "budget_s": getattr(args, "budget_s", None), "warmup_ms": warmup,
                                   "rep_ms": rep},
              "ceilings": None, "rows": [], "plots": []}
    print(f"fastbert bench on {env.get('gpu')} (driver {env.get('driver')}), torch {env['torch']}, "
          f"triton {env['triton']}, CUDA {env['cuda']}, fastbert {env['fastbert']} "
          f"({env['commit']}); {len(cases)} cases -> {out_dir}", flush=True)
    t0 = time.monotonic()
    report_ceilings = None
    try:
        from .ceilings import measure_ceilings
        ceil = measure_ceilings(timer, quick=quick, device=DEVICE)
        report_ceilings = ceil.as_dict()
        print(f"ceilings: copy {ceil.copy_gbps:.0f} GB/s, bf16 matmul {ceil.matmul_tflops:.0f} TFLOP/s",
              flush=True)
    except Exception as e:  # results stay valid, only the % of ceiling is missing
        print(f"fastbert bench: measuring the ceilings failed ({reason_text(e)})", file=sys.stderr)
    record["ceilings"] = report_ceilings
    report.write_json(out_dir, record)

    def on_case(case_rows: List[Dict]) -> None:
        record["rows"] += case_rows
        report.write_json(out_dir, record)
        report.append_csv(out_dir, record, case_rows)

    budget = getattr(args, "budget_s", None)
    if budget is not None:
        budget = max(0.0, budget - (time.monotonic() - t0))
    run_cases(cases, device=DEVICE, timer=timer, ceilings=report_ceilings, budget_s=budget,
              impl_filter=impl_filter, quick=quick, on_case=on_case)
    print(report.format_table(record["rows"], report_ceilings), flush=True)
    if not getattr(args, "no_plots", False):
        plots = report.plot_results(record["rows"], out_dir,
                                    title=str(env.get("gpu") or "unknown GPU"))
        record["plots"] = [p.name for p in plots]
    record["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    path = report.write_json(out_dir, record)
    print(f"results: {path}, {out_dir / report.CSV_NAME}"
          + (f", plots: {', '.join(record['plots'])}" if record["plots"] else ""))
    bad = [r for r in record["rows"] if r["ours"] and r["status"] in ("wrong", "error")]
    counts = {s: sum(r["status"] == s for r in record["rows"]) for s in report.STATUSES}
    print("rows: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
          + f"; {time.monotonic() - t0:.0f} s")
    if bad:
        print(f"fastbert bench: {len(bad)} fastbert result(s) wrong or failed:", file=sys.stderr)
        for r in bad:
            print(f"  {r['family']}/{r['case']} {r['impl']}: {r['reason']}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None, default_ops: Sequence[str] = ()) -> int:
    """Entry point for ``python -m fastbert.benchmarks.runner`` and the bench/ scripts."""
    parser = argparse.ArgumentParser(prog="fastbert bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.op and default_ops:
        args.op = list(default_ops)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
