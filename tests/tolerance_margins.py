"""The checks that pass by the thinnest margin, from the logs that ``FASTBERT_TOLERANCE_LOG`` writes.

Each test draws fresh random inputs, so a check whose error sits close to its bound passes on most
seeds and fails on a few: in CI, at random. Run the suite a few times with different seeds and
the log on, then list the checks whose worst error came closest to (or past) the allowed one::

    for s in 1 2 3; do FASTBERT_TEST_SEED=$s FASTBERT_TOLERANCE_LOG=/tmp/tol.log pytest tests -q; done
    python tests/tolerance_margins.py /tmp/tol.log --top 20

A ratio (error / allowed) above about 0.7 on a handful of seeds is worth a look: either the kernel
is less accurate than it should be there, or the bound does not model the error.
"""
from __future__ import annotations

import argparse
import collections
import sys


def read(paths):
    """{test id: [(ratio, dtype, error, allowed), ...]} from the log lines of ``paths``."""
    runs = collections.defaultdict(list)
    for path in paths:
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 5:
                    continue
                test, dtype, err, allowed, ratio = parts
                runs[test].append((float(ratio), dtype, float(err), float(allowed)))
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+", help="files written with FASTBERT_TOLERANCE_LOG")
    ap.add_argument("--top", type=int, default=25, help="how many tests to list (default 25)")
    args = ap.parse_args(argv)
    runs = read(args.logs)
    if not runs:
        print("no tolerance checks in the logs", file=sys.stderr)
        return 1
    worst = sorted(((max(r), test, len(r)) for test, r in runs.items()), reverse=True)
    # In a run that passed, a check past its bound was one the test expected to fail (it checks
    # that a wrong result is caught, e.g. `fastbert check` on a broken backend).
    expected = [test for (ratio, *_), test, _ in worst if ratio > 1]
    worst = [w for w in worst if w[0][0] <= 1]
    if expected:
        print(f"past the bound (in a passing run: checks meant to fail): {', '.join(expected)}")
    print(f"{len(runs)} tests, {sum(len(r) for r in runs.values())} checks; the closest to their bound:")
    print(f"{'ratio':>7}  {'dtype':<9} {'error':>10} {'allowed':>10} {'checks':>6}  test")
    for (ratio, dtype, err, allowed), test, n in worst[:args.top]:
        print(f"{ratio:7.3f}  {dtype:<9} {err:10.3e} {allowed:10.3e} {n:6d}  {test}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
