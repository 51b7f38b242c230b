"""Host overhead: microseconds of CPU time each fastbert op costs per call, beside torch's own op.

At BERT-base shapes a fused kernel runs for 5-50 us, so the Python work around it (argument checks,
backend selection, autograd, the dispatcher) decides whether an eager model keeps the GPU busy.
This script calls each op many times on tiny inputs and reports wall time per call:

    python bench/bench_overhead.py                 # on a CUDA GPU: real launches, tiny shapes
    TRITON_INTERPRET=1 python bench/bench_overhead.py --stub   # anywhere: kernels replaced by
                                                               # their fake (allocation-only) impls
    ... --out overhead.json --calls 2000

On a GPU the inputs are small enough that the kernels finish faster than the host issues them, so
the figure is the host's cost per call (launch included). With ``--stub`` (needed without a GPU)
every Triton custom op runs its fake implementation instead of a kernel: the figure is fastbert's
Python and autograd path alone, on CPU tensors, and the torch peer runs its real (tiny) CPU op
on one thread.
Passes: ``fwd`` (no gradient needed) and ``fwd+bwd`` (inputs require grad; backward included).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import fastbert
from fastbert._library import fast_ops

@contextlib.contextmanager
def stubbed_kernels():
    """Every FastOp runs its fake implementation (allocation only) instead of its kernels."""
    ops = fast_ops()
    saved = [(op, op.impl) for op in ops]
    try:
        for op in ops:
            op.impl = op.fake
        yield
    finally:
        for op, impl in saved:
            op.impl = impl


def cases(device: str) -> Dict[str, Dict[str, Callable]]:
    """op -> {implementation: make(requires_grad) -> call()}. Tiny BERT-like shapes."""
    dt = torch.float16 if device == "cuda" else torch.float32

    def t(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dt).requires_grad_(grad)

    def sdpa(fn):
        def make(grad):
            q, k, v = (t(1, 2, 16, 64, grad=grad) for _ in range(3))
            mask = torch.ones(1, 1, 1, 16, dtype=torch.bool, device=device)
            return lambda: fn(q, k, v, mask)
        return make

    def varlen(backend):
        def make(grad):
            q, k, v = (t(32, 2, 64, grad=grad) for _ in range(3))
            cu = torch.tensor([0, 10, 32], dtype=torch.int32, device=device)
            return lambda: fastbert.varlen_attention(q, k, v, cu, cu, 22, 22, backend=backend)
        return make

    def block_sparse(backend):
        layout = fastbert.sparsity.sliding_window(64, 16, window=1).to(device)

        def make(grad):
            q, k, v = (t(1, 2, 64, 64, grad=grad) for _ in range(3))
            return lambda: fastbert.block_sparse_attention(q, k, v, layout, 16, backend=backend)
        return make

    def rows(fn, n=768):
        def make(grad):
            x, r, w, b = t(4, n, grad=grad), t(4, n, grad=grad), t(n, grad=grad), t(n, grad=grad)
            return lambda: fn(x, r, w, b)
        return make

    def fb(name, backend):
        f = getattr(fastbert, name)
        if name == "scaled_dot_product_attention":
            return lambda q, k, v, m: f(q, k, v, m, backend=backend)
        if name == "layer_norm":
            return lambda x, r, w, b: f(x, (x.shape[-1],), w, b, backend=backend)
        if name == "add_layer_norm":
            return lambda x, r, w, b: f(x, r, w, b, input_bias=b, backend=backend)
        return lambda x, r, w, b: f(x, b, "tanh", backend=backend)

    backends = ["triton"] + (["cuda"] if device == "cuda" else [])
    out: Dict[str, Dict[str, Callable]] = {
        "scaled_dot_product_attention": {"torch-sdpa": sdpa(F.scaled_dot_product_attention)},
        "varlen_attention": {},
        "block_sparse_attention": {},
        "layer_norm": {"torch-eager": rows(
            lambda x, r, w, b: F.layer_norm(x, (x.shape[-1],), w, b))},
        "add_layer_norm": {"torch-eager": rows(
            lambda x, r, w, b: F.layer_norm(x + b + r, (x.shape[-1],), w, b))},
        "bias_gelu": {"torch-eager": rows(lambda x, r, w, b: F.gelu(x + b, approximate="tanh"),
                                          3072)},
    }
    for be in backends:
        name = f"fastbert-{be}"
        out["scaled_dot_product_attention"][name] = sdpa(fb("scaled_dot_product_attention", be))
        out["layer_norm"][name] = rows(fb("layer_norm", be))
        out["add_layer_norm"][name] = rows(fb("add_layer_norm", be))
        out["bias_gelu"][name] = rows(fb("bias_gelu", be), 3072)
    out["varlen_attention"]["fastbert-triton"] = varlen("triton")
    out["block_sparse_attention"]["fastbert-triton"] = block_sparse("triton")
    return out


def per_call_us(call: Callable, grad: bool, calls: int, device: str) -> float:
    def step():
        out = call()
        if grad:
            out.float().sum().backward()

    for _ in range(20):  # warm-up: compile, load, fill select's memory
        step()
    best = float("inf")
    for _ in range(3):  # best of three runs of `calls` calls
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stub", action="store_true",
                    help="replace the Triton kernels by their fake implementations (no GPU needed)")
    ap.add_argument("--calls", type=int, default=1000, help="calls per timing run (default 1000)")
    ap.add_argument("--out", help="write the results as JSON to this file")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.stub else "cpu"
    if device == "cpu" and not args.stub:
        print("no CUDA GPU: pass --stub (with TRITON_INTERPRET=1) to measure the Python path alone",
              file=sys.stderr)
        return 2
    if args.stub and not fastbert.backends.interpreter_enabled():
        print("--stub needs TRITON_INTERPRET=1 (Triton on CPU tensors)", file=sys.stderr)
        return 2
    if args.stub:
        # the torch peers run real CPU kernels on tiny inputs: one thread, so that their figure
        # is a call's cost, not a thread pool's wake-up on a shared machine
        torch.set_num_threads(1)
    rows = []
    ctx = stubbed_kernels() if args.stub else contextlib.nullcontext()
    with ctx:
        for op, impls in cases(device).items():
            for impl, make in impls.items():
                for pass_, grad in (("fwd", False), ("fwd+bwd", True)):
                    us = per_call_us(make(grad), grad, args.calls, device)
                    rows.append({"op": op, "pass": pass_, "impl": impl,
                                 "us_per_call": round(us, 2)})
                    print(f"{op:30s} {pass_:8s} {impl:18s} {us:8.1f} us/call", flush=True)
    if args.out:
        name = (torch.cuda.get_device_name() if device == "cuda"
                else platform.processor() or platform.machine())
        meta = {"device": name, "cpu_count": os.cpu_count(), "mode": "stub" if args.stub else "gpu",
                "torch": torch.__version__, "fastbert": fastbert.__version__,
                "python": platform.python_version(), "calls": args.calls}
        try:
            import triton
            meta["triton"] = triton.__version__
        except ImportError:
            pass
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
