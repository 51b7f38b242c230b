#!/usr/bin/env python3
"""Build the dispatch table that ``backend="auto"`` follows, from measured ``fastbert bench`` results.

    python bench/make_dispatch_table.py                  # from every bench/results/*/results.json
                                                         # -> fastbert/dispatch_table.json
    python bench/make_dispatch_table.py --results R.json [--results ...] --out my-table.json
    FASTBERT_DISPATCH_TABLE=my-table.json python train.py   # dispatch by your own measurements

For each GPU architecture, op and shape class (see ``fastbert.dispatch``) it ranks the fast
backends by the geometric mean of their p50 over the cases where all of them were measured and
checked; results directories are read oldest first, so a case measured again later is taken from
the later run. The table lists its sources. It prints a summary of what each class chose.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

try:
    from fastbert import dispatch
except ImportError:  # run from a checkout where fastbert is not installed
    sys.path.insert(0, str(HERE.parent))
    from fastbert import dispatch


def results_files(root: Path = RESULTS):
    """bench/results/<date>-<gpu>/results.json, oldest first (by directory name: date, then GPU)."""
    return sorted(p for p in root.glob("*/results.json") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", action="append", type=Path, default=None, metavar="JSON",
                    help="a results.json written by fastbert bench (repeatable, oldest first); "
                         "default: every bench/results/*/results.json")
    ap.add_argument("--out", type=Path, default=dispatch.SHIPPED_TABLE,
                    help=f"where to write the table (default {dispatch.SHIPPED_TABLE})")
    args = ap.parse_args(argv)
    files = args.results if args.results is not None else results_files()
    if not files:
        print(f"no results.json under {RESULTS}: nothing measured, no table written "
              "(backend='auto' keeps each op's default order)", file=sys.stderr)
        return 1
    sources = []
    for f in files:
        try:
            sources.append(str(Path(f).resolve().relative_to(HERE.parent)))
        except ValueError:
            sources.append(str(f))
    try:
        table = dispatch.write_table(files, args.out, sources)
    except (OSError, ValueError) as e:
        print(f"cannot build the table: {e}", file=sys.stderr)
        return 2
    lines = dispatch.summary_lines(table)
    print("\n".join(lines))
    print(f"wrote {args.out}: {len(lines)} shape classes from {len(files)} results file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
