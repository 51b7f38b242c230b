"""Helpers shared by the test suite and ``fastbert check``: random inputs and the tolerance rule.

The rule (FlashAttention's): a kernel's error against an fp64 reference may be at most
``factor`` times the error of a PyTorch computation in the same low precision (plus a small
absolute floor for values that it happens to get exactly right, never below one ulp of the
output's dtype at the reference value), so the tolerance follows each dtype's real precision
instead of a hand-tuned constant.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["rand", "max_err", "check_close", "assert_close", "interpreter_atol", "DEVICE",
           "ATOL_FLOOR", "leaf_like", "nan_filled_allocations", "zero_fills_by_autograd",
           "compare_to_reference",
           "run_with_grads", "check_output", "poison_cuda_cache", "cuda_graph_replays",
           "assert_fresh_replays", "forbid_int64_host_reads", "shard_group",
           "shard_sizes", "shard_groups", "parse_shard", "assert_runs_in_fresh_python",
           "assert_compiled_encoder_matches"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Absolute floor added to the allowed error, per dtype: covers outputs that a low-precision
# PyTorch computation happens to get exactly right.
ATOL_FLOOR = {
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
    torch.float32: 1e-5,
    torch.float64: 1e-10,
}


def rand(shape: Sequence[int], dtype=torch.float32, device=DEVICE, *, requires_grad: bool = False,
         scale: float = 1.0, noncontiguous: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
    """Standard-normal tensor; ``noncontiguous=True`` returns a strided view with the same values
    semantics (every other element of a twice-as-wide last dim)."""
    shape = tuple(shape)
    if noncontiguous and not shape:
        raise ValueError("noncontiguous=True needs a shape with at least one dim (a 0-d tensor has "
                         "no stride to skip along)")
    if noncontiguous:
        base = torch.randn(shape[:-1] + (2 * shape[-1],), dtype=torch.float32, generator=generator)
        t = (base * scale).to(device=device, dtype=dtype)[..., ::2]
    else:
        t = (torch.randn(shape, dtype=torch.float32, generator=generator) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def max_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| in float64 over tensors of the same shape (never broadcast: a wrongly shaped
    output must not pass); equal entries, infinities included, differ by 0; a NaN in either, or an
    infinity the other lacks, gives inf."""
    d = _abs_err(a, b)
    return float(d.max()) if d.numel() else 0.0


def _abs_err(a: Tensor, b: Tensor) -> Tensor:
    """|a - b| elementwise in float64, as :func:`max_err` counts it (NaN -> inf)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.detach().double(), b.detach().double()
    d = torch.where(a == b, 0.0, (a - b).abs())
    return torch.nan_to_num(d, nan=float("inf"), posinf=float("inf"))


def check_close(out: Tensor, ref: Tensor, lowp_ref: Optional[Tensor] = None, factor: float = 2.0,
                atol: Optional[float] = None) -> tuple:
    """Returns (ok, err, allowed) under the rule in the module docstring. ``ref`` is the fp64
    reference, ``lowp_ref`` a PyTorch computation in ``out``'s dtype (None: only the floor).

    The floor of each element is at least one ulp of ``out``'s dtype at the reference value: an
    output rounded to the neighbour of the nearest representable value (its exact value a hair
    on the other side of the midpoint) is as accurate as its dtype allows, even where the
    low-precision computation happens to round to the nearest one and the absolute floor lies
    below an ulp (float16 beyond 8, e.g. a mask gradient summed over many rows). ``err`` and
    ``allowed`` are those of the element closest to (or furthest past) its bound."""
    floor = ATOL_FLOOR.get(out.dtype, 1e-5) if atol is None else atol
    base = max_err(lowp_ref, ref) if lowp_ref is not None else 0.0
    d = _abs_err(out, ref)
    if d.numel() == 0:
        _log_margin(0.0, factor * base + floor, out.dtype)
        return True, 0.0, factor * base + floor
    bound = factor * base + torch.clamp(_ulp(ref.detach().double(), out.dtype), min=floor)
    within = d <= bound
    ratio = d / bound  # passing: in [0, 1] (0/0 and inf/inf count 0); failing: > 1 or inf
    ratio = torch.where(within, ratio.nan_to_num(nan=0.0).clamp(max=1.0),
                        ratio.nan_to_num(nan=float("inf"), posinf=float("inf")))
    worst = int(torch.argmax(ratio))
    err, allowed = float(d.flatten()[worst]), float(bound.flatten()[worst])
    _log_margin(err, allowed, out.dtype)
    return bool(within.all()), err, allowed


def _ulp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The spacing of ``dtype``'s values at ``|x|`` (float64 in and out; inf gives inf, NaN 0: a
    NaN reference leaves the bound to the low-precision run's error, which is then inf)."""
    if not dtype.is_floating_point:
        return torch.zeros_like(x)
    info = torch.finfo(dtype)
    _, e = torch.frexp(x.abs().clamp(min=info.smallest_normal))  # |x| in [2^(e-1), 2^e)
    ulp = torch.ldexp(torch.full_like(x, info.eps), e - 1)
    return ulp.where(torch.isfinite(x), x.abs().nan_to_num(nan=0.0, posinf=float("inf")))


def _log_margin(err: float, allowed: float, dtype: torch.dtype) -> None:
    """With ``FASTBERT_TOLERANCE_LOG=path``, appends one line per check (test id, dtype, error,
    allowed error, their ratio) to ``path``, so that checks passing by a thin margin can be found
    across many seeds before they fail in CI (``python tests/tolerance_margins.py path``)."""
    path = os.environ.get("FASTBERT_TOLERANCE_LOG")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    # the suites that tests/test_gpu_tiles.py and the AddressSanitizer child rerun log the same test
    # ids: tag them, so that their margins (other tiles: other rounding) are not mixed in
    tags = []
    if os.environ.get("FASTBERT_INTERPRETER_TILES"):
        tags.append(f"tiles={os.environ['FASTBERT_INTERPRETER_TILES']}")
    if os.environ.get("FASTBERT_EMU_SANITIZE"):
        tags.append("asan")
    if tags:
        test += " {" + ",".join(tags) + "}"
    ratio = err / allowed if allowed > 0 else float("inf")
    with open(path, "a") as f:
        f.write(f"{test}\t{str(dtype).replace('torch.', '')}\t{err:.3e}\t{allowed:.3e}\t{ratio:.4f}\n")


def interpreter_atol(dtype: torch.dtype, ref: Tensor) -> Optional[float]:
    """The absolute error to allow for an output of ``dtype`` computed by a Triton kernel under the
    interpreter (``TRITON_INTERPRET=1``), or None for the dtype's usual floor.

    The interpreter converts float32 to bfloat16 by truncation, which can cost one ulp (2^-7 of the
    magnitude) where a compiled kernel and PyTorch round to nearest (half an ulp). When PyTorch's
    own bf16 result happens to be accurate, "2x PyTorch's error" falls below that ulp: the floor
    then grows by one ulp of the largest reference value. Compiled kernels get no such allowance."""
    from .backends import interpreter_enabled

    if dtype != torch.bfloat16 or not interpreter_enabled() or ref.numel() == 0:
        return None
    return ATOL_FLOOR[torch.bfloat16] + 2.0 ** -7 * float(ref.detach().abs().max())


def assert_close(out: Tensor, ref: Tensor, lowp_ref: Optional[Tensor] = None, factor: float = 2.0,
                 atol: Optional[float] = None, name: str = "output") -> None:
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    ok, err, allowed = check_close(out, ref, lowp_ref, factor, atol)
    if not ok:
        raise AssertionError(f"{name}: error {err:.3e} > allowed {allowed:.3e} at the worst element "
                             f"(dtype {out.dtype}, shape {tuple(out.shape)})")


@contextlib.contextmanager
def nan_filled_allocations():
    """While active, every new tensor starts as NaN (torch's deterministic mode with
    ``fill_uninitialized_memory``), those a C++ extension allocates through ATen included, so an
    output element a kernel leaves unwritten shows up. Restores both settings on exit."""
    det = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@contextlib.contextmanager
def zero_fills_by_autograd():
    """Records (op name, shape) of each zero-filled tensor made while active with no frame of
    fastbert's code (the package and its kernels) on the Python stack: in a backward pass, the zero
    gradients autograd materialises for outputs the loss did not use (a custom op's statistics,
    say), which an op avoids with ``ctx.set_materialize_grads(False)``. Yields the list it appends
    to."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    import fastbert.kernels

    ours = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                 for m in (fastbert, fastbert.kernels))

    made: List[Tuple[str, Tuple[int, ...]]] = []
    fills = {"zeros", "zeros_like", "new_zeros", "zero_", "full", "full_like", "new_full"}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in fills and not any(os.path.abspath(f.filename).startswith(ours)
                                         for f in traceback.extract_stack()[:-1]):  # not this one
                made.append((name, tuple(out.shape)))
            return out

    with Record():
        yield made


def poison_cuda_cache() -> None:
    """Fills the free blocks of the CUDA caching allocator (small and large pools) with NaN, so that
    an output a C++ / CUDA kernel allocates through it and leaves unwritten shows up as NaN (such
    allocations bypass the test suite's NaN poisoning of Python-side allocations)."""
    sizes = [1 << 10] * 512 + [1 << 17] * 16 + [1 << 22] * 8  # fp32: 2 + 8 MiB small pool, 128 MiB large
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in sizes]
    del blocks


def leaf_like(t, dtype: Optional[torch.dtype] = None):
    """A fresh leaf copy of ``t`` that requires grad, with ``t``'s strides (a strided view stays a
    strided view, so the kernel sees the same layout; an expanded view becomes contiguous) and cast
    to ``dtype`` if given. Non-floating tensors (bool masks) and non-tensors come back as they are."""
    if not isinstance(t, Tensor) or not t.is_floating_point():
        return t
    t = t.detach()
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):  # an expanded view: no overlap
        return t.to(dtype or t.dtype, copy=True).contiguous().requires_grad_(True)
    out = torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device=t.device)
    return out.copy_(t).requires_grad_(True)


def compare_to_reference(fn: Callable, inputs: Sequence, dys: Sequence[Optional[Tensor]],
                         dtype: torch.dtype, name: str, *, backend: str,
                         ref_kwargs: Optional[dict] = None) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
    """Checks an op's outputs and every input gradient against the fp64 reference.

    ``fn(*inputs, backend=b, **kw)`` runs the op under test (``b = backend``) or the reference
    (``b = "ref"``, with ``ref_kwargs`` and, for the low-precision run, ``compute_dtype=dtype``);
    it returns one tensor or a tuple. Every floating input becomes a leaf (:func:`leaf_like`: same
    strides); ``dys`` holds one upstream gradient per output (None: that output gets none), the
    same for all three runs. Each output and gradient must have the low-precision run's dtype, be
    finite and be within :func:`assert_close` of the fp64 one, with the low-precision run's error
    setting the bound. Returns the op's (outputs, gradients), as :func:`run_with_grads` does."""
    ref_kwargs = dict(ref_kwargs or {})
    got = run_with_grads(fn, inputs, dys, None, backend=backend)
    want = run_with_grads(fn, inputs, dys, torch.float64, backend="ref", **ref_kwargs)
    low = run_with_grads(fn, inputs, dys, None, backend="ref", compute_dtype=dtype, **ref_kwargs)
    for kind, g, w, lo in (("out", got[0], want[0], low[0]), ("grad", got[1], want[1], low[1])):
        for i, (o, r, l) in enumerate(zip(g, w, lo)):
            label = f"{name} {kind}[{i}]"
            if r is None:
                assert o is None, f"{label}: unexpected gradient"
                continue
            assert o is not None, f"{label}: missing"
            check_output(o, r, l, label)
    return got


def run_with_grads(fn: Callable, inputs: Sequence, dys: Sequence[Optional[Tensor]],
                   cast: Optional[torch.dtype] = None, **kwargs) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
    """``fn(*leaves, **kwargs)`` on :func:`leaf_like` copies of ``inputs`` (cast to ``cast``), then
    backward with ``dys`` (one upstream gradient per output; None: that output gets none). Returns
    (detached outputs, the leaves' gradients; None for non-tensors and leaves without one)."""
    ins = [leaf_like(t, cast) for t in inputs]
    outs = fn(*ins, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, dy.to(o.dtype)) for o, dy in zip(outs, dys) if dy is not None]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [dy for _, dy in pairs])
    grads = [t.grad if isinstance(t, Tensor) and t.requires_grad else None for t in ins]
    return [o.detach() for o in outs], grads


def check_output(out: Tensor, ref: Tensor, lowp_ref: Tensor, name: str) -> None:
    """``out`` has ``lowp_ref``'s dtype, is finite and is within :func:`assert_close` of the fp64
    ``ref`` (the low-precision reference's error setting the bound)."""
    assert out.dtype == lowp_ref.dtype, f"{name}: dtype {out.dtype}, expected {lowp_ref.dtype}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    assert_close(out, ref, lowp_ref, name=name)


def cuda_graph_replays(step: Callable[[], Sequence[Tensor]], replays: int = 2,
                       warmup: int = 2) -> List[List[Tensor]]:
    """Capture ``step()`` (which returns tensors) in a CUDA graph and replay it ``replays`` times;
    returns a copy of the outputs of each replay. ``step`` first runs ``warmup`` times on a side
    stream, outside the capture (kernels compiled, extension loaded, allocator warmed)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = list(step())
    out = []
    for _ in range(replays):
        graph.replay()
        out.append([t.clone() for t in static])
    torch.cuda.synchronize()
    return out


def assert_fresh_replays(replays: Sequence[Sequence[Tensor]], seed_index: int = 1) -> None:
    """Replays of a captured dropout step drew fresh randomness: the seed (``replays[i][seed_index]``,
    on the GPU) and every other output differ between the first two replays."""
    first, second = replays[0], replays[1]
    assert first[seed_index].device.type == "cuda", "the dropout seed must live on the GPU"
    for i, (a, b) in enumerate(zip(first, second)):
        assert not torch.equal(a, b), f"output {i} is identical in two replays: the dropout mask was frozen"


def forbid_int64_host_reads(monkeypatch) -> None:
    """With pytest's ``monkeypatch`` (or one of its contexts): make every host read of an int64
    tensor's value (``int(seed[0])``, ``seed.item()``, ``tolist``, ...) raise AssertionError, so
    that a test passing under it proves the dropout seed stays on the device."""
    def guard(name):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            if self.dtype == torch.int64:
                raise AssertionError(f"Tensor.{name}() read an int64 tensor on the host")
            return original(self, *args, **kwargs)
        return method

    for name in ("item", "tolist", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, guard(name))


def parse_shard(spec: str) -> Tuple[int, int]:
    """``"i/n"`` (0 <= i < n) -> (i, n); ValueError naming the expected form otherwise."""
    try:
        i, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise ValueError(f"FASTBERT_TEST_SHARD must look like 'i/n' (e.g. '0/4'), got {spec!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"FASTBERT_TEST_SHARD {spec!r}: need 0 <= i < n")
    return i, n


def shard_group(item) -> str:
    """The group of a collected pytest item: its test function (node id without parameters)."""
    return item.nodeid.split("[", 1)[0]


def shard_sizes(items) -> Dict[str, int]:
    """Group (test function) -> weight, over collected pytest items other than `bigmem` ones: a test
    counts once, or n times when marked ``shard_weight(n)`` (a fuzz test, whose every example
    compiles kernels on a GPU)."""
    sizes: Dict[str, int] = {}
    for item in items:
        if "bigmem" in item.keywords:
            continue
        marker = item.get_closest_marker("shard_weight")
        weight = int(marker.args[0]) if marker is not None else 1
        sizes[shard_group(item)] = sizes.get(shard_group(item), 0) + weight
    return sizes


def shard_groups(sizes: Dict[str, int], n: int) -> Dict[str, int]:
    """Assign groups of tests (name -> number of tests) to ``n`` shards, largest group first onto
    the least-loaded shard (deterministic: ties go by name, then by shard index). The tests of one
    test function stay together, so that the kernel variants they compile are compiled once."""
    load = [0] * n
    out: Dict[str, int] = {}
    for name in sorted(sizes, key=lambda g: (-sizes[g], g)):
        shard = min(range(n), key=lambda i: (load[i], i))
        out[name] = shard
        load[shard] += sizes[name]
    return out


def assert_runs_in_fresh_python(code: str, expect: str, timeout: int = 600) -> None:
    """Run ``code`` in a new Python interpreter (nothing this process cached or imported carries
    over), without ``TRITON_INTERPRET``, and assert that it exits 0 and prints ``expect``."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0 and expect in proc.stdout, proc.stderr[-3000:]


def assert_compiled_encoder_matches(encoder: torch.nn.Module, batches: Sequence[Tuple[Tensor, Tensor]],
                                    mask_arg: str = "attention_mask", backend: str = "inductor") -> None:
    """``torch.compile(encoder, fullgraph=True)`` on each ``(input, mask)`` batch (called as
    ``encoder(input, **{mask_arg: mask})``: ``attention_mask`` for the HuggingFace-style encoders,
    ``src_key_padding_mask`` for ``fastbert.nn.TransformerEncoder``) equals the eager encoder (fp32
    rounding aside: Inductor fuses the ops around the kernels), with Dynamo told to capture
    data-dependent shapes (a padding-free encoder's packed length and max_seqlen come from the
    mask). ``backend``: torch.compile's. Dynamo is reset before and after."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(encoder, fullgraph=True, backend=backend)
    try:
        with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True,
                                                         capture_scalar_outputs=True):
            for inputs, mask in batches:
                torch.testing.assert_close(compiled(inputs, **{mask_arg: mask}),
                                           encoder(inputs, **{mask_arg: mask}), rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
