"""Results: the environment record, the JSON and CSV files, the printed table, the PNG plots and
the Markdown summary that ``bench/make_readme_table.py`` puts in the README.

Files in the output directory (``--out``):

* ``results.json`` — ``{"format": "fastbert-bench/1", "runs": [run, ...]}``; each run holds its
  environment (GPU, driver, torch/triton/CUDA/fastbert versions, git commit), the measured
  ceilings, the arguments and its rows. A new run is appended; the file is rewritten after every
  case, so a run cut short keeps what it measured.
* ``results.csv`` — one line per row, the run's environment repeated on each; appended.
* ``<family>.png`` — speed against sequence length / hidden size / density, one panel per series,
  one line per implementation (needs matplotlib).
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

FORMAT = "fastbert-bench/1"
JSON_NAME = "results.json"
CSV_NAME = "results.csv"
MARK_BEGIN = "<!-- bench:begin -->"
MARK_END = "<!-- bench:end -->"

RUN_CSV_FIELDS = ["run_id", "started", "gpu", "driver", "torch", "triton", "cuda", "fastbert",
                  "commit"]
ROW_FIELDS = ["family", "op", "case", "pass", "dtype", "impl", "ours", "backend", "variant",
              "status", "reason", "metric", "work", "p20_ms", "p50_ms", "p80_ms", "reps",
              "timing", "value", "speedup_vs_best_peer", "best_peer", "pct_of_ceiling",
              "peak_mem_mb", "check", "x_key", "x", "series", "params"]
CSV_FIELDS = RUN_CSV_FIELDS + ROW_FIELDS
STATUSES = ("ok", "unavailable", "skipped", "wrong", "error")


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------
def _run(cmd: Sequence[str], cwd: Optional[str] = None) -> Optional[str]:
    try:
        out = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> Tuple[str, str]:
    """(commit, where it came from): ``FASTBERT_COMMIT``, else ``git rev-parse HEAD`` of the
    checkout fastbert is imported from (with "-dirty" when it has uncommitted changes), else
    "unknown"."""
    env = os.environ.get("FASTBERT_COMMIT", "").strip()
    if env:
        return env, "FASTBERT_COMMIT"
    from .. import _checkout_root

    if _checkout_root is None:  # an installed copy (site-packages), not fastbert's checkout:
        return "unknown", "none"  # git there would answer for whatever repository encloses it
    root = _checkout_root
    head = _run(["git", "rev-parse", "HEAD"], cwd=root)
    if head:
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
        return head + ("-dirty" if dirty else ""), "git"
    return "unknown", "none"


def _version(module: str) -> Optional[str]:
    try:
        from importlib import metadata
        return metadata.version(module)
    except Exception:
        return None


def environment() -> Dict:
    """Everything a result needs to be reproduced and compared: device, driver, versions, commit."""
    import torch

    import fastbert

    env: Dict = OrderedDict()
    env["timestamp"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    env["gpu"] = None
    try:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            env["gpu"] = props.name
            env["capability"] = f"{props.major}.{props.minor}"
            env["sm_count"] = props.multi_processor_count
            env["memory_gb"] = round(props.total_memory / 1e9, 1)
            env["l2_bytes"] = int(getattr(props, "L2_cache_size", 0) or 0)
    except Exception as e:  # a broken driver still gets its run recorded
        env["gpu_error"] = f"{type(e).__name__}: {e}"
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    env["driver"] = smi.splitlines()[0].strip() if smi else None
    env["torch"] = torch.__version__
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    env["cuda"] = torch.version.cuda
    try:
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # cuDNN present but not loadable here
        env["cudnn"] = None
    env["python"] = platform.python_version()
    env["fastbert"] = fastbert.__version__
    env["commit"], env["commit_source"] = git_commit()
    try:
        from fastbert.backends import cuda_extension_error
        env["cuda_extension"] = cuda_extension_error() or "loaded"
    except Exception as e:  # pragma: no cover - depends on the checkout
        env["cuda_extension"] = f"unknown ({e})"
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    env["peers"] = {name: _version(name) for name in
                    ("transformers", "liger-kernel", "apex", "xformers", "flash-attn")}
    env["platform"] = platform.platform()
    return env


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
def metric_value(metric: str, work: Optional[float], ms: Optional[float]) -> Optional[float]:
    """TFLOP/s or GB/s of ``work`` flops/bytes done in ``ms`` milliseconds."""
    if work is None or ms is None or ms <= 0 or not work:
        return None
    scale = 1e12 if metric == "TFLOP/s" else 1e9
    return work / (ms * 1e-3) / scale


def annotate_case(rows: List[Dict], ceilings: Optional[Dict]) -> None:
    """Fill value, speedup over the best peer and fraction of the ceiling in one case's rows."""
    from .ceilings import fraction_of_ceiling

    for r in rows:
        if r["status"] == "ok":
            r["value"] = metric_value(r["metric"], r["work"], r["p50_ms"])
            frac = fraction_of_ceiling(r["metric"], r["value"], ceilings)
            r["pct_of_ceiling"] = None if frac is None else 100.0 * frac
    peers = [r for r in rows if r["status"] == "ok" and not r["ours"]]
    if not peers:
        return
    best = min(peers, key=lambda r: r["p50_ms"])
    for r in rows:
        if r["status"] == "ok":
            r["best_peer"] = best["impl"]
            r["speedup_vs_best_peer"] = best["p50_ms"] / r["p50_ms"]


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def load_results(path) -> Dict:
    path = Path(path)
    if path.is_dir():
        path = path / JSON_NAME
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:  # a ValueError naming the file
            raise ValueError(f"{path} is not valid JSON ({e})") from None
    if (not isinstance(data, dict) or data.get("format") != FORMAT
            or not isinstance(data.get("runs"), list)):
        raise ValueError(f"{path} is not a fastbert bench results file (format {FORMAT})")
    for i, run in enumerate(data["runs"]):
        if not isinstance(run, dict) or not isinstance(run.get("rows", []), list) or not all(
                isinstance(r, dict) for r in run.get("rows", [])):
            raise ValueError(f"{path}: run {i} is not a fastbert bench run (an object whose rows "
                             "are objects)")
    return data


def _json_default(o):
    return str(o)


def _finite(o):
    """JSON has no NaN/inf: such floats are written as null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def write_json(out_dir, run: Dict) -> Path:
    """Insert or replace ``run`` (by run_id) in out_dir/results.json, atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / JSON_NAME
    data = {"format": FORMAT, "runs": []}
    if path.exists():
        try:
            data = load_results(path)
        except (ValueError, json.JSONDecodeError) as e:
            backup = path.with_suffix(".json.bad")
            path.replace(backup)
            print(f"fastbert bench: {path} was unreadable ({e}); moved to {backup}", file=sys.stderr)
    runs = [r for r in data["runs"] if r.get("run_id") != run["run_id"]]
    runs.append(run)
    data["runs"] = runs
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(_finite(data), f, indent=1, default=_json_default, allow_nan=False)
        f.write("\n")
    tmp.replace(path)
    return path


def _csv_cell(v):
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def append_csv(out_dir, run: Dict, rows: Iterable[Dict]) -> Path:
    """Append rows to out_dir/results.csv (header written when the file is new)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CSV_NAME
    new = not path.exists() or path.stat().st_size == 0
    env = run.get("env", {})
    meta = {"run_id": run["run_id"], "started": run.get("started")}
    for k in RUN_CSV_FIELDS[2:]:
        meta[k] = env.get(k)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: _csv_cell(v) for k, v in dict(meta, **r).items()})
    return path


# ----------------------------------------------------------------------------------------------
# Printed table
# ----------------------------------------------------------------------------------------------
def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _short(text: Optional[str], n: int) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


def format_table(rows: Sequence[Dict], ceilings: Optional[Dict] = None, width: int = 100) -> str:
    """The results as text: one block per case, one line per implementation (fastbert first),
    then the unavailable implementations grouped by reason."""
    lines: List[str] = []
    if ceilings:
        lines.append(f"ceilings: copy {ceilings.get('copy_gbps', 0):.0f} GB/s (read + written), "
                     f"bf16 matmul {ceilings.get('matmul_tflops', 0):.0f} TFLOP/s")
    by_case: "OrderedDict[str, List[Dict]]" = OrderedDict()
    for r in rows:
        by_case.setdefault(f"{r['family']}/{r['case']}", []).append(r)
    unavailable: "OrderedDict[Tuple[str, str], int]" = OrderedDict()
    head = (f"  {'implementation':<24} {'p50 ms':>9} {'p20-p80 ms':>17} {'value':>9} "
            f"{'x best peer':>11} {'% ceil':>6} {'peak MB':>8}  timing")
    for cid, rs in by_case.items():
        r0 = rs[0]
        unit = r0["metric"]
        lines.append("")
        lines.append(f"{cid}  [{unit}]")
        lines.append(head)
        shown = sorted(rs, key=lambda r: (not r["ours"], r["status"] != "ok",
                                          r["p50_ms"] if r["p50_ms"] is not None else math.inf))
        for r in shown:
            if r["status"] == "unavailable":
                unavailable[(r["impl"], r["reason"] or "")] = unavailable.get(
                    (r["impl"], r["reason"] or ""), 0) + 1
                continue
            name = r["impl"] + (" *" if r["ours"] else "")
            if r["status"] != "ok":
                lines.append(f"  {name:<24} {r['status'].upper()}: {_short(r['reason'], width - 36)}")
                continue
            spread = f"{r['p20_ms']:.4g}-{r['p80_ms']:.4g}"
            speedup = (f"{r['speedup_vs_best_peer']:.2f}x"
                       if r["speedup_vs_best_peer"] is not None else "-")
            lines.append(f"  {name:<24} {r['p50_ms']:>9.4g} {spread:>17} {_fmt(r['value'], '.1f'):>9} "
                         f"{speedup:>11} {_fmt(r['pct_of_ceiling'], '.0f'):>6} "
                         f"{_fmt(r['peak_mem_mb'], '.0f'):>8}  {r['timing'] or ''}")
    if unavailable:
        lines.append("")
        lines.append("not run here (implementation: reason [cases]):")
        for (impl, reason), n in unavailable.items():
            lines.append(f"  {impl}: {_short(reason, width - len(impl) - 12)} [{n}]")
    lines.append("")
    lines.append("* = fastbert; x best peer = time of the fastest peer / this time; "
                 "% ceil = share of the measured copy bandwidth (GB/s) or bf16 matmul rate (TFLOP/s)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def plot_results(rows: Sequence[Dict], out_dir, title: str = "") -> List[Path]:
    """One PNG per family: a panel per series, speed against the series' x parameter, a line per
    implementation (fastbert solid, peers dashed). Returns the files written ([] without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastbert bench: matplotlib is not installed; no plots (pip install matplotlib)",
              file=sys.stderr)
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    families: "OrderedDict[str, OrderedDict[str, List[Dict]]]" = OrderedDict()
    for r in rows:
        if r["status"] == "ok" and r.get("value") is not None and r.get("x") is not None:
            families.setdefault(r["family"], OrderedDict()).setdefault(r["series"], []).append(r)
    written = []
    for family, series in families.items():
        n = len(series)
        ncols = min(3, n)
        nrows = math.ceil(n / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
        names = sorted({(not r["ours"], r["impl"]) for rs in series.values() for r in rs})
        cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
        color = {name: cmap(i % cmap.N) for i, (_, name) in enumerate(names)}  # same in every panel
        for ax, (name, rs) in zip(axes.flat, series.items()):
            impls: "OrderedDict[str, List[Dict]]" = OrderedDict()
            for r in sorted(rs, key=lambda r: (not r["ours"], r["impl"])):
                impls.setdefault(r["impl"], []).append(r)
            xs_all = sorted({float(r["x"]) for r in rs})
            for impl, pts in impls.items():
                pts = sorted(pts, key=lambda r: float(r["x"]))
                ax.plot([float(p["x"]) for p in pts], [p["value"] for p in pts],
                        marker="o", markersize=4, linestyle="-" if pts[0]["ours"] else "--",
                        linewidth=2.0 if pts[0]["ours"] else 1.2, label=impl, color=color[impl])
            if xs_all and xs_all[0] > 0 and xs_all[-1] / xs_all[0] >= 4:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs_all)
            ax.set_xticklabels([f"{x:g}" for x in xs_all], fontsize=7)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(rs[0]["x_key"], fontsize=8)
            ax.set_ylabel(rs[0]["metric"], fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(f"fastbert bench: {family}" + (f" — {title}" if title else ""), fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{family}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# Markdown (README)
# ----------------------------------------------------------------------------------------------
def _value_text(r: Dict) -> str:
    return f"{r['value']:.1f} {r['metric']}" if r.get("value") is not None else "-"


def markdown_summary(run: Dict, plots: Sequence[str] = (), source: str = "") -> str:
    """A Markdown block from one run: environment line, one table per family (fastbert's best
    implementation against the best peer, per case), then the plots."""
    env = run.get("env", {})
    ceil = run.get("ceilings") or {}
    out = []
    out.append(f"Measured on **{env.get('gpu') or 'unknown GPU'}** (driver {env.get('driver')}), "
               f"{(env.get('timestamp') or run.get('started') or '')[:10]}, fastbert "
               f"{env.get('fastbert')} at commit `{str(env.get('commit'))[:12]}`, torch "
               f"{env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}"
               + (f" — from `{source}`" if source else "") + ".")
    if ceil:
        out.append(f"Measured ceilings: copy {ceil.get('copy_gbps', 0):.0f} GB/s (read + written), "
                   f"bf16 matmul {ceil.get('matmul_tflops', 0):.0f} TFLOP/s.")
    by_family: "OrderedDict[str, OrderedDict[str, List[Dict]]]" = OrderedDict()
    for r in run.get("rows", []):
        by_family.setdefault(r["family"], OrderedDict()).setdefault(r["case"], []).append(r)
    for family, cases in by_family.items():
        out.append("")
        out.append(f"**{family}**")
        out.append("")
        out.append("| case | fastbert | speed | best peer | speed | speedup | % of ceiling |")
        out.append("|---|---|---|---|---|---|---|")
        for case, rs in cases.items():
            ours_ok = [r for r in rs if r["ours"] and r["status"] == "ok" and not r.get("variant")]
            peers_ok = [r for r in rs if not r["ours"] and r["status"] == "ok"]
            peer = min(peers_ok, key=lambda r: r["p50_ms"]) if peers_ok else None
            if ours_ok:
                ours = min(ours_ok, key=lambda r: r["p50_ms"])
                ours_cells = [ours["impl"], _value_text(ours)]
                # against the peer shown beside it (not the stored field, which a merge of runs
                # could have computed against another run's peers)
                speed = f"{peer['p50_ms'] / ours['p50_ms']:.2f}x" if peer else "-"
                pct = f"{ours['pct_of_ceiling']:.0f}%" if ours.get("pct_of_ceiling") is not None else "-"
            else:
                bad = [r for r in rs if r["ours"] and not r.get("variant")]
                status = sorted({r["status"] for r in bad}) or ["none"]
                ours_cells = [", ".join(status), "-"]
                speed, pct = "-", "-"
            peer_cells = [peer["impl"], _value_text(peer)] if peer else ["-", "-"]
            out.append("| " + " | ".join([case] + ours_cells + peer_cells + [speed, pct]) + " |")
    if plots:
        out.append("")
        for p in plots:
            out.append(f"![{Path(p).stem}]({p})")
    return "\n".join(out)


def replace_between_markers(text: str, block: str) -> str:
    """Put ``block`` between MARK_BEGIN and MARK_END in ``text`` (markers kept)."""
    i, j = text.find(MARK_BEGIN), text.find(MARK_END)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"the markers {MARK_BEGIN} ... {MARK_END} were not found (in that order)")
    return text[: i + len(MARK_BEGIN)] + "\n" + block.rstrip("\n") + "\n" + text[j:]


_RESULT_DIR = re.compile(r"^(\d{4}-\d{2}-\d{2})-(.+)$")


def latest_results_dir(root) -> Path:
    """The newest bench/results/<YYYY-MM-DD>-<gpu>/ holding a results.json (by date, then name)."""
    root = Path(root)
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _RESULT_DIR.match(d.name)
            if m and d.is_dir() and (d / JSON_NAME).exists():
                found.append((m.group(1), d.name, d))
    if not found:
        raise FileNotFoundError(f"no <date>-<gpu>/{JSON_NAME} under {root}")
    return max(found)[2]


def results_dir_name(run: Dict) -> str:
    """<YYYY-MM-DD>-<gpu slug> for a run (where its results are committed)."""
    from .common import slug

    env = run.get("env", {})
    date = (env.get("timestamp") or run.get("started") or "")[:10] or "unknown-date"
    return f"{date}-{slug(env.get('gpu') or 'unknown-gpu')}"
