"""backend="cuda": the CUDA C++ kernels of csrc/, run on the CPU by the emulator in tests/cuda_emu.

CI has no GPU, so without this file csrc/ would only be compiled there. tests/cuda_emu/build_emu.py
compiles every csrc file as C++ against tests/cuda_emu/cuda_emu.h, which runs each block's threads
as fibers with __syncthreads, __syncwarp, warp shuffles and WMMA emulated, in the most adversarial
order a GPU may choose between two barriers (one thread runs to its next barrier before the next
thread starts). The binding (csrc/fastbert.cpp) is the same code, registered as
torch.ops.fastbert_emu.* for CPU tensors, and the Python glue of backend="cuda" (the registered
implementation functions, their autograd formulas) runs on top of it. So these tests check the
kernels' indexing, strides, reductions, masking, dropout rule, barriers and launch configurations
(block sizes against __launch_bounds__, shared memory against an H100's limits) against
fastbert.reference in fp64, with every gradient, under the tolerance rule of fastbert.testing.
Every allocation is filled with NaN first (torch's fill_uninitialized_memory), so an output element
a kernel leaves unwritten fails the test.

What they cannot show: that nvcc compiles the kernels to the same thing (the GPU's fast math,
fp16 / bf16 conversions and tensor cores round slightly differently), speed, or anything about
memory ordering between blocks. The ``cuda``-marked tests in test_layer_norm.py, test_gelu.py and
test_attention.py run the same kernels on a GPU.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastbert import reference
from fastbert.testing import (assert_close, check_output, compare_to_reference, nan_filled_allocations, rand,
                              run_with_grads, zero_fills_by_autograd)

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import build_emu as cuda_emu  # noqa: E402  (tests/cuda_emu/build_emu.py)
import _background  # noqa: E402  (tests/_background.py)

# The op family modules (``fastbert.ops.gelu`` etc. are shadowed by the functions of that name).
attention_ops = sys.modules["fastbert.ops.attention"]
gelu_ops = sys.modules["fastbert.ops.gelu"]
layer_norm_ops = sys.modules["fastbert.ops.layer_norm"]

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [F32, F16, BF16]


@pytest.fixture(scope="module", params=["forward", "reverse"])
def emu(request):
    """torch.ops.fastbert_emu, with each family's glue registered on it and the families'
    ``_cuda_ops`` pointing at it (so their backend="cuda" implementations run emulated). Every test
    runs twice: with each block's threads run first to last, then last to first (a thread that
    reads what another writes without a barrier between gets a stale value in one of the two)."""
    missing = cuda_emu.toolchain_missing()
    if missing:
        pytest.skip(missing)
    with cuda_emu.emulated_cuda_backend(request.param) as ops:
        yield ops


@pytest.fixture(autouse=True)
def _sanitized_run_skips_bf16(request):
    """In the AddressSanitizer child (test_kernels_under_address_sanitizer) a bf16 case repeats its
    fp16 twin's memory accesses exactly (same element size, same launch logic; only the float
    conversions differ): it is skipped there to keep the instrumented run short. The plain runs
    still check every bf16 case's numbers."""
    if os.environ.get("FASTBERT_EMU_SANITIZE"):
        params = getattr(getattr(request.node, "callspec", None), "params", {})
        if any(v is BF16 for v in params.values()):
            pytest.skip("bf16: same accesses as its fp16 twin (instrumented run)")


@pytest.fixture(autouse=True)
def _nan_filled_allocations():
    """Every new tensor (the binding's outputs included) starts as NaN: unwritten outputs show."""
    with nan_filled_allocations():
        yield


def _compare(fn, inputs, dys, dtype, name):
    """compare_to_reference on the emulated kernels (``fn(..., backend="emu")``). In the forward
    order it then reruns the op on the same inputs in the reverse order, from the same generator
    state, and asserts that every output and gradient is bitwise the same: the kernels have no
    atomics and fixed reduction trees, so any difference is a race between threads (a read of
    shared memory another thread has or has not yet written), even one too small for the
    tolerance. The AddressSanitizer rerun skips this half."""
    state = torch.get_rng_state()
    outs, grads = compare_to_reference(fn, inputs, dys, dtype, name, backend="emu")
    if os.environ.get("FASTBERT_EMU_ORDER") != "forward" or os.environ.get("FASTBERT_EMU_SANITIZE"):
        return
    torch.set_rng_state(state)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTBERT_EMU_ORDER", "reverse")
        outs_r, grads_r = run_with_grads(fn, inputs, dys, None, backend="emu")
    first = [("out", i, t) for i, t in enumerate(outs)] + [("grad", i, t) for i, t in enumerate(grads)]
    second = list(outs_r) + list(grads_r)
    for (kind, i, a), b in zip(first, second):
        if a is None:
            assert b is None, f"{name} {kind}[{i}]: a gradient in the reverse order only"
            continue
        same = (a == b) | (a.isnan() & b.isnan())
        assert same.all(), (f"{name} {kind}[{i}]: {int((~same).sum())} of {a.numel()} elements differ "
                            f"between the forward and reverse thread orders (max diff "
                            f"{float((a.double() - b.double()).abs().nan_to_num(float('inf')).max()):.3e}): "
                            f"a race between threads")


def _user_seed():
    """A torch.manual_seed value for a dropout test, drawn from the test's own fresh generator
    (tests/conftest.py): a different mask every run, reproduced by FASTBERT_TEST_SEED."""
    return int(torch.randint(0, 2**31, ()))


def _seed_of_next_draw(seed):
    """The dropout seed the binding draws after torch.manual_seed(seed): at::randint(2^63 - 1, {1})
    on the CPU generator, reproduced here."""
    torch.manual_seed(seed)
    return torch.randint(torch.iinfo(torch.int64).max, (1,))


# ----------------------------------------------------------------------------------------------
# The emulator itself
# ----------------------------------------------------------------------------------------------
def test_order_check_fails_on_an_order_dependent_result(monkeypatch):
    """_compare's bitwise check between the thread orders: a result that moves by one ulp with the
    order (what a race on a finite, stale value gives) passes the tolerance but fails the check."""
    def fn(x, backend, **kw):
        if backend == "emu":
            nudge = 1 + 2.0 ** -20 if os.environ["FASTBERT_EMU_ORDER"] == "reverse" else 1.0
            return x * nudge
        return x.to(kw.get("compute_dtype") or x.dtype) * 1.0
    monkeypatch.setenv("FASTBERT_EMU_ORDER", "forward")
    x = rand((4, 8), F32, "cpu")
    with pytest.raises(AssertionError, match="differ between the forward and reverse thread orders"):
        _compare(fn, [x], [rand((4, 8), F32, "cpu")], F32, "order-dependent")
    monkeypatch.setenv("FASTBERT_EMU_ORDER", "reverse")  # the reverse half only compares
    _compare(fn, [x], [rand((4, 8), F32, "cpu")], F32, "order-dependent")


def test_rewrite_of_cuda_syntax():
    src = ("template <typename T>\n__global__ void __launch_bounds__(256, 2)\nk(const P p) {\n"
           "  extern __shared__ __align__(128) unsigned char smem_raw[];\n"
           "  __shared__ float a[32], b[4][33];\n}\n"
           "void f() {\n  k<T, 4><<<dim3(a, b), 128, smem,\n      stream>>>(p, q);\n}\n")
    out = cuda_emu.rewrite(src)
    assert "__global__ void k(const P p) { ::emu::check_launch_bounds(256);" in out
    assert "unsigned char* smem_raw = reinterpret_cast<unsigned char*>(::emu::dynamic_smem());" in out
    assert "::emu::launch(::emu::Config(dim3(a, b), 128, smem,\n      stream), k<T, 4>, p, q);" in out
    assert ("__shared__ float a[32], b[4][33]; ::emu::poison_shared_once(a, sizeof(a)); "
            "::emu::poison_shared_once(b, sizeof(b));") in out
    assert "<<<" not in out and "__launch_bounds__" not in out


# ----------------------------------------------------------------------------------------------
# LayerNorm and add + LayerNorm (csrc/layer_norm)
# ----------------------------------------------------------------------------------------------
def _layer_norm(shape):
    def fn(x, w, b, backend, **kw):
        if backend == "emu":
            return layer_norm_ops._layer_norm_cuda(x, shape, w, b, 1e-5)
        return reference.layer_norm(x, shape, w, b, 1e-5, **kw)
    return fn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 7, 97, 768, 1000, 1024, 4096])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(emu, width, dtype, affine):
    rows = 3 if width >= 4096 else 17
    x = rand((rows, width), dtype, "cpu", scale=2.0) + 0.5
    w = rand((width,), dtype, "cpu") if affine else None
    b = rand((width,), dtype, "cpu") if affine else None
    _compare(_layer_norm((width,)), [x, w, b], [rand((rows, width), dtype, "cpu")], dtype,
             f"layer_norm {width}")


@pytest.mark.parametrize("offset", [100.0, 1000.0])
@pytest.mark.parametrize("width", [97, 768, 1000, 1024, 4096])
def test_layer_norm_large_common_offset(emu, width, offset):
    """fp32 rows of values near a large offset (std 1), forward: the variance must be taken around
    the mean (two passes, or Welford), not as E[x^2] - mean^2, which cancels there (9.3e-3 of error
    against 1.1e-4 allowed at width 768, offset 100); and the output must not subtract a mean
    rounded to fp32 (up to 2.4x the allowed error at offset 1000, 1.3x at 100, which failed CI once
    at width 4096; the corrected two-pass mean gives at most 0.06x over 40 draws)."""
    x = rand((5, width), F32, "cpu") + offset
    w, b = rand((width,), F32, "cpu"), rand((width,), F32, "cpu")
    with torch.no_grad():
        out = layer_norm_ops._layer_norm_cuda(x, (width,), w, b, 1e-5)
    ref = reference.layer_norm(x.double(), (width,), w.double(), b.double(), 1e-5)
    check_output(out, ref, torch.nn.functional.layer_norm(x, (width,), w, b, 1e-5),
                 f"layer_norm {width} offset {offset:g}")


@pytest.mark.parametrize("width", [97, 768])
def test_layer_norm_overflowing_variance_is_not_zero(emu, width):
    """Rows whose squared deviations overflow fp32 (|x| ~ 1e30, bf16): the variance stays inf and
    rstd 0, so the row gives the bias, as the Triton kernels do (torch: the bias at width 97, NaN
    at 768); the corrected two-pass variance (m2 - shift^2 = inf - inf = NaN, clamped to 0) made
    it rstd = 1 / sqrt(eps) and outputs of ~1e33."""
    x = (torch.randn(3, width) * 1e30).to(BF16)
    w, b = torch.ones(width, dtype=BF16), rand((width,), BF16, "cpu")
    with torch.no_grad():
        out, _, rstd = layer_norm_ops._cuda_ops().layer_norm_fwd(x, w, b, 1e-5)
    assert torch.equal(out, b.expand_as(out)) and (rstd == 0).all()
    x[1, 5] = float("nan")  # a NaN stays NaN, in the statistics too
    with torch.no_grad():
        out, _, rstd = layer_norm_ops._cuda_ops().layer_norm_fwd(x, w, b, 1e-5)
    assert out[1].isnan().all() and rstd[1].isnan() and torch.equal(out[0], b)


@pytest.mark.parametrize("view", ["cols_768_of_1024", "cols_97_of_100", "every_other_row"])
def test_layer_norm_views(emu, view):
    if view == "cols_768_of_1024":
        x = rand((33, 1024), F16, "cpu")[:, :768]
    elif view == "cols_97_of_100":
        x = rand((33, 100), F16, "cpu")[:, 3:]
    else:
        x = rand((66, 768), F16, "cpu")[::2]
    n = x.shape[-1]
    _compare(_layer_norm((n,)), [x, rand((n,), F16, "cpu"), rand((n,), F16, "cpu")],
             [rand(x.shape, F16, "cpu")], F16, f"layer_norm {view}")


def test_layer_norm_rows(emu):
    """Many rows of a narrow width (several rows per block, a partial last block), fp16 with
    large magnitudes."""
    x = rand((130, 97), F16, "cpu", scale=300.0) + 1000.0
    _compare(_layer_norm((97,)), [x, None, None], [rand((130, 97), F16, "cpu")], F16,
             "layer_norm 130 rows")


def _add_layer_norm(dropout_p=0.0, return_residual=False, keep=None, seed=0):
    def fn(x, r, w, b, xb, backend, **kw):
        if backend == "emu":
            torch.manual_seed(seed)
            return layer_norm_ops._add_layer_norm_cuda(x, r, w, b, 1e-5, xb, dropout_p, return_residual)
        return reference.add_layer_norm(x, r, w, b, 1e-5, input_bias=xb, dropout_p=dropout_p,
                                        return_residual=return_residual, dropout_mask=keep, **kw)
    return fn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [7, 97, 768, 1024])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("return_residual", [False, True])
def test_add_layer_norm(emu, width, dtype, dropout_p, return_residual):
    rows = 19
    x, r = rand((rows, width), dtype, "cpu"), rand((rows, width), dtype, "cpu")
    w, b = rand((width,), dtype, "cpu") * 0.5 + 1.0, rand((width,), dtype, "cpu")
    xb = rand((width,), dtype, "cpu")
    keep, seed = None, _user_seed()
    if dropout_p > 0:
        keep = emu.dropout_mask(_seed_of_next_draw(seed), [rows, width], dropout_p)
    dys = [rand((rows, width), dtype, "cpu")] + ([rand((rows, width), dtype, "cpu")] if return_residual else [])
    _compare(_add_layer_norm(dropout_p, return_residual, keep, seed=seed), [x, r, w, b, xb], dys,
             dtype, f"add_layer_norm {width} p={dropout_p}")


def test_add_layer_norm_fp32_dropout_scale_is_exact(emu):
    """fp32 with p close to 1: kept values scale by 1 / (1 - p) computed from the caller's double p
    (as torch does), not from p rounded to fp32 (1 / (1 - 0.99f) is off by 9.5e-7 relative: the
    returned sum was ~8x the allowed error, d_input ~9x). The sum only: with ~1% of the values
    kept at 100x, the normalised rows are outlier rows, where both backends are only ~torch's
    accuracy (p = 0.999 flaked there)."""
    rows, width, p = 64, 768, 0.99  # ~500 kept values: a stable max error
    x, r = rand((rows, width), F32, "cpu"), rand((rows, width), F32, "cpu")
    w, b, xb = rand((width,), F32, "cpu"), rand((width,), F32, "cpu"), rand((width,), F32, "cpu")
    seed = _user_seed()
    keep = emu.dropout_mask(_seed_of_next_draw(seed), [rows, width], p)
    fn = _add_layer_norm(p, True, keep, seed=seed)
    with torch.no_grad():
        _, s = fn(x, r, w, b, xb, backend="emu")
        _, s_ref = fn(*(t.double() for t in (x, r, w, b, xb)), backend="ref")
        _, s_low = fn(x, r, w, b, xb, backend="ref", compute_dtype=F32)
    # factor 4: the kernel's (x + b) * scale + r rounds like torch's, but not always in the same
    # place (0.7x of the usual bound at worst over 16 draws); the fp32-rounded scale was 4-6x
    assert_close(s, s_ref, s_low, factor=4.0, name="add_layer_norm p=0.99 returned sum")


@pytest.mark.parametrize("x_dtype", [F16, BF16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("width", [7, 97, 768, 1024, "1000-strided"])
def test_add_layer_norm_mixed_dtypes(emu, x_dtype, dropout_p, width):
    """A 16-bit input with an fp32 residual and fp32 parameters (mixed precision), read as they
    are: the fast (768, 1024), vectorised generic and scalar (7, a strided input) kernels with the
    input in its own dtype; results in fp32, the input's gradient in the input's dtype, written by
    the kernel even without dropout (compare_to_reference checks every dtype against the
    reference's; the NaN-filled allocations show an unwritten one)."""
    rows = 19
    strided = width == "1000-strided"
    width = 1000 if strided else width
    x = rand((rows, 2 * width), x_dtype, "cpu")[:, ::2] if strided else rand((rows, width), x_dtype, "cpu")
    r = rand((rows, width), F32, "cpu")
    w, b, xb = rand((width,), F32, "cpu"), rand((width,), F32, "cpu"), rand((width,), F32, "cpu")
    keep, seed = None, _user_seed()
    if dropout_p > 0:
        keep = emu.dropout_mask(_seed_of_next_draw(seed), [rows, width], dropout_p)
    dys = [rand((rows, width), F32, "cpu") for _ in range(2)]
    _compare(_add_layer_norm(dropout_p, True, keep, seed=seed), [x, r, w, b, xb], dys, x_dtype,
             f"add_layer_norm {x_dtype}+fp32 p={dropout_p}")


def test_add_layer_norm_without_affine_or_input_bias(emu):
    x, r = rand((5, 768), F16, "cpu"), rand((5, 768), F16, "cpu")
    _compare(_add_layer_norm(), [x, r, None, None, None], [rand((5, 768), F16, "cpu")], F16,
             "add_layer_norm plain")


# Launch configurations of csrc/layer_norm, mirrored from its launchers so that each case below can
# assert the path it is meant to take (the emulator runs whatever the launcher picks).
_VEC = {F32: 4, F16: 8, BF16: 8}  # vec_width<T>(): elements per 128-bit access
_FAST_WIDTHS = (768, 1024, 4096)
_SMS = 132  # the emulated H100's SM count (sizes the backward's row slots)


def _aligned(t):
    return t is None or t.data_ptr() % 16 == 0


def _ln_path(x, *vectors, residual=None):
    """The forward kernel layer_norm_fwd.cu's `launch` picks for a [rows, cols] input `x` (last dim
    contiguous), the optional [cols] vectors (weight, bias, input_bias) and residual: "fast" (the
    register-resident 768 / 1024 / 4096 kernels), "vec" (generic, 128-bit vectors) or "scalar"
    (generic, VEC = 1). The outputs are fresh (aligned) allocations."""
    vec = _VEC[x.dtype]
    ok = (x.shape[-1] % vec == 0 and x.stride(0) % vec == 0 and _aligned(x)
          and all(_aligned(t) for t in vectors)
          and (residual is None or (residual.stride(0) % vec == 0 and _aligned(residual))))
    if not ok:
        return "scalar"
    return "fast" if x.shape[-1] in _FAST_WIDTHS else "vec"


def _ln_bwd_slots(path, dtype, rows, cols):
    """layer_norm_bwd_slots: how many row slots (partial sums per column) the backward uses."""
    vec = 1 if path == "scalar" else _VEC[dtype]
    if path == "fast":
        tpr = 128 if cols // vec >= 512 else 32
        rpb, per_sm = 128 // tpr, 2
    else:
        tpr = 32
        while tpr < 512 and tpr * 4 < cols // vec:
            tpr *= 2
        rpb = 1 if tpr >= 128 else 128 // tpr
        per_sm = 1 if tpr * rpb >= 512 else 512 // (tpr * rpb)
    blocks = min(_SMS * per_sm, -(-rows // rpb), max(1, (4 << 20) // (cols * rpb)))
    return max(blocks, 1) * rpb


def _layout(kind, rows, cols, dtype, scale=1.0):
    """(base, view): a fresh random leaf-able tensor and the function giving the [rows, cols] view
    the op sees. Views that need a storage offset are taken inside the op's function: leaf_like
    (_compare) copies its inputs into fresh (aligned) storage with the same strides."""
    if kind == "contiguous":
        return rand((rows, cols), dtype, "cpu", scale=scale), None
    if kind == "odd_offset":  # element offset 1: misaligned for every 128-bit access
        return rand((rows * cols + 1,), dtype, "cpu", scale=scale), lambda t: t[1:].view(rows, cols)
    if kind.startswith("stride"):  # row stride > cols, first element aligned
        return rand((rows, int(kind[6:])), dtype, "cpu", scale=scale), lambda t: t[:, :cols]
    if kind == "every_other_row":
        return rand((2 * rows, cols), dtype, "cpu", scale=scale), lambda t: t[::2]
    raise ValueError(kind)


def _vector(kind, cols, dtype):
    """(base, view) of a [cols] parameter: "plain", "odd_offset" (misaligned) or "none"."""
    if kind == "none":
        return None, None
    if kind == "odd_offset":
        return rand((cols + 1,), dtype, "cpu"), lambda t: t[1:]
    return rand((cols,), dtype, "cpu"), None


def _apply_views(fn, views):
    """fn over views[i](inputs[i]) (None: the input as it is)."""
    def wrapped(*inputs, backend, **kw):
        return fn(*[v(t) if v is not None and t is not None else t for v, t in zip(views, inputs)],
                  backend=backend, **kw)
    return wrapped


def _expect_path(fn, path, path_of):
    """fn, asserting on the emulated run that the kernel path is `path` (path_of(*op inputs))."""
    def wrapped(*inputs, backend, **kw):
        if backend == "emu":
            got = path_of(*inputs)
            assert got == path, f"the inputs take the {got} path, the case is meant for {path}"
        return fn(*inputs, backend=backend, **kw)
    return wrapped


# (dtype, rows, width, x layout, weight layout, bias layout, expected forward path)
LN_PATH_CASES = [
    (F16, 17, 768, "odd_offset", "plain", "plain", "scalar"),        # fast width, misaligned input
    (BF16, 6, 1024, "odd_offset", "plain", "plain", "scalar"),
    (F32, 2, 4096, "odd_offset", "plain", "plain", "scalar"),        # 512 threads, 8 passes a row
    (F16, 9, 768, "stride772", "plain", "plain", "scalar"),          # row stride 772 % 8 != 0
    (F32, 9, 768, "stride772", "plain", "plain", "fast"),            # 772 % 4 == 0: fast, stride != cols
    (BF16, 5, 4096, "every_other_row", "plain", "plain", "fast"),    # 128-thread rows, strided
    (F16, 7, 1024, "contiguous", "odd_offset", "plain", "scalar"),   # misaligned weight
    (F32, 7, 1024, "contiguous", "plain", "odd_offset", "scalar"),   # misaligned bias (backward: fast)
    (F16, 17, 8, "contiguous", "plain", "plain", "vec"),             # one vector per row
    (F32, 17, 4, "contiguous", "none", "plain", "vec"),
    (F16, 3, 8192, "contiguous", "plain", "plain", "vec"),           # 256 threads a row, 4 passes
    (F32, 2, 8192, "contiguous", "plain", "none", "vec"),            # 512 threads a row
    (BF16, 1, 8192, "odd_offset", "plain", "plain", "scalar"),       # 512 threads, 16 passes
    (F32, 1, 65536, "contiguous", "plain", "none", "vec"),           # 512 threads, 32 passes
    (F16, 1, 768, "contiguous", "plain", "plain", "fast"),           # a single row (3 idle warps)
    (BF16, 1, 4096, "contiguous", "plain", "plain", "fast"),
    (F32, 1, 97, "contiguous", "plain", "plain", "scalar"),
    (F16, 1, 1000, "contiguous", "plain", "plain", "vec"),
]


def _ln_case_id(case):
    dtype, rows, width, xl, wl, bl, path = case
    return f"{path}-{width}-{str(dtype)[6:]}-R{rows}-x_{xl}-w_{wl}-b_{bl}"


@pytest.mark.parametrize("case", LN_PATH_CASES, ids=_ln_case_id)
def test_layer_norm_launch_paths(emu, case):
    """Every branch of the forward and backward launchers (fast / generic vectorised / scalar),
    chosen by width, alignment and row stride; the widest generic widths; a single row."""
    dtype, rows, width, xl, wl, bl, path = case
    x, xv = _layout(xl, rows, width, dtype, scale=2.0)
    w, wv = _vector(wl, width, dtype)
    b, bv = _vector(bl, width, dtype)
    fn = _expect_path(_layer_norm((width,)), path, lambda x, w, b: _ln_path(x, w, b))
    _compare(_apply_views(fn, [xv, wv, bv]), [x, w, b], [rand((rows, width), dtype, "cpu")],
             dtype, f"layer_norm {_ln_case_id(case)}")


def _reference_grads(ref_fn, inputs, dys, dtype):
    """[(outputs, input grads)] of ref_fn(*inputs) in fp64 and in `dtype` (compute_dtype): the two
    references of assert_close. ``dys`` holds one upstream gradient per output (None: none)."""
    return [run_with_grads(ref_fn, inputs, dys, torch.float64),
            run_with_grads(ref_fn, inputs, dys, None, compute_dtype=dtype)]


def _layer_norm_ref(n):
    return lambda x, w, b, **kw: reference.layer_norm(x, (n,), w, b, 1e-5, **kw)


# (dtype, width, expected path): one of each backward kernel
LN_BWD_WIDTHS = [(F16, 768, "fast"), (BF16, 97, "scalar"), (F32, 1000, "vec")]
# (weight present, need_weight_grad, need_bias_grad)
LN_BWD_FLAGS = [(True, True, True), (True, False, True), (True, True, False), (True, False, False),
                (False, True, True), (False, False, False)]


@pytest.mark.parametrize("width", LN_BWD_WIDTHS, ids=lambda c: f"{c[2]}-{c[1]}-{str(c[0])[6:]}")
@pytest.mark.parametrize("flags", LN_BWD_FLAGS, ids=lambda f: "w{}-dw{}-db{}".format(*map(int, f)))
def test_layer_norm_bwd_flags(emu, width, flags):
    """torch.ops.fastbert_emu.layer_norm_bwd called directly: weight absent, and each column sum
    (partial buffer + column_sum) requested or not; a gradient not asked for comes back empty."""
    dtype, n, path = width
    has_w, need_dw, need_db = flags
    rows = 23
    x = rand((rows, n), dtype, "cpu", scale=2.0) + 0.5
    w = rand((n,), dtype, "cpu") if has_w else None
    b = rand((n,), dtype, "cpu")  # the reference's bias: its gradient is what need_bias_grad asks for
    dy = rand((rows, n), dtype, "cpu")
    assert _ln_path(x, w) == path
    out, mean, rstd = emu.layer_norm_fwd(x, w, None, 1e-5)
    dx, dw, db = emu.layer_norm_bwd(dy, x, w, mean, rstd, need_dw, need_db)
    (_, want), (_, low) = _reference_grads(_layer_norm_ref(n), [x, w, b], [dy], dtype)
    name = f"layer_norm_bwd {n} {flags}"
    check_output(dx, want[0], low[0], name + " grad_x")
    if need_dw and has_w:
        check_output(dw, want[1], low[1], name + " grad_weight")
    else:
        assert dw.shape == (0,), f"{name}: grad_weight not asked for, got shape {tuple(dw.shape)}"
    if need_db:
        check_output(db, want[2], low[2], name + " grad_bias")
    else:
        assert db.shape == (0,), f"{name}: grad_bias not asked for, got shape {tuple(db.shape)}"


@pytest.mark.parametrize("width", LN_BWD_WIDTHS, ids=lambda c: f"{c[2]}-{c[1]}-{str(c[0])[6:]}")
@pytest.mark.parametrize("layout", ["every_other_row", "broadcast", "odd_offset"])
def test_layer_norm_bwd_grad_out_layouts(emu, width, layout):
    """Upstream gradients the binding passes on without a copy: a row stride other than cols, a row
    stride of 0 (one [cols] gradient broadcast over the rows) and a misaligned one (the scalar
    kernel, whatever the width)."""
    dtype, n, path = width
    rows = 19
    x = rand((rows, n), dtype, "cpu", scale=2.0)
    w, b = rand((n,), dtype, "cpu"), rand((n,), dtype, "cpu")
    if layout == "broadcast":
        dy = rand((n,), dtype, "cpu").expand(rows, n)
        assert dy.stride() == (0, 1)
    else:
        base, view = _layout(layout, rows, n, dtype)
        dy = view(base)
    assert dy.stride(1) == 1 and (layout != "odd_offset" or not _aligned(dy))
    out, mean, rstd = emu.layer_norm_fwd(x, w, b, 1e-5)
    dx, dw, db = emu.layer_norm_bwd(dy, x, w, mean, rstd, True, True)
    (_, want), (_, low) = _reference_grads(_layer_norm_ref(n), [x, w, b], [dy], dtype)
    for i, (got, label) in enumerate(((dx, "grad_x"), (dw, "grad_weight"), (db, "grad_bias"))):
        check_output(got, want[i], low[i], f"layer_norm_bwd {n} dy {layout} {label}")


# add + LayerNorm, each path with dropout, input bias, a returned sum and every gradient.
# (dtype, rows, width, x layout, residual layout, input_bias layout, expected forward path)
ADD_LN_PATH_CASES = [
    (F16, 5, 4096, "contiguous", "contiguous", "plain", "fast"),       # 128-thread rows
    (F32, 3, 4096, "contiguous", "contiguous", "plain", "fast"),
    (F16, 17, 1000, "contiguous", "contiguous", "plain", "vec"),        # 8-wide dropout groups
    (F32, 17, 1000, "contiguous", "contiguous", "plain", "vec"),        # 64-thread rows, 2 per block
    (BF16, 2, 8192, "contiguous", "contiguous", "plain", "vec"),
    (F16, 17, 8, "contiguous", "contiguous", "plain", "vec"),
    (F16, 11, 768, "contiguous", "stride772", "plain", "scalar"),       # residual stride % 8 != 0
    (F32, 11, 768, "contiguous", "stride772", "plain", "fast"),         # residual stride != cols
    (F16, 11, 768, "every_other_row", "contiguous", "plain", "fast"),   # input stride != cols
    (F16, 9, 1024, "odd_offset", "contiguous", "plain", "scalar"),
    (BF16, 9, 1024, "contiguous", "odd_offset", "plain", "scalar"),
    (BF16, 9, 768, "contiguous", "contiguous", "odd_offset", "scalar"),  # misaligned input bias
    (F16, 1, 768, "contiguous", "contiguous", "plain", "fast"),          # a single row
]


def _add_ln_case_id(case):
    dtype, rows, width, xl, rl, bl, path = case
    return f"{path}-{width}-{str(dtype)[6:]}-R{rows}-x_{xl}-r_{rl}-xb_{bl}"


@pytest.mark.parametrize("case", ADD_LN_PATH_CASES, ids=_add_ln_case_id)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_add_layer_norm_launch_paths(emu, case, dropout_p):
    dtype, rows, width, xl, rl, bl, path = case
    x, xv = _layout(xl, rows, width, dtype)
    r, rv = _layout(rl, rows, width, dtype)
    xb, xbv = _vector(bl, width, dtype)
    w, b = rand((width,), dtype, "cpu") * 0.5 + 1.0, rand((width,), dtype, "cpu")
    seed = int(torch.randint(1 << 30, ()))
    keep = emu.dropout_mask(_seed_of_next_draw(seed), [rows, width], dropout_p) if dropout_p > 0 else None
    fn = _expect_path(_add_layer_norm(dropout_p, True, keep, seed=seed), path,
                      lambda x, r, w, b, xb: _ln_path(x, w, b, xb, residual=r))
    dys = [rand((rows, width), dtype, "cpu"), rand((rows, width), dtype, "cpu")]
    _compare(_apply_views(fn, [xv, rv, None, None, xbv]), [x, r, w, b, xb], dys, dtype,
             f"add_layer_norm {_add_ln_case_id(case)} p={dropout_p}")


@pytest.mark.parametrize("width", [(F16, 768), (F32, 97), (BF16, 1000), (F16, 4096)],
                         ids=lambda c: f"{c[1]}-{str(c[0])[6:]}")
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_add_layer_norm_only_sum_gets_gradient(emu, width, dropout_p):
    """A pre-LN block that uses only the returned sum s: the normalised output gets no gradient
    (the glue passes a zero grad_out; dL/dx = dropout'(dL/ds), dL/dresidual = dL/ds, the weight
    and bias gradients are zero)."""
    dtype, n = width
    rows = 6 if n == 4096 else 13
    x, r = rand((rows, n), dtype, "cpu"), rand((rows, n), dtype, "cpu")
    w, b, xb = rand((n,), dtype, "cpu"), rand((n,), dtype, "cpu"), rand((n,), dtype, "cpu")
    seed = int(torch.randint(1 << 30, ()))
    keep = emu.dropout_mask(_seed_of_next_draw(seed), [rows, n], dropout_p) if dropout_p > 0 else None
    fn = _add_layer_norm(dropout_p, True, keep, seed=seed)

    def sum_only(x, r, w, b, xb, backend, **kw):
        out, s = fn(x, r, w, b, xb, backend, **kw)
        if backend == "ref":  # autograd leaves weight / bias without a gradient; the op returns zeros
            s = s + 0 * (w.sum() + b.sum()).to(s.dtype)
        return out, s

    _compare(sum_only, [x, r, w, b, xb], [None, rand((rows, n), dtype, "cpu")], dtype,
             f"add_layer_norm sum only {n}")


# (dtype, width, expected path) x (grad_sum given, need_weight_grad, need_bias_grad, need_input_bias_grad)
ADD_LN_BWD_FLAGS = [(True, True, True, True), (False, False, True, False), (True, False, False, True),
                    (False, False, False, False)]


@pytest.mark.parametrize("width", LN_BWD_WIDTHS, ids=lambda c: f"{c[2]}-{c[1]}-{str(c[0])[6:]}")
@pytest.mark.parametrize("flags", ADD_LN_BWD_FLAGS, ids=lambda f: "gs{}-dw{}-db{}-dxb{}".format(*map(int, f)))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_add_layer_norm_bwd_flags(emu, width, flags, dropout_p):
    """torch.ops.fastbert_emu.add_layer_norm_bwd called directly with each set of requested
    gradients, with and without dL/ds; without dropout grad_input comes back empty (the glue
    reuses grad_residual)."""
    dtype, n, path = width
    has_gs, need_dw, need_db, need_dxb = flags
    rows = 21
    x, r = rand((rows, n), dtype, "cpu"), rand((rows, n), dtype, "cpu")
    w, b, xb = rand((n,), dtype, "cpu"), rand((n,), dtype, "cpu"), rand((n,), dtype, "cpu")
    dy = rand((rows, n), dtype, "cpu")
    ds = rand((rows, n), dtype, "cpu") if has_gs else None
    assert _ln_path(x, w, b, xb, residual=r) == path
    out, s, mean, rstd, seed = emu.add_layer_norm_fwd(x, r, w, b, xb, 1e-5, dropout_p)
    keep = emu.dropout_mask(seed, [rows, n], dropout_p) if dropout_p > 0 else None
    grads = emu.add_layer_norm_bwd(dy, ds, s, w, mean, rstd, seed, dropout_p, need_dw, need_db, need_dxb)
    d_input, d_residual, dw, db, dxb = grads

    def ref(x, r, w, b, xb, **kw):
        return reference.add_layer_norm(x, r, w, b, 1e-5, input_bias=xb, dropout_p=dropout_p,
                                        return_residual=True, dropout_mask=keep, **kw)

    (want_out, want), (low_out, low) = _reference_grads(ref, [x, r, w, b, xb], [dy, ds], dtype)
    name = f"add_layer_norm_bwd {n} {flags} p={dropout_p}"
    check_output(out, want_out[0], low_out[0], name + " out")
    check_output(s, want_out[1], low_out[1], name + " sum")
    check_output(d_residual, want[1], low[1], name + " grad_residual")
    if dropout_p > 0:
        check_output(d_input, want[0], low[0], name + " grad_input")
    else:
        assert d_input.shape == (0,), f"{name}: grad_input without dropout must be empty"
        check_output(d_residual, want[0], low[0], name + " grad_input (= grad_residual)")
    for got, need, i, label in ((dw, need_dw, 2, "grad_weight"), (db, need_db, 3, "grad_bias"),
                                (dxb, need_dxb, 4, "grad_input_bias")):
        if need:
            check_output(got, want[i], low[i], f"{name} {label}")
        else:
            assert got.shape == (0,), f"{name}: {label} not asked for, got shape {tuple(got.shape)}"


@pytest.mark.parametrize("width", LN_BWD_WIDTHS, ids=lambda c: f"{c[2]}-{c[1]}-{str(c[0])[6:]}")
@pytest.mark.parametrize("layout", ["every_other_row", "broadcast"])
def test_add_layer_norm_bwd_grad_out_layouts_with_dropout(emu, width, layout):
    """Upstream gradients passed on without a copy (a row stride other than cols, or 0) under
    dropout: the backward regenerates each element's dropout decision from its position in the
    [rows, cols] sum (row * cols + col), not from its position in the gradient's memory."""
    dtype, n, path = width
    rows, p = 19, 0.3
    x, r = rand((rows, n), dtype, "cpu"), rand((rows, n), dtype, "cpu")
    w, b, xb = rand((n,), dtype, "cpu"), rand((n,), dtype, "cpu"), rand((n,), dtype, "cpu")
    if layout == "broadcast":
        dy = rand((n,), dtype, "cpu").expand(rows, n)
    else:
        base, view = _layout(layout, rows, n, dtype)
        dy = view(base)
    assert dy.stride(0) != n
    out, s, mean, rstd, seed = emu.add_layer_norm_fwd(x, r, w, b, xb, 1e-5, p)
    keep = emu.dropout_mask(seed, [rows, n], p)
    d_input, d_residual, dw, db, dxb = emu.add_layer_norm_bwd(dy, None, s, w, mean, rstd, seed, p,
                                                              True, True, True)

    def ref(x, r, w, b, xb, **kw):
        return reference.add_layer_norm(x, r, w, b, 1e-5, input_bias=xb, dropout_p=p,
                                        dropout_mask=keep, **kw)

    (_, want), (_, low) = _reference_grads(ref, [x, r, w, b, xb], [dy], dtype)
    for i, (got, label) in enumerate(((d_input, "grad_input"), (d_residual, "grad_residual"),
                                      (dw, "grad_weight"), (db, "grad_bias"), (dxb, "grad_input_bias"))):
        check_output(got, want[i], low[i], f"add_layer_norm_bwd {n} dy {layout} p={p} {label}")


# Row slots: more rows than the backward has slots, so a slot accumulates several rows (registers in
# the fast kernel, read-modify-write of its partial row in the generic one) and column_sum reduces
# 1000+ slots per column (with compensated sums: a plain fp32 running sum over thousands of slots
# exceeded "2x PyTorch's error + 1e-5" for fp32 outputs). (dtype, rows, width, op, expected path).
LN_MANY_ROWS = [
    (F16, 1100, 768, "add", "fast"),     # 1056 slots
    (BF16, 2200, 40, "add", "vec"),      # 2112 slots
    (F32, 2200, 40, "add", "vec"),       # 2112 slots
    (F32, 1100, 768, "plain", "fast"),   # 1056 slots
]


@pytest.mark.parametrize("case", LN_MANY_ROWS, ids=lambda c: f"{c[4]}-{c[3]}-{c[2]}-{str(c[0])[6:]}-R{c[1]}")
def test_layer_norm_rows_beyond_slots(emu, case):
    dtype, rows, n, op, path = case
    x = rand((rows, n), dtype, "cpu", scale=2.0) + 0.5
    w, b = rand((n,), dtype, "cpu") * 0.5 + 1.0, rand((n,), dtype, "cpu")
    assert _ln_path(x, w, b) == path
    slots = _ln_bwd_slots(path, dtype, rows, n)
    assert 16 < slots < rows, (slots, rows)
    dy = rand((rows, n), dtype, "cpu")
    if op == "plain":
        _compare(_layer_norm((n,)), [x, w, b], [dy], dtype, f"layer_norm {rows} rows")
        return
    seed = int(torch.randint(1 << 30, ()))
    keep = emu.dropout_mask(_seed_of_next_draw(seed), [rows, n], 0.2)
    _compare(_add_layer_norm(0.2, True, keep, seed=seed),
             [x, rand((rows, n), dtype, "cpu"), w, b, rand((n,), dtype, "cpu")],
             [dy, rand((rows, n), dtype, "cpu")], dtype, f"add_layer_norm {rows} rows")


# ----------------------------------------------------------------------------------------------
# bias + GELU (csrc/gelu)
# ----------------------------------------------------------------------------------------------
def _bias_gelu(approximate):
    def fn(x, b, backend, **kw):
        if backend == "emu":
            if b is None:
                return gelu_ops._gelu_cuda(x, approximate)
            return gelu_ops._bias_gelu_cuda(x, b, approximate)
        return reference.bias_gelu(x, b, approximate, **kw)
    return fn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 7, 97, 768, 3072])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu(emu, width, dtype, approximate, with_bias):
    rows = 4 if width >= 3072 else 17
    x = rand((rows, width), dtype, "cpu", scale=2.0)
    b = rand((width,), dtype, "cpu") if with_bias else None
    _compare(_bias_gelu(approximate), [x, b], [rand((rows, width), dtype, "cpu")], dtype,
             f"bias_gelu {width} {approximate}")


def test_bias_gelu_views_and_shapes(emu):
    x = rand((3, 5, 200), F16, "cpu")[..., 1:98]  # (3, 5, 97) with a row stride of 200
    _compare(_bias_gelu("tanh"), [x, rand((97,), F16, "cpu")], [rand((3, 5, 97), F16, "cpu")],
             F16, "bias_gelu view")
    _compare(_bias_gelu("none"), [rand((), F32, "cpu"), None], [rand((), F32, "cpu")], F32,
             "gelu 0-d")


def test_tanh_gelu_derivative_is_accurate_where_tanh_saturates(emu):
    """fp32 tanh-form GELU and its derivative over z in [-12, 12], against fp64 through sigmoids
    (1 + tanh u = 2 sigmoid(2u): no cancellation in the reference either). Formed from t = tanh(u),
    1 - t^2 near z = 5 lost its digits: the derivative (~1 there) was 11 ulps off, more than
    twice PyTorch's own fp32 error, which a fuzz draw caught."""
    z = torch.linspace(-12, 12, 24001, dtype=F32).requires_grad_()
    y = gelu_ops._gelu_cuda(z, "tanh")
    (dz,) = torch.autograd.grad(y, z, torch.ones_like(y))
    zd = z.detach().double()
    s = torch.sigmoid(2 * 0.7978845608028654 * (zd + 0.044715 * zd ** 3))  # (1 + tanh u) / 2
    value = zd * s
    slope = s + zd * 2 * s * (1 - s) * 0.7978845608028654 * (1 + 3 * 0.044715 * zd ** 2)
    assert (y.detach().double() - value).abs().max() <= 4e-7  # half an ulp at |gelu| <= 12
    assert (dz.double() - slope).abs().max() <= 3e-7  # 2.5 ulps at the derivative's 1.13


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_extreme_fp32_values_match_the_float64_reference(emu, approximate):
    """Inputs up to the float32 limit and infinities: value and derivative equal the float64
    reference's, NaN exactly where it has one (an infinite input's derivative). The tanh form's
    derivative was NaN for finite |z| > 1.9e19 (0 * inf from z^2 in its vanishing term)."""
    big = [1e4, -1e4, 2e4, 1e19, 2e19, 1e20, -1e20, 1e30, 3e38, -3e38, float("inf"), float("-inf")]
    z = torch.tensor(big + rand((20,), F32, "cpu", scale=8.0).tolist(), dtype=F32).requires_grad_()
    y = gelu_ops._gelu_cuda(z, approximate)
    (dz,) = torch.autograd.grad(y, z, torch.ones_like(y))
    zr = z.detach().double().requires_grad_()
    ref = reference.gelu(zr, approximate)
    (dr,) = torch.autograd.grad(ref, zr, torch.ones_like(ref))
    for name, o, r in (("value", y.detach(), ref.detach()), ("derivative", dz, dr)):
        assert torch.equal(o.isnan(), r.isnan()), (name, o, r)
        ok = ~r.isnan()
        assert_close(o[ok], r[ok].float(), None, atol=1e-6, name=name)


def _gelu_path(x, b):
    """Whether csrc/gelu/gelu.cu runs its kernels with 128-bit vectors ("vec") or one element at a
    time ("scalar"): vectorizable() wants cols % VEC == 0 and aligned x / bias (the binding passes a
    contiguous view as it is; the outputs and partial sums are fresh, aligned allocations)."""
    ok = x.shape[-1] % _VEC[x.dtype] == 0 and _aligned(x) and _aligned(b)
    return "vec" if ok else "scalar"


def _gelu_bwd_slots(path, dtype, rows, cols):
    """bias_gelu_bwd_slots: row slots of the bias-gradient kernel."""
    vecs = cols // (_VEC[dtype] if path == "vec" else 1)
    tpr = 32
    while tpr < 256 and tpr < vecs:
        tpr *= 2
    rpb = 256 // tpr
    return max(1, min(_SMS * 4, -(-rows // rpb), max(1, (4 << 20) // (cols * rpb)))) * rpb


def _gelu_flat_passes(path, dtype, numel):
    """Grid-stride passes of bias_gelu_flat_kernel: its grid is capped at 8 blocks of 256 per SM."""
    n_vec = numel // (_VEC[dtype] if path == "vec" else 1)
    blocks = max(1, min(-(-n_vec // 256), _SMS * 8))
    return -(-n_vec // (blocks * 256))


# (dtype, shape, x layout, bias: "plain" / "odd_offset" / "none", approximate, expected path, what it covers)
GELU_CASES = [
    (F16, (8, 1024), "odd_offset", "plain", "tanh", "scalar", "misaligned input"),
    (F32, (9, 768), "contiguous", "odd_offset", "none", "scalar", "misaligned bias"),
    (F16, (3, 5, 12), "contiguous", "plain", "none", "scalar", "3-D, width % 8 != 0"),
    (F32, (3, 5, 12), "contiguous", "plain", "tanh", "vec", "3-D, 3 vectors a row"),
    (BF16, (768,), "contiguous", "plain", "none", "vec", "1-D: one row"),
    (F16, (50, 100, 7), "contiguous", "plain", "tanh", "scalar", "5000 rows > 4224 slots"),
    (BF16, (40, 125, 8), "contiguous", "plain", "none", "vec", "5000 rows > 4224 slots"),
    (F16, (11, 100, 768), "contiguous", "plain", "tanh", "vec", "1100 rows > 1056 slots"),
    (F32, (50, 100, 8), "contiguous", "plain", "none", "vec", "5000 rows > 4224 slots"),
    (F16, (2817, 97), "contiguous", "none", "tanh", "scalar", "2 grid-stride passes"),
    (F32, (1060, 1024), "contiguous", "none", "none", "vec", "2 grid-stride passes"),
]


@pytest.mark.parametrize("case", GELU_CASES, ids=lambda c: "{}-{}-{}-x_{}-b_{}-{}".format(
    c[5], "x".join(map(str, c[1])), str(c[0])[6:], c[2], c[3], c[4]))
def test_bias_gelu_launch_paths(emu, case):
    """Scalar and vectorised kernels, the bias gradient with more rows than row slots (a slot sums
    several rows; column_sum reduces thousands of slots), and the flat kernels' grid-stride loop."""
    dtype, shape, xl, bl, approximate, path, what = case
    cols, numel = shape[-1], math.prod(shape)
    rows = numel // cols
    if xl == "odd_offset":
        x, xv = rand((numel + 1,), dtype, "cpu", scale=2.0), lambda t: t[1:].view(shape)
    else:
        x, xv = rand(shape, dtype, "cpu", scale=2.0), None
    b, bv = _vector(bl, cols, dtype)
    if "slots" in what:
        assert 16 < _gelu_bwd_slots(path, dtype, rows, cols) < rows
    if "grid-stride" in what:
        assert _gelu_flat_passes(path, dtype, numel) == 2
    fn = _expect_path(_bias_gelu(approximate), path, _gelu_path)
    _compare(_apply_views(fn, [xv, bv]), [x, b], [rand(shape, dtype, "cpu")], dtype,
             f"bias_gelu {case}")


@pytest.mark.parametrize("case", [(F32, (1060, 1024), "tanh", "vec"), (F16, (2817, 97), "none", "scalar"),
                                  (BF16, (5, 3, 40), "tanh", "vec")],
                         ids=lambda c: "{}-{}-{}-{}".format(c[3], "x".join(map(str, c[1])), str(c[0])[6:],
                                                            c[2]))
def test_bias_gelu_bwd_without_bias_grad(emu, case):
    """A bias that needs no gradient: the backward runs the flat kernel with the bias (its column
    from the linear index; two grid-stride passes for the large cases), no slots, no column sum;
    grad_bias comes back empty."""
    dtype, shape, approximate, path = case
    x, dy = rand(shape, dtype, "cpu", scale=2.0), rand(shape, dtype, "cpu")
    b = rand((shape[-1],), dtype, "cpu")
    assert _gelu_path(x, b) == path
    dx, db = emu.bias_gelu_bwd(dy, x, b, approximate, False)
    assert db.shape == (0,)
    (_, want), (_, low) = _reference_grads(lambda x, **kw: reference.bias_gelu(x, b, approximate, **kw),
                                           [x], [dy], dtype)
    check_output(dx, want[0], low[0], f"bias_gelu_bwd {shape} {approximate} grad_input")


# ----------------------------------------------------------------------------------------------
# GEGLU (csrc/gelu): gelu(a) * g, packed (..., 2N) or with a gate
# ----------------------------------------------------------------------------------------------
def _geglu(approximate):
    def fn(x, gate, backend, **kw):
        if backend == "emu":
            return gelu_ops._geglu_cuda(x, gate, approximate)
        return reference.geglu(x, gate, approximate, **kw)
    return fn


def _geglu_path(x, gate):
    """geglu_vectorizable(): cols and every row stride multiples of VEC, operands 16-byte aligned
    (the binding passes views whose last dim is contiguous as they are; outputs are fresh)."""
    vec = _VEC[x.dtype]
    if gate is None:
        n = x.shape[-1] // 2
        mats = [x.reshape(-1, 2 * n)[:, :n], x.reshape(-1, 2 * n)[:, n:]]
    else:
        n = x.shape[-1]
        mats = [t.reshape(-1, n) for t in (x, gate)]
    mats = [m if m.stride(1) == 1 else m.contiguous() for m in mats]
    ok = n % vec == 0 and all(m.stride(0) % vec == 0 and _aligned(m) for m in mats)
    return "vec" if ok else "scalar"


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "gate"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 97, 768, 1152])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_geglu(emu, width, dtype, approximate, packed):
    rows = 4 if width >= 768 else 17
    x = rand((rows, 2 * width if packed else width), dtype, "cpu", scale=2.0)
    gate = None if packed else rand((rows, width), dtype, "cpu")
    _compare(_geglu(approximate), [x, gate], [rand((rows, width), dtype, "cpu")], dtype,
             f"geglu {width} {approximate} {'packed' if packed else 'gate'}")


# (dtype, shape of the GELU half, layout, expected path, what it covers)
GEGLU_CASES = [
    (F16, (3, 5, 96), "packed", "vec", "3-D packed, row stride 192"),
    (F16, (3, 5, 100), "packed", "scalar", "cols % 8 != 0"),
    (F32, (9, 100), "packed_odd_offset", "scalar", "misaligned input"),
    (BF16, (4, 64), "halves", "vec", "the two halves of one matrix as input and gate"),
    (F16, (2, 3, 40), "transposed_gate", "vec", "a gate whose rows do not merge: copied"),
    (F32, (2, 3, 40), "strided_cols", "vec", "column stride 2: copied, then vectorised"),
    (F16, (2817, 97), "gate", "scalar", "2 grid-stride passes"),
    (F16, (4, 64), "wide_gate", "vec", "a gate with its own row stride (2N, the input's N)"),
    (F32, (5, 64), "wide_gate", "vec", "a gate with its own row stride (2N, the input's N)"),
    (F16, (4, 64), "odd_stride_gate", "scalar", "a gate row stride of N + 1: not vectorisable"),
]


def _geglu_inputs(dtype, shape, layout):
    n = shape[-1]
    if layout.startswith("packed"):
        if layout == "packed_odd_offset":
            base = rand((math.prod(shape) * 2 + 1,), dtype, "cpu", scale=2.0)
            return base, None, lambda t: t[1:].view(*shape[:-1], 2 * n)
        return rand((*shape[:-1], 2 * n), dtype, "cpu", scale=2.0), None, None
    if layout == "halves":
        return rand((*shape[:-1], 2 * n), dtype, "cpu", scale=2.0), None, lambda t: t[..., :n]
    if layout == "transposed_gate":
        return (rand(shape, dtype, "cpu", scale=2.0), rand((shape[1], shape[0], n), dtype, "cpu"),
                None)
    if layout == "strided_cols":
        return rand(shape, dtype, "cpu", scale=2.0, noncontiguous=True), rand(shape, dtype, "cpu"), None
    if layout in ("wide_gate", "odd_stride_gate"):  # the gate: the first N columns of wider rows
        width = 2 * n if layout == "wide_gate" else n + 1
        return rand(shape, dtype, "cpu", scale=2.0), rand((*shape[:-1], width), dtype, "cpu"), None
    return rand(shape, dtype, "cpu", scale=2.0), rand(shape, dtype, "cpu"), None


@pytest.mark.parametrize("case", GEGLU_CASES, ids=lambda c: "{}-{}-{}-{}".format(
    c[3], "x".join(map(str, c[1])), str(c[0])[6:], c[2]))
def test_geglu_launch_paths(emu, case):
    """Vectorised and scalar kernels, views read in place or copied by the binding, the
    grid-stride loop; packed gradients land in one (..., 2N) tensor."""
    dtype, shape, layout, path, what = case
    x, gate, view = _geglu_inputs(dtype, shape, layout)
    views = [view, None]
    if layout == "halves":  # input: the first half of a (.., 2N) matrix; gate: its second half
        gate, views = x.detach().clone(), [view, lambda t: t[..., shape[-1]:]]
    elif layout == "transposed_gate":
        views = [None, lambda t: t.transpose(0, 1)]
    elif layout in ("wide_gate", "odd_stride_gate"):
        views = [None, lambda t: t[..., :shape[-1]]]
    if "grid-stride" in what:
        assert _gelu_flat_passes(path, dtype, math.prod(shape)) == 2
    fn = _expect_path(_geglu("tanh"), path, _geglu_path)
    _compare(_apply_views(fn, views), [x, gate], [rand(shape, dtype, "cpu")], dtype, f"geglu {case}")


def test_geglu_opcheck_and_bad_calls(emu):
    """The schemas against the fake implementations and the autograd registration (packed and
    with a gate); the binding's own checks."""
    x = rand((5, 3, 48), F16, "cpu", requires_grad=True)
    g = rand((5, 3, 24), F16, "cpu", requires_grad=True)
    for args in ((x, None, "tanh"), (x[..., :24], g, "none")):
        torch.library.opcheck(emu.geglu_fwd, args)
        out = emu.geglu_fwd(*args)
        torch.library.opcheck(emu.geglu_bwd, (torch.ones_like(out), *[a.detach() if a is not None
                                                                     else None for a in args[:2]], args[2]),
                              test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="even last dim"):
        emu.geglu_fwd(x[..., :47], None, "none")
    with pytest.raises(RuntimeError, match="gate must have shape"):
        emu.geglu_fwd(x, g, "none")
    with pytest.raises(RuntimeError, match="gate has dtype"):
        emu.geglu_fwd(g, g.float(), "none")
    with pytest.raises(RuntimeError, match="approximate must be 'none' or 'tanh'"):
        emu.geglu_fwd(x, None, "erf")


def test_geglu_zero_dim_and_empty(emu):
    _compare(_geglu("none"), [rand((), F32, "cpu"), rand((), F32, "cpu")], [rand((), F32, "cpu")],
             F32, "geglu 0-d")
    x = torch.zeros((0, 6), requires_grad=True)
    out = gelu_ops._geglu_cuda(x, None, "none")
    assert out.shape == (0, 3)
    out.sum().backward()
    assert x.grad.shape == (0, 6)


# ----------------------------------------------------------------------------------------------
# Attention (csrc/attention): the unfused path (GEMMs around the softmax kernels) with gradients,
# and the fused tensor-core forward for inference
# ----------------------------------------------------------------------------------------------
def _mask(kind, b, h, lq, lk, dtype):
    """A mask of `kind`; the bool ones leave whole rows (and a whole batch entry) without keys."""
    if kind == "none":
        return None
    if kind == "key_padding":  # (B, 1, 1, Lk); the last batch entry sees no key when B > 1
        lengths = torch.randint(1, lk + 1, (b,))
        if b > 1:
            lengths[-1] = 0
        return (torch.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]
    if kind == "bool":  # (B, H, Lq, Lk), every third query row fully masked
        m = torch.rand(b, h, lq, lk) < 0.7
        m[:, :, ::3] = False
        return m
    if kind == "float":  # (1, 1, Lq, Lk) additive, in the inputs' dtype (trainable: gets a gradient)
        return rand((1, 1, lq, lk), dtype, "cpu")
    if kind == "float32":  # (B, 1, Lq, Lk) additive fp32 with -inf entries
        m = rand((b, 1, lq, lk), F32, "cpu")
        m[..., ::2, 0] = float("-inf")
        return m
    raise ValueError(kind)


def _sdpa(dropout_p=0.0, is_causal=False, scale=None, keep=None, seed=0, enable_gqa=False,
          alibi_slopes=None, window_size=None):
    def fn(q, k, v, m, backend, **kw):
        if backend == "emu":
            torch.manual_seed(seed)
            return attention_ops._sdpa_cuda(q, k, v, m, dropout_p, is_causal, scale, enable_gqa,
                                            alibi_slopes, window_size)
        return reference.scaled_dot_product_attention(
            q, k, v, m, dropout_p, is_causal, scale, enable_gqa, alibi_slopes=alibi_slopes,
            window_size=window_size, dropout_mask=keep, **kw)
    return fn


def _qkv(b, h, lq, lk, d, dtype, hkv=None, dv=None):
    hkv = hkv or h
    return (rand((b, h, lq, d), dtype, "cpu"), rand((b, hkv, lk, d), dtype, "cpu"),
            rand((b, hkv, lk, dv or d), dtype, "cpu"))


ATTN_SHAPES = [(1, 1, 1, 1, 16), (2, 3, 17, 20, 40), (1, 2, 97, 130, 80), (2, 1, 130, 97, 96)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", ["none", "key_padding", "bool", "float", "float32"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention(emu, shape, dtype, mask, is_causal):
    b, h, lq, lk, d = shape
    if mask == "float32" and dtype == F32:
        pytest.skip("an fp32 mask with fp32 inputs is the 'float' case")
    q, k, v = _qkv(b, h, lq, lk, d, dtype)
    m = _mask(mask, b, h, lq, lk, dtype)
    _compare(_sdpa(is_causal=is_causal), [q, k, v, m], [rand((b, h, lq, d), dtype, "cpu")], dtype,
             f"attention {shape} {mask}")


def test_attention_backward_materialises_no_probability_gradient(emu):
    """The unfused attention returns its (B, H, Lq, Lk) probabilities for the backward; no loss
    uses them, and autograd must not zero-fill a gradient of that size on each backward (it did:
    marking them non-differentiable does not stop it). The other gradients are unchanged."""
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 17, 33, 40, F32))
    m = _mask("key_padding", 2, 2, 17, 33, F32)
    out = attention_ops._sdpa_cuda(q, k, v, m, 0.0, False, None, False, None, None)
    with zero_fills_by_autograd() as made:
        out.backward(rand(out.shape, F32, "cpu"))
    assert made == []
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout_p", [0.2, 0.6])
def test_attention_dropout(emu, dtype, dropout_p):
    b, h, lq, lk, d = 2, 2, 33, 40, 64
    q, k, v = _qkv(b, h, lq, lk, d, dtype)
    m = _mask("key_padding", b, h, lq, lk, dtype)
    seed = _user_seed()
    keep = emu.dropout_mask(_seed_of_next_draw(seed), [b, h, lq, lk], dropout_p)
    _compare(_sdpa(dropout_p=dropout_p, keep=keep, seed=seed), [q, k, v, m],
             [rand((b, h, lq, d), dtype, "cpu")], dtype, f"attention dropout {dropout_p}")


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_attention_dropout_uses_probs_as_stored(emu, dtype):
    """Under dropout the forward multiplies V by dropout(P) built from P as stored (rounded to the
    dtype), the matrix its backward regenerates from that stored P: the forward output and dV are
    exactly matmul(where(keep, P / (1 - p), 0), ...) on the P the forward returns. (Built from the
    unrounded fp32 P, a few elements round twice differently: within tolerance, but forward and
    backward then use different matrices.)"""
    b, h, lq, lk, d, p = 2, 2, 33, 40, 64, 0.3
    q, k, v = _qkv(b, h, lq, lk, d, dtype)
    out, probs, seed = emu.attention_fwd(q, k, v, None, p, False, d ** -0.5)
    keep = emu.dropout_mask(seed, [b, h, lq, lk], p)
    inv_keep = torch.tensor(1.0) / (1.0 - torch.tensor(p))  # fp32, as the kernels compute it
    dropped = torch.where(keep, probs.float() * inv_keep, 0.0).to(dtype)
    assert torch.equal(out, torch.matmul(dropped, v))
    dy = rand((b, h, lq, d), dtype, "cpu")
    _, _, dv, _ = emu.attention_bwd(dy, q, k, v, probs, seed, p, d ** -0.5)
    assert torch.equal(dv, torch.matmul(dropped.transpose(-2, -1), dy))


def test_attention_views_gqa_alibi_window(emu):
    """(B, L, H, D) tensors viewed as (B, H, L, D); grouped-query heads; ALiBi and a window."""
    b, lq, lk, h, d = 2, 19, 23, 4, 40
    q = rand((b, lq, h, d), F16, "cpu").transpose(1, 2)
    k = rand((b, lk, 2, d), F16, "cpu").transpose(1, 2)
    v = rand((b, lk, 2, d), F16, "cpu").transpose(1, 2)
    slopes = torch.rand(h) * 0.5
    fn = _sdpa(enable_gqa=True, alibi_slopes=slopes, window_size=(5, 2))
    _compare(fn, [q, k, v, None], [rand((b, h, lq, d), F16, "cpu")], F16, "attention gqa")


def test_attention_lq_and_dv_differ(emu):
    q, k, v = _qkv(1, 2, 5, 70, 32, F32, dv=24)
    _compare(_sdpa(scale=0.3), [q, k, v, None], [rand((1, 2, 5, 24), F32, "cpu")], F32,
             "attention dv != d")


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_fused_attention_float_mask_nan_and_inf(emu, dtype):
    """A float mask on the fused path: a NaN entry makes its row NaN (as torch), -inf entries
    exclude keys, a row of -inf is fully masked (0), finfo.min padding (HF "eager") as torch."""
    b, h, lq, lk, d = 2, 2, 9, 20, 64
    q, k, v = _qkv(b, h, lq, lk, d, dtype)
    m = rand((b, 1, lq, lk), F32, "cpu")
    m[1, ..., 15:] = torch.finfo(F32).min
    m[0, 0, 2, 7] = float("nan")
    m[1, 0, 3] = float("-inf")
    m[:, :, 5, ::3] = float("-inf")
    m[0, 0, 6, 1] = float("inf")  # its row NaN, as in torch
    m[1, 0, 7, 4] = 3e38          # all the weight on key 4
    assert emu.fused_attention_unsupported(q, k, v, m) == ""
    out = emu.fused_attention_fwd(q, k, v, m, False, d ** -0.5)
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), m.double())
    low = reference.scaled_dot_product_attention(q, k, v, m, compute_dtype=dtype)
    assert torch.equal(out.isnan(), ref.isnan()) and out[0, :, 2].isnan().all() and out[0, :, 6].isnan().all()
    assert (out[1, :, 3] == 0).all() and torch.equal(out[1, :, 7], v[1, :, 4])
    assert_close(out.nan_to_num(0.0), ref.nan_to_num(0.0), low.nan_to_num(0.0), name="float mask")


@pytest.mark.parametrize("path", ["unfused", "fused"])
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_attention_nan_propagates(emu, path, dtype):
    """A NaN input makes the rows it reaches NaN, as in torch's SDPA, and leaves the others exact:
    a row whose every live logit is NaN must not come out as a fully masked row (0)."""
    b, h, lq, lk, d = 1, 3, 9, 20, 64
    q, k, v = _qkv(b, h, lq, lk, d, dtype)
    q[0, 0, 3, 5] = float("nan")  # every logit of row 3 of head 0
    k[0, 1, 7, 0] = float("nan")  # one logit of every row of head 1
    m = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    m[0, 0, 4] = False            # a fully masked row stays 0
    m[0, 0, 3, 10:] = False       # row 3: NaN logits among masked keys
    if path == "fused":
        assert emu.fused_attention_unsupported(q, k, v, m) == ""
        out = emu.fused_attention_fwd(q, k, v, m, False, d ** -0.5)
    else:
        out = emu.attention_fwd(q, k, v, m, 0.0, False, d ** -0.5)[0]
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), m)
    low = reference.scaled_dot_product_attention(q, k, v, m, compute_dtype=dtype)
    assert ref[0, 0, 3].isnan().all() and ref[0, 1, :4].isnan().all() and not ref[0, 2].isnan().any()
    assert torch.equal(out.isnan(), ref.isnan()), f"NaN pattern differs: {out.isnan().nonzero().tolist()}"
    assert (out[0, 0, 4] == 0).all()
    assert_close(out.nan_to_num(0.0), ref.nan_to_num(0.0), low.nan_to_num(0.0), name=f"{path} non-NaN rows")


@pytest.mark.parametrize("dtype", [F16, F32])
def test_attention_float_mask_nan_and_large_negative(emu, dtype):
    """The unfused path reads a float mask as torch does: a NaN or +inf entry makes its row NaN, a
    row padded everywhere with finfo(float32).min averages its keys (it is not a masked row), -inf
    removes keys, a huge finite entry takes all the weight; the other rows stay exact."""
    b, h, lq, lk, d = 1, 2, 9, 20, 40
    q, k, v = _qkv(b, h, lq, lk, d, dtype)
    m = torch.zeros(b, h, lq, lk, dtype=dtype)
    m[0, 0, 2, 5] = float("nan")
    m[0, 1, 3] = torch.finfo(torch.float32).min if dtype == F32 else torch.finfo(dtype).min
    m[0, 1, 4] = float("-inf")
    m[0, 0, 6, ::2] = float("-inf")
    m[0, 1, 5, 3] = float("inf")
    m[0, 1, 6, 4] = 3e38 if dtype == F32 else 6e4
    out = emu.attention_fwd(q, k, v, m, 0.0, False, d ** -0.5)[0]
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), m.double())
    low = reference.scaled_dot_product_attention(q, k, v, m, compute_dtype=dtype)
    assert ref[0, 0, 2].isnan().all() and ref[0, 1, 5].isnan().all() and torch.equal(out.isnan(), ref.isnan())
    assert (out[0, 1, 4] == 0).all() and (out[0, 1, 3] != 0).any() and torch.equal(out[0, 1, 6], v[0, 1, 4])
    assert_close(out.nan_to_num(0.0), ref.nan_to_num(0.0), low.nan_to_num(0.0), name="rows without NaN")


FUSED_SHAPES = [(1, 2, 17, 20, 64), (2, 1, 70, 130, 64), (1, 1, 64, 512, 128), (1, 1, 5, 1, 128),
                (1, 1, 130, 64, 64)]


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("shape,mask", [
    (shape, mask) for shape in FUSED_SHAPES for mask in ["none", "key_padding", "bool", "float", "float32"]
    if not (mask.startswith("float") and shape[2] * shape[3] > 10000)],  # float masks: the small shapes
    ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else x)
@pytest.mark.parametrize("is_causal", [False, True])
def test_fused_attention(emu, shape, dtype, mask, is_causal):
    """Inference without dropout, fp16 / bf16, D 64 / 128, Lk <= 512, any mask (bool; float in the
    inputs' dtype, broadcast; fp32 with -inf entries): the fused tensor-core kernel serves it (WMMA
    emulated as whole 16x16x16 tiles, fp32 sums)."""
    b, h, lq, lk, d = shape
    q, k, v = _qkv(b, h, lq, lk, d, dtype)
    m = _mask(mask, b, h, lq, lk, dtype)
    assert emu.fused_attention_unsupported(q, k, v, m) == ""
    with torch.no_grad():
        out = attention_ops._sdpa_cuda(q, k, v, m, 0.0, is_causal, None, False, None, None)
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), m, is_causal=is_causal)
    low = reference.scaled_dot_product_attention(q, k, v, m, is_causal=is_causal, compute_dtype=dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, ref, low, name=f"fused attention {shape} {mask}")


def test_fused_attention_views(emu):
    """(B, L, H, D) views (strides multiples of 8 elements) run without a copy; an odd-offset view
    is copied by the binding first. Both must match."""
    b, l, h, d = 2, 40, 3, 64
    base = rand((b, l, h, d + 8), F16, "cpu")
    q = base[..., :d].transpose(1, 2)
    k = rand((b, l, h, d), F16, "cpu").transpose(1, 2)
    v = rand((b * l * h * d + 1,), F16, "cpu")[1:].view(b, l, h, d).transpose(1, 2)  # 2-byte offset
    with torch.no_grad():
        out = attention_ops._sdpa_cuda(q, k, v, None, 0.0, False, None, False, None, None)
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double())
    low = reference.scaled_dot_product_attention(q, k, v, compute_dtype=F16)
    assert_close(out, ref, low, name="fused attention views")


# (query lengths, key lengths) per sequence: awkward lengths, Lq != Lk, a sequence without
# queries, one without keys (its queries give 0), one of 512 keys
VARLEN_CASES = [([17, 1, 97], [17, 1, 97]), ([5, 130, 0, 64], [20, 64, 7, 3]), ([3, 9], [0, 40]),
                ([70], [512])]


def _packed(lens, h, d, dtype):
    cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32)
    return rand((int(cu[-1]), h, d), dtype, "cpu"), cu


@pytest.mark.parametrize("lens,dtype,d,is_causal", [
    (lens, dtype, d, causal) for i, lens in enumerate(VARLEN_CASES)
    for dtype, d, causal in ([(F16, 64, False), (BF16, 128, True)] if i % 2 == 0
                             else [(BF16, 64, True), (F16, 128, False)])],
    ids=lambda x: "q{}-k{}".format(*["_".join(map(str, y)) for y in x]) if isinstance(x, list)
    else str(x).replace("torch.", ""))
def test_fused_varlen_attention(emu, lens, dtype, d, is_causal):
    """Padding-free inference: the fused kernel over packed sequences, each block reading its
    sequence's lengths from cu_seqlens; every output row written (NaN-filled allocations)."""
    lq, lk = lens
    h = 3
    q, cu_q = _packed(lq, h, d, dtype)
    k, cu_k = _packed(lk, h, d, dtype)
    v = rand(k.shape, dtype, "cpu")
    args = (cu_q, cu_k, max(lq), max(lk))
    assert emu.fused_varlen_attention_unsupported(q, k, v, *args) == ""
    assert attention_ops._varlen_cuda_reasons(q=q, k=k, v=v, max_seqlen_q=max(lq),
                                              max_seqlen_k=max(lk), cu_seqlens_q=cu_q) == []
    with torch.no_grad():
        out = attention_ops._varlen_cuda(q, k, v, *args, 0.0, is_causal, None, None, None, None)
    ref = reference.varlen_attention(q.double(), k.double(), v.double(), *args, is_causal=is_causal)
    low = reference.varlen_attention(q, k, v, *args, is_causal=is_causal, compute_dtype=dtype)
    assert out.dtype == dtype and out.shape == q.shape and torch.isfinite(out).all()
    assert_close(out, ref, low, name=f"fused varlen attention {lens}")
    if 0 in lk:  # a sequence without keys: its queries give 0
        b = lk.index(0)
        assert (out[int(cu_q[b]):int(cu_q[b + 1])] == 0).all()


def test_fused_varlen_attention_views_and_scale(emu):
    """q, k, v as views of one packed (total, 3, H, D) projection (token stride 3HD) run without a
    copy; a view at an odd offset is copied first; an explicit scale."""
    lens, h, d = [33, 7, 64], 2, 64
    qkv, cu = _packed(lens, 3 * h, d, F16)
    q, k, v = qkv.view(-1, 3, h, d).unbind(1)
    k = rand((k.numel() + 1,), F16, "cpu")[1:].view(k.shape)  # 2-byte offset
    args = (cu, cu, max(lens), max(lens))
    with torch.no_grad():
        out = attention_ops._varlen_cuda(q, k, v, *args, 0.0, False, 0.2, None, None, None)
    ref = reference.varlen_attention(q.double(), k.double(), v.double(), *args, scale=0.2)
    low = reference.varlen_attention(q, k, v, *args, scale=0.2, compute_dtype=F16)
    assert_close(out, ref, low, name="fused varlen attention views")


def test_fused_varlen_attention_refusals(emu):
    """What the kernel cannot serve is refused with the reason, in Python (before dispatch) and
    in the binding."""
    q, cu = _packed([10, 20], 2, 64, F16)
    ok = dict(q=q, k=q, v=q, max_seqlen_q=20, max_seqlen_k=20, cu_seqlens_q=cu)
    r = attention_ops._varlen_cuda_reasons
    assert r(**ok) == []
    assert "inference" in r(**dict(ok, q=q.clone().requires_grad_()))[0]
    assert "dropout" in r(**ok, dropout_p=0.1)[0]
    assert "ALiBi" in r(**ok, window_size=(3, 3))[0]
    assert "float16" in r(**dict(ok, q=q.float(), k=q.float(), v=q.float()))[0]
    q40, _ = _packed([10, 20], 2, 40, F16)
    assert "D = 40" in r(**dict(ok, q=q40, k=q40, v=q40))[0]
    assert "grouped-query" in r(**dict(ok, k=q[:, :1], v=q[:, :1]))[0]
    assert "513" in r(**dict(ok, max_seqlen_k=513))[0]
    with pytest.raises(RuntimeError, match="key length"):
        emu.fused_varlen_attention_fwd(q, q, q, cu, cu, 20, 513, False, 0.125)
    with pytest.raises(RuntimeError, match="int32"):
        emu.fused_varlen_attention_fwd(q, q, q, cu.long(), cu, 20, 20, False, 0.125)


def test_varlen_cuda_reasons_heads_past_the_grid():
    """More heads than the kernel's grid dim takes (65535) is a reason (auto falls back), not an
    error from the binding; meta tensors: nothing is allocated."""
    q = torch.empty((10, 65536, 64), dtype=F16, device="meta")
    cu = torch.tensor([0, 10], dtype=torch.int32)
    reasons = attention_ops._varlen_cuda_reasons(q=q, k=q, v=q, max_seqlen_q=10, max_seqlen_k=10,
                                                 cu_seqlens_q=cu)
    assert any("65536 heads" in r for r in reasons)


def test_emulator_build_needs_ninja_and_says_so(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert "ninja" in cuda_emu.toolchain_missing()


def test_fused_varlen_attention_int64_offsets_one_head_and_understated_max(emu):
    """int64 cu_seqlens (the op accepts them) reach the kernel as int32; one head with a head
    stride that is not a multiple of 8 runs without a refusal (that stride is never used); a
    max_seqlen below a sequence's length (unchecked under torch.compile / graph capture) never
    overruns shared memory: that sequence's rows come back NaN, the others right."""
    lens, d = [40, 9], 64
    base, cu = _packed(lens, 3, d, F16)
    q = base[:, 1:2]  # (total, 1, D), head stride 3 * 64 ... as a view with stride(1) = 64
    q = q.as_strided(q.shape, (q.stride(0), 3, 1))  # a size-1 dim's stride: any value
    k, v = (rand(q.shape, F16, "cpu") for _ in range(2))
    args = (cu, cu, max(lens), max(lens))
    assert emu.fused_varlen_attention_unsupported(q, k, v, *args) == ""
    ref = reference.varlen_attention(q.double(), k.double(), v.double(), *args)
    low = reference.varlen_attention(q, k, v, *args, compute_dtype=F16)
    with torch.no_grad():
        out = attention_ops._varlen_cuda(q, k, v, cu.long(), cu.long(), *args[2:], 0.0, False,
                                         None, None, None, None)
        assert_close(out, ref, low, name="int64 offsets, one head")
        short = attention_ops._varlen_cuda(q, k, v, cu, cu, 16, 16, 0.0, False, None, None, None,
                                           None)
    assert torch.isnan(short[:16]).all()  # sequence 0 (40 tokens > 16): poisoned, in range
    assert_close(short[40:], ref[40:], low[40:], name="the sequence within max_seqlen")
    with torch.no_grad():  # only the queries' bound understated: that sequence is poisoned too
        short_q = attention_ops._varlen_cuda(q, k, v, cu, cu, 16, max(lens), 0.0, False, None, None,
                                             None, None)
    assert torch.isnan(short_q[:16]).all()
    assert_close(short_q[40:], ref[40:], low[40:], name="the sequence within max_seqlen_q")


# ----------------------------------------------------------------------------------------------
# Dropout mask (the rule every kernel family uses)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask(emu, p):
    seed = torch.tensor([123456789123])
    keep = emu.dropout_mask(seed, [997, 13], p)
    n = keep.numel()
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 4.5 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(keep, emu.dropout_mask(seed, [997, 13], p))
    assert not torch.equal(keep, emu.dropout_mask(seed + 1, [997, 13], p))


def _philox4x32_10(counter, key):
    """Philox-4x32-10 (Salmon et al., SC'11) on numpy uint64 arrays holding 32-bit words: counter
    (c0, c1, c2, c3), key (k0, k1) -> the four output words. An independent implementation of the
    generator behind every dropout mask (csrc/device_utils.cuh), checked against Random123's
    published known answers in test_philox_known_answers."""
    m32 = np.uint64(0xFFFFFFFF)
    c0, c1, c2, c3 = (np.asarray(w, dtype=np.uint64) for w in counter)
    k0, k1 = (np.asarray(w, dtype=np.uint64) for w in key)
    for _ in range(10):
        p0, p1 = c0 * np.uint64(0xD2511F53), c2 * np.uint64(0xCD9E8D57)  # exact: 32 x 32 -> 64 bits
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & m32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & m32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    return c0, c1, c2, c3


def _reference_keep(seed, numel, p):
    """The documented rule: element e is kept iff uniform(lane e % 4 of philox(seed, counter e / 4))
    >= p, with uniform(x) = (x >> 8) / 2^24 and p in fp32."""
    groups = np.arange((numel + 3) // 4, dtype=np.uint64)
    s = np.uint64(seed)
    m32 = np.uint64(0xFFFFFFFF)
    words = _philox4x32_10((groups & m32, groups >> np.uint64(32), 0, 0), (s & m32, s >> np.uint64(32)))
    x = np.stack(words, axis=1).reshape(-1)[:numel]
    u = (x >> np.uint64(8)).astype(np.float32) * np.float32(2.0 ** -24)
    return torch.from_numpy(u >= np.float32(p))


def test_philox_known_answers():
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, want in kat:
        assert tuple(int(w) for w in _philox4x32_10(counter, key)) == want


@pytest.mark.parametrize("shape", [[1], [2], [3], [5], [3, 5, 7], [1085347]],
                         ids=lambda s: "x".join(map(str, s)))
def test_dropout_mask_matches_reference_rule(emu, shape):
    """The exact keep-mask against an independent Philox: numel 1..3 (a single partial group of
    four), numel % 4 != 0, and 271337 groups (1001 more than the 1056 x 256 threads of the capped
    grid: the grid-stride loop runs twice, the second pass ends in a partial group)."""
    if math.prod(shape) > 1 << 20:
        assert (math.prod(shape) + 3) // 4 > _SMS * 8 * 256
    seed = torch.randint(torch.iinfo(torch.int64).max, (1,))  # fresh, both 32-bit key halves
    p = float(torch.empty(()).uniform_(0.05, 0.95))
    keep = emu.dropout_mask(seed, shape, p)
    assert keep.shape == tuple(shape) and keep.dtype == torch.bool
    want = _reference_keep(int(seed), math.prod(shape), p)
    mismatch = (keep.reshape(-1) != want).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.numel()} elements differ, first at {mismatch[0].item()}"


# ----------------------------------------------------------------------------------------------
# Out-of-bounds accesses: the kernels under AddressSanitizer (compute-sanitizer's memcheck on CPU)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["layer_norm", "add_layer_norm", "bias_gelu", "attention_lq0",
                                  "attention_lk0", "attention_b0"])
def test_empty_inputs(emu, case):
    """Zero rows, zero queries or zero keys: the launchers launch nothing, and every output and
    gradient is still written (empty, or zeros where a sum over nothing is asked for)."""
    if case == "layer_norm":
        fn, ins, dys = _layer_norm((768,)), [rand((0, 768), F16, "cpu"), rand((768,), F16, "cpu"),
                                            rand((768,), F16, "cpu")], [rand((0, 768), F16, "cpu")]
    elif case == "add_layer_norm":
        keep = torch.ones(0, 97, dtype=torch.bool)
        fn = _add_layer_norm(0.3, True, keep)
        ins = [rand((0, 97), F16, "cpu"), rand((0, 97), F16, "cpu"), rand((97,), F16, "cpu"),
               rand((97,), F16, "cpu"), rand((97,), F16, "cpu")]
        dys = [rand((0, 97), F16, "cpu"), rand((0, 97), F16, "cpu")]
    elif case == "bias_gelu":
        fn, ins, dys = _bias_gelu("tanh"), [rand((0, 768), F16, "cpu"), rand((768,), F16, "cpu")], \
            [rand((0, 768), F16, "cpu")]
    else:
        b, lq, lk = {"attention_lq0": (2, 0, 5), "attention_lk0": (2, 7, 0), "attention_b0": (0, 7, 5)}[case]
        q, k, v = _qkv(b, 2, lq, lk, 64, F16)
        fn, ins, dys = _sdpa(), [q, k, v, None], [rand((b, 2, lq, 64), F16, "cpu")]
    _compare(fn, ins, dys, F16, case)
    if case.startswith("attention"):  # inference: the fused kernel's refusal, then the unfused path
        with torch.no_grad():
            out = attention_ops._sdpa_cuda(*[t.detach() if t is not None else t for t in ins], 0.0, False,
                                           None, False, None, None)
        assert out.shape == dys[0].shape and (out == 0).all()


def _address_sanitizer_job():
    """This file's tests (forward order) in a child process, against a build instrumented with
    AddressSanitizer; a string says why it cannot run here."""
    if os.environ.get("FASTBERT_EMU_SANITIZE"):
        return "this is the instrumented run itself"
    missing = cuda_emu.toolchain_missing()
    if missing:
        return missing
    runtimes = [cuda_emu.asan_runtime()]
    if not runtimes[0]:
        return "the C++ compiler has no AddressSanitizer runtime"
    # libasan intercepts C++ throws; libstdc++ must be loaded before any library that throws.
    libstdcxx = subprocess.run(["c++", "-print-file-name=libstdc++.so"], capture_output=True, text=True).stdout.strip()
    if os.path.isabs(libstdcxx):
        runtimes.append(libstdcxx)
    job = _background.Job([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-k", "forward",
                           "-p", "no:cacheprovider"], {}, str(Path(__file__).resolve().parents[1]),
                          timeout_s=3000)
    job.env = dict(os.environ, FASTBERT_EMU_SANITIZE="address", LD_PRELOAD=" ".join(runtimes),
                   ASAN_OPTIONS=f"detect_leaks=0:halt_on_error=1:log_path={job.workdir / 'asan'}")
    return job


_background.register("address-sanitizer", _address_sanitizer_job)


@pytest.mark.background("address-sanitizer")
def test_kernels_under_address_sanitizer():
    """Runs this file's tests (forward order) in a child process against a build instrumented with
    AddressSanitizer: any read or write outside a tensor, or outside a block's shared memory,
    stops the child with a report, which fails this test and is printed. (The child starts in the
    background when collection ends: tests/_background.py.)"""
    done = _background.result("address-sanitizer")
    reports = [p.read_text() for p in done.job.workdir.glob("asan*")]
    errors = [r for r in reports if "ERROR: AddressSanitizer" in r]
    assert not errors, "AddressSanitizer found a bad access:\n" + errors[0][:6000]
    assert done.returncode == 0, f"instrumented run failed (exit {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    assert " passed" in done.stdout


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_add_layer_norm_mixed_dtypes_opcheck(emu, dropout_p):
    """The mixed-precision schema (a bf16 input with an fp32 residual; the backward's input_dtype)
    against its fake implementations and autograd registration: torch.library.opcheck."""
    x = rand((5, 64), BF16, "cpu", requires_grad=True)
    r = rand((5, 64), F32, "cpu", requires_grad=True)
    w, b = rand((64,), F32, "cpu", requires_grad=True), rand((64,), F32, "cpu")
    torch.library.opcheck(emu.add_layer_norm_fwd, (x, r, w, b, b, 1e-5, dropout_p),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    out, s, mean, rstd, seed = emu.add_layer_norm_fwd(x.detach(), r.detach(), w.detach(), b, b, 1e-5, dropout_p)
    assert out.dtype == s.dtype == F32
    grads = emu.add_layer_norm_bwd(torch.ones_like(out), None, s, w.detach(), mean, rstd, seed, dropout_p,
                                   True, True, True, BF16)
    assert grads[0].dtype == BF16 and grads[0].shape == x.shape and grads[1].dtype == F32
    torch.library.opcheck(emu.add_layer_norm_bwd,
                          (torch.ones_like(out), None, s, w.detach(), mean, rstd, seed, dropout_p,
                           True, True, True, BF16),
                          test_utils=("test_schema", "test_faketensor"))


def test_layer_norm_into_fp32_casts_first(emu):
    """layer_norm under CUDA autocast (out_dtype fp32): the CUDA kernels take one dtype, so a 16-bit
    input is cast first; the result equals the kernel run on the cast input."""
    x, w, b = rand((5, 96), BF16, "cpu"), rand((96,), F32, "cpu"), rand((96,), F32, "cpu")
    out = layer_norm_ops._layer_norm_cuda(x, (96,), w, b, 1e-5, out_dtype=F32)
    assert out.dtype == F32
    assert torch.equal(out, layer_norm_ops._layer_norm_cuda(x.float(), (96,), w, b, 1e-5))


def test_add_layer_norm_unsupported_dtype_pair_is_refused(emu):
    """The binding takes one dtype or a 16-bit input with an fp32 residual; the public op casts any
    other pair (an fp32 input with a bf16 residual here) to the promoted dtype first."""
    x, r = rand((3, 16), F32, "cpu"), rand((3, 16), BF16, "cpu")
    with pytest.raises(RuntimeError, match="16-bit one with a float32 residual"):
        emu.add_layer_norm_fwd(x, r, None, None, None, 1e-5, 0.0)
    out = layer_norm_ops._add_layer_norm_cuda(x, r, None, None, 1e-5, None, 0.0, False)
    assert out.dtype == F32
    torch.testing.assert_close(out, reference.add_layer_norm(x, r, None, None), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Layouts and corner cases that only the fuzz tests drew (helper 59's coverage audit)
# ----------------------------------------------------------------------------------------------
def _upstream(layout, shape, dtype):
    """An upstream gradient of `shape` that is not a plain contiguous tensor: "expanded" (one row
    broadcast with stride 0, what out.sum() or a broadcast hands back) or "permuted" (stored with
    its dims reversed)."""
    if layout == "expanded":
        return rand(shape[-1:], dtype, "cpu").expand(shape)
    return rand(tuple(reversed(shape)), dtype, "cpu").permute(*reversed(range(len(shape))))


def _upstream_case(op):
    """(fn, inputs, output shape, dtype) of one op whose backward takes the upstream gradient."""
    if op == "attention":  # with a trainable float mask: dmask from the same gradient
        b, h, lq, lk, d = 2, 2, 17, 20, 40
        return (_sdpa(is_causal=True), list(_qkv(b, h, lq, lk, d, F32)) + [_mask("float", b, h, lq, lk, F32)],
                (b, h, lq, d), F32)
    x, bias = rand((17, 97), F16, "cpu", scale=2.0), rand((97,), F16, "cpu")
    if op == "gelu":
        return _bias_gelu("none"), [x, None], (17, 97), F16
    if op == "bias_gelu":
        return _bias_gelu("tanh"), [x, bias], (17, 97), F16
    if op == "geglu_packed":
        return _geglu("tanh"), [rand((17, 194), F16, "cpu", scale=2.0), None], (17, 97), F16
    return _geglu("none"), [x, rand((17, 97), F16, "cpu")], (17, 97), F16


@pytest.mark.parametrize("layout", ["expanded", "permuted"])
@pytest.mark.parametrize("op", ["attention", "gelu", "bias_gelu", "geglu_packed", "geglu_gate"])
def test_backward_takes_any_upstream_gradient_layout(emu, op, layout):
    """The backward of attention, gelu, bias_gelu and geglu handed a stride-0 or a permuted
    upstream gradient (as autograd passes it on, without a copy): every gradient against fp64
    with that same gradient."""
    fn, inputs, shape, dtype = _upstream_case(op)
    dy = _upstream(layout, shape, dtype)
    assert not dy.is_contiguous()
    _compare(fn, inputs, [dy], dtype, f"{op} {layout} upstream gradient")


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_layer_norm_width_one(emu, dtype):
    """Rows of one element (normalised to 0: the output is the bias), with dropout, both results
    and every gradient."""
    rows, p = 17, 0.3
    x, r = rand((rows, 1), dtype, "cpu"), rand((rows, 1), dtype, "cpu")
    w, b, xb = (rand((1,), dtype, "cpu") for _ in range(3))
    seed = _user_seed()
    keep = emu.dropout_mask(_seed_of_next_draw(seed), [rows, 1], p)
    _compare(_add_layer_norm(p, True, keep, seed=seed), [x, r, w, b, xb],
             [rand((rows, 1), dtype, "cpu"), rand((rows, 1), dtype, "cpu")], dtype, "add_layer_norm width 1")


@pytest.mark.parametrize("dtype,d", [(F32, 40), (F16, 80)], ids=["fp32-D40", "fp16-D80"])
def test_attention_strided_qkv_with_grads(emu, dtype, d):
    """q, k, v with a last-dim stride of 2 (views of wider tensors) on the unfused path with
    gradients, a key-padding mask and causal."""
    b, h, lq, lk = 2, 2, 17, 33
    q, k, v = (rand((b, h, n, d), dtype, "cpu", noncontiguous=True) for n in (lq, lk, lk))
    assert q.stride(-1) == 2
    _compare(_sdpa(is_causal=True), [q, k, v, _mask("key_padding", b, h, lq, lk, dtype)],
             [rand((b, h, lq, d), dtype, "cpu")], dtype, "attention stride-2 q/k/v")


def _glue_view(view, shape, dtype):
    if view == "strided-cols":  # every other element of the last dim
        return rand(shape, dtype, "cpu", noncontiguous=True)
    return rand((shape[1], shape[0]) + tuple(shape[2:]), dtype, "cpu").transpose(0, 1)  # "transposed-batch"


GLUE_VIEW_CASES = [("layer_norm", "strided-cols", F16), ("layer_norm", "transposed-batch", F32),
                   ("layer_norm", "normalized-4x25", F16), ("add_layer_norm", "strided-cols", F32),
                   ("add_layer_norm", "transposed-batch", F16)]


@pytest.mark.parametrize("case", GLUE_VIEW_CASES,
                         ids=lambda c: "-".join([c[0], c[1], {F32: "fp32", F16: "fp16"}[c[2]]]))
def test_layer_norm_glue_views(emu, case):
    """The Python glue of backend="cuda" (the reshape to [rows, cols] the kernels take, and the view
    back) on inputs whose leading dims do not merge or whose columns are strided, and a
    normalized_shape of two dims with a strided weight; add_layer_norm with dropout on the
    transposed batch (the keep-mask indexes the rows in logical order)."""
    op, view, dtype = case
    if view == "normalized-4x25":
        x = rand((3, 4, 25), dtype, "cpu", noncontiguous=True)
        w, b = rand((4, 50), dtype, "cpu")[:, ::2], rand((4, 25), dtype, "cpu")
        _compare(_layer_norm((4, 25)), [x, w, b], [rand((3, 4, 25), dtype, "cpu")], dtype,
                 "layer_norm normalized_shape (4, 25)")
        return
    shape = (2, 9, 97)
    x = _glue_view(view, shape, dtype)
    assert not x.is_contiguous()
    w, b = rand((97,), dtype, "cpu"), rand((97,), dtype, "cpu")
    if op == "layer_norm":
        _compare(_layer_norm((97,)), [x, w, b], [rand(shape, dtype, "cpu")], dtype, f"layer_norm {view}")
        return
    p = 0.3 if view == "transposed-batch" else 0.0
    seed, keep = _user_seed(), None
    if p:
        keep = emu.dropout_mask(_seed_of_next_draw(seed), [18, 97], p).view(shape)
    _compare(_add_layer_norm(p, True, keep, seed=seed), [x, _glue_view(view, shape, dtype), w, b,
                                                         rand((97,), dtype, "cpu")],
             [rand(shape, dtype, "cpu"), rand(shape, dtype, "cpu")], dtype, f"add_layer_norm {view} p={p}")


@pytest.mark.parametrize("dtype,mask_dtype,p", [(F32, F32, 0.0), (F16, F32, 0.0), (F16, F16, 0.3)],
                         ids=["fp32", "fp16-fp32mask", "fp16-p0.3"])
def test_attention_trainable_mask_with_dead_rows(emu, dtype, mask_dtype, p):
    """A float mask that requires grad with a query row that is -inf in every batch entry and a
    batch entry that is -inf everywhere: 0 there, dq and dmask 0 there (dk, dv 0 for the dead
    entry), no NaN; every gradient against fp64 (with dropout on the exact keep-mask)."""
    b, h, lq, lk, d = 2, 2, 17, 20, 40
    q, k, v = _qkv(b, h, lq, lk, d, dtype)
    m = rand((b, 1, lq, lk), mask_dtype, "cpu")
    m[:, :, 3] = float("-inf")
    m[1] = float("-inf")
    seed, keep = _user_seed(), None
    if p:
        keep = emu.dropout_mask(_seed_of_next_draw(seed), [b, h, lq, lk], p)
    fn, dys = _sdpa(dropout_p=p, keep=keep, seed=seed), [rand((b, h, lq, d), dtype, "cpu")]
    _compare(fn, [q, k, v, m], dys, dtype, f"attention dead rows p={p}")
    (out,), (dq, dk, dv, dm) = run_with_grads(fn, [q, k, v, m], dys, None, backend="emu")
    assert dm.dtype == mask_dtype
    assert (out[:, :, 3] == 0).all() and (dq[:, :, 3] == 0).all() and (dm[:, :, 3] == 0).all()
    for t in (out, dq, dk, dv, dm):
        assert (t[1] == 0).all()
