#!/usr/bin/env python3
"""Regenerate the README's benchmark table from committed GPU results — never typed by hand.

    python bench/make_readme_table.py                      # print the table of the latest results
    python bench/make_readme_table.py --write README.md    # put it between the bench markers
    python bench/make_readme_table.py --import DIR         # file a run's results under
                                                           # bench/results/<date>-<gpu>/ first

The latest results are bench/results/<YYYY-MM-DD>-<gpu>/ (newest date, then name) holding a
results.json written by ``fastbert bench``; the table is made from its runs, each case's rows from
the latest run that measured it, and the plots (<family>.png) in that directory are listed below
it. ``--write`` replaces what lies between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in
the given file and fails if they are missing.

``--import DIR`` takes a results directory (e.g. the ``bench/`` folder a GPU run left under $OUT)
and files each GPU's runs in it under bench/results/<date>-<gpu>/, the date of that GPU's last
run: results.json (runs merged by run_id), results.csv (rebuilt from the merged results.json:
importing twice repeats no row), and, with the latest run's GPU, the PNGs and overhead.json
(``bench/bench_overhead.py``, in DIR or beside it).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OVERHEAD_NAME = "overhead.json"

try:
    from fastbert.benchmarks import report
except ImportError:  # run from a checkout where fastbert is not installed
    sys.path.insert(0, str(HERE.parent))
    from fastbert.benchmarks import report


def import_results(src: Path, results_root: Path = RESULTS) -> Path:
    """Copy a results directory into results_root/<date>-<gpu>/, one directory per GPU (named
    after the latest run on it: a benchmark split over two days stays together); returns the
    destination of the latest run's GPU."""
    data = report.load_results(src)
    runs = [r for r in data["runs"] if r.get("rows")]
    if not runs:
        raise ValueError(f"{src} holds no run with results")
    by_gpu: dict = {}
    for run in runs:  # an --out folder reused on two GPUs holds runs of both
        by_gpu.setdefault((run.get("env") or {}).get("gpu"), []).append(run)
    src_dir = src if src.is_dir() else src.parent
    dests = {}
    for gpu, gpu_runs in by_gpu.items():
        dest = dests[gpu] = results_root / report.results_dir_name(gpu_runs[-1])
        dest.mkdir(parents=True, exist_ok=True)
        for run in gpu_runs:
            report.write_json(dest, run)
        # results.csv is rebuilt from every run now in dest's results.json (the CSV holds the
        # same rows as the JSON): importing a folder twice, or two folders into one, never
        # repeats a row
        dest_csv = dest / report.CSV_NAME
        if dest_csv.exists():
            dest_csv.unlink()
        for run in report.load_results(dest)["runs"]:
            if run.get("rows"):
                report.append_csv(dest, run, run["rows"])
    # the plots and the host overhead file are not per run: they go with the latest run's GPU
    dest = dests[(runs[-1].get("env") or {}).get("gpu")]
    if len(dests) > 1:
        print(f"make_readme_table: {src} holds runs on {len(dests)} GPUs; its plots and "
              f"{OVERHEAD_NAME} are filed under {dest.name}", file=sys.stderr)
    for png in sorted(src_dir.glob("*.png")):
        shutil.copy2(png, dest / png.name)
    for extra in (src_dir / OVERHEAD_NAME, src_dir.parent / OVERHEAD_NAME):
        if extra.exists():  # bench/bench_overhead.py's host cost per call, from the same GPU run
            shutil.copy2(extra, dest / OVERHEAD_NAME)
            break
    return dest


def merged_run(runs: list) -> dict:
    """The runs of one results directory (a quick benchmark split over several device calls, say)
    as one: the last run's environment and ceilings, and for each case (family, case name) every
    row of the latest run that measured it, taken whole, so that a case's speedup is always
    against peers timed in the same run; plots of every run."""
    cases, plots = {}, []
    for run in runs:
        this_run: dict = {}
        for row in run["rows"]:
            this_run.setdefault((row.get("family"), row.get("case")), []).append(row)
        for key, case_rows in this_run.items():
            cases.pop(key, None)  # re-inserted: the latest run's rows, in that run's order
            cases[key] = case_rows
        plots += [p for p in run.get("plots") or [] if p not in plots]
    return dict(runs[-1], rows=[r for case_rows in cases.values() for r in case_rows], plots=plots)


def make_block(results_dir: Path, relative_to: Path) -> str:
    data = report.load_results(results_dir)
    runs = [r for r in data["runs"] if r.get("rows")]
    if not runs:
        raise ValueError(f"{results_dir} holds no run with results")
    run = merged_run(runs)
    plots = [os.path.relpath(results_dir / name, relative_to).replace(os.sep, "/")
             for name in run.get("plots") or sorted(p.name for p in results_dir.glob("*.png"))
             if (results_dir / name).exists()]
    source = os.path.relpath(results_dir, relative_to).replace(os.sep, "/")
    return report.markdown_summary(run, plots, source=source)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=None,
                   help="a results directory (default: the latest under bench/results/)")
    p.add_argument("--write", type=Path, metavar="FILE", default=None,
                   help="replace the text between the bench markers in FILE")
    p.add_argument("--import", dest="import_dir", type=Path, metavar="DIR", default=None,
                   help="first copy the results in DIR into bench/results/<date>-<gpu>/")
    p.add_argument("--results-root", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        if args.import_dir is not None:
            dest = import_results(args.import_dir, args.results_root)
            print(f"imported {args.import_dir} -> {dest}", file=sys.stderr)
            if args.results is None:
                args.results = dest
        results_dir = args.results or report.latest_results_dir(args.results_root)
        target = args.write.resolve().parent if args.write else Path.cwd()
        block = make_block(results_dir, target)
        if args.write:
            text = args.write.read_text()
            args.write.write_text(report.replace_between_markers(text, block))
            print(f"wrote the table of {results_dir} into {args.write}", file=sys.stderr)
        else:
            print(block)
    except (OSError, ValueError) as e:
        print(f"make_readme_table: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
