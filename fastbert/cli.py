"""Command line: ``fastbert info | check | dispatch | bench`` (also ``python -m fastbert``)."""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from typing import List, Optional


def _versions() -> List[str]:
    import torch

    from . import __version__

    lines = [f"fastbert {__version__}", f"python   {platform.python_version()} ({sys.platform})",
             f"torch    {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    try:
        import triton

        lines.append(f"triton   {triton.__version__}")
    except Exception as e:
        lines.append(f"triton   not importable ({type(e).__name__}: {e})")
    return lines


def _dispatch_line() -> str:
    from . import dispatch

    try:
        source, table = dispatch.active_table()
    except ValueError as e:
        return f"dispatch table: unusable ({e})"
    if not table["archs"]:
        return ("dispatch table: none with measurements; backend='auto' uses each op's default "
                "order (triton, cuda, torch)")
    parts = []
    for arch, ops in sorted(table["archs"].items()):
        parts.append(f"{arch}: {sum(len(c) for c in ops.values())} shape classes over {len(ops)} ops")
    return f"dispatch table: {source} ({'; '.join(parts)})"


def cmd_info(args) -> int:
    import torch

    from . import backends

    for line in _versions():
        print(line)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"device   cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                  f"{p.multi_processor_count} SMs)")
    else:
        print("device   cpu only (no CUDA GPU visible)")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!s:<3} "
          f"FASTBERT_BACKEND={os.environ.get('FASTBERT_BACKEND', '')} "
          f"FASTBERT_AUTOTUNE={os.environ.get('FASTBERT_AUTOTUNE', '')}")
    try:
        backends.resolve(None)
    except ValueError as e:
        print(f"warning: {e}: every op call will raise until it is fixed or unset", file=sys.stderr)
    ext = backends.cuda_extension()
    print(f"CUDA extension fastbert._C: {'loaded from ' + ext.__file__ if ext else backends.cuda_extension_error()}")
    print(_dispatch_line())
    print()
    print("backends per op (device-level availability; each op may refuse some inputs):")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    for op in backends.op_names():
        print(f"  {op}")
        for name, reasons in backends.explain(op, device).items():
            state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            print(f"    {name:<7} {state}")
    return 0


def cmd_check(args) -> int:
    import torch

    from .backends import interpreter_enabled

    if not torch.cuda.is_available() and not interpreter_enabled():
        # Without a GPU, check the Triton kernels under the interpreter. Triton reads
        # TRITON_INTERPRET when it is imported, which importing fastbert already did (its own
        # library functions, tl.sum's combine among them, are then compiled-mode functions the
        # interpreter cannot call): run the check in a fresh interpreter with it set.
        argv = ["check"] + [a for op in args.op or [] for a in ("--op", op)]
        argv += ["--device", args.device] if args.device else []
        return subprocess.call([sys.executable, "-m", "fastbert", *argv],
                               env=dict(os.environ, TRITON_INTERPRET="1"))
    from . import check

    unknown = [op for op in args.op or [] if op not in check.CASES]
    if unknown:
        print(f"unknown op(s) {unknown}; choose from {sorted(check.CASES)}", file=sys.stderr)
        return 2
    return check.main(args.op, args.device)


def cmd_bench(args) -> int:
    from .benchmarks import runner

    return runner.run(args)


def cmd_dispatch(args) -> int:
    from . import dispatch

    try:
        table = dispatch.write_table(args.results, args.out)
    except (OSError, ValueError) as e:
        print(f"fastbert dispatch: cannot build the table: {e}", file=sys.stderr)
        return 2
    lines = dispatch.summary_lines(table)
    print("\n".join(lines) if lines else
          "no shape class had both fast backends measured on a recorded GPU architecture: "
          "the table is empty")
    print(f"wrote {args.out}; use it with {dispatch.TABLE_ENV}={args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastbert", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, and which backend serves each op (or why not)")
    pc = sub.add_parser("check", help="run every op on every available backend against the reference")
    pc.add_argument("--op", action="append", help="only this op (repeatable)")
    pc.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="where to run the checks (default: cuda when a GPU is visible, else cpu)")
    pd = sub.add_parser("dispatch", help="build a dispatch table for backend='auto' from fastbert bench "
                                         "results (then set FASTBERT_DISPATCH_TABLE to it)")
    pd.add_argument("results", nargs="+", help="results.json files written by fastbert bench, oldest first")
    pd.add_argument("--out", required=True, help="where to write the table (JSON)")
    pb = sub.add_parser("bench", help="microbenchmarks against the installed peers (needs a GPU)")
    try:
        from .benchmarks import runner

        runner.add_arguments(pb)
    except ImportError as e:  # the benchmark package is part of fastbert; this guards partial installs
        pb.set_defaults(_bench_error=str(e))
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except BrokenPipeError:  # e.g. ``fastbert info | head``: the reader left, nothing to report
        # Python flushes stdout again at exit, into the same closed pipe: point it at devnull first
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _run(args) -> int:
    if args.command == "info":
        return cmd_info(args)
    if args.command == "check":
        return cmd_check(args)
    if args.command == "dispatch":
        return cmd_dispatch(args)
    if getattr(args, "_bench_error", None):
        print(f"fastbert bench is unavailable: {args._bench_error}", file=sys.stderr)
        return 2
    return cmd_bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
