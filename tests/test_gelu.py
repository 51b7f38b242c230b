"""fastbert.gelu and fastbert.bias_gelu, Triton backend, against fastbert.reference in float64 (and
torch.nn.functional.gelu in the input's precision, for the tolerance rule)."""
import re

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import reference
from fastbert.backends import BackendError, select
from fastbert.testing import (DEVICE, assert_close, compare_to_reference, interpreter_atol, leaf_like,
                              poison_cuda_cache, rand)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
WIDTHS = [1, 7, 97, 768, 1000, 1024, 1152, 4096]  # 1152: column blocks of 256, the last half masked
APPROX = ["none", "tanh"]


def _leaf(t, dtype=None):
    if t is None:
        return None
    t = t.detach()
    t = t.to(dtype) if dtype is not None else t.clone()
    return t.requires_grad_(True)


def _check_bias_gelu(x, bias, approximate, dy=None, public="bias_gelu"):
    """Triton op vs fp64 reference vs F.gelu in x's dtype, output and every gradient with the same
    upstream gradient. ``public="gelu"`` calls fastbert.gelu (bias must be None)."""
    dtype = x.dtype
    xs, bs = _leaf(x), _leaf(bias)
    if public == "gelu":
        out = fastbert.gelu(xs, approximate, backend="triton")
    else:
        out = fastbert.bias_gelu(xs, bs, approximate, backend="triton")
    assert out.shape == x.shape and out.dtype == dtype
    if dy is None:
        dy = torch.randn(x.shape, device=x.device).to(dtype)
    out.backward(dy)

    xr, br = _leaf(x, torch.float64), _leaf(bias, torch.float64)
    ref = reference.bias_gelu(xr, br, approximate)
    ref.backward(dy.double())

    xl, bl = _leaf(x), _leaf(bias)  # PyTorch's own low-precision computation
    low = F.gelu(xl if bl is None else xl + bl.to(dtype), approximate=approximate)
    low.backward(dy)

    pairs = [("out", out, ref, low), ("grad_input", xs.grad, xr.grad, xl.grad)]
    if bias is not None:
        pairs.append(("grad_bias", bs.grad, br.grad, bl.grad))
    for name, o, r, lo in pairs:
        assert o.dtype == lo.dtype, f"{name}: dtype {o.dtype}, expected {lo.dtype}"
        assert_close(o, r, lo, atol=interpreter_atol(o.dtype, r), name=name)
    return out, xs.grad, None if bs is None else bs.grad


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("width", WIDTHS, ids=lambda n: f"N{n}")
def test_bias_gelu(width, dtype, approximate):
    rows = 17 if width < 1024 else 3
    x = rand((rows, width), dtype, scale=3.0)
    b = rand((width,), dtype)
    _check_bias_gelu(x, b, approximate)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", [(), (1,), (97,), (2, 3, 130), (1, 1, 1025)],
                         ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_gelu(shape, approximate):
    x = rand(shape, torch.float16, scale=3.0) if shape else torch.randn((), device=DEVICE) * 3
    _check_bias_gelu(x, None, approximate, public="gelu")


def test_bias_gelu_without_bias():
    _check_bias_gelu(rand((17, 97), torch.float16, scale=3.0), None, "none")


@pytest.mark.parametrize("layout", ["strided-cols", "transposed-batch", "row-slice"])
def test_bias_gelu_noncontiguous(layout):
    if layout == "strided-cols":
        x = rand((2, 9, 97), torch.float16, scale=3.0, noncontiguous=True)
    elif layout == "transposed-batch":  # leading dims cannot merge: the launcher copies
        x = rand((9, 2, 97), torch.float16, scale=3.0).transpose(0, 1)
    else:
        x = rand((17, 130), torch.float16, scale=3.0)[:, 5:102]
    assert not x.is_contiguous()
    b = rand((194,), torch.float16)[::2]
    dy = rand(x.shape, torch.float16, noncontiguous=True)
    _check_bias_gelu(x, b, "tanh", dy=dy)


def test_gelu_transposed():
    """gelu on a transposed matrix: the last dim is strided, rows are contiguous."""
    x = rand((97, 33), torch.float32, scale=3.0).t()
    _check_bias_gelu(x, None, "none", public="gelu",
                     dy=torch.ones((), device=DEVICE).expand(33, 97))


@pytest.mark.parametrize("approximate", APPROX)
def test_bias_gelu_large_magnitude_fp16(approximate):
    """Saturated regions (|x| up to the fp16 limit): no overflow, no NaN, exact limits."""
    x = rand((17, 97), torch.float32, scale=300.0)
    x[0, :4] = torch.tensor([60000.0, -60000.0, 65504.0, -65504.0])
    x = x.to(torch.float16)
    b = rand((97,), torch.float16)
    b[:4] = 0.0
    out, dx, db = _check_bias_gelu(x, b, approximate, dy=torch.ones_like(x))
    assert torch.isfinite(out).all() and torch.isfinite(dx).all() and torch.isfinite(db).all()
    assert out[0, :4].tolist() == [60000.0, 0.0, 65504.0, 0.0]
    assert dx[0, :4].tolist() == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf * 0
def test_gelu_extreme_fp32_values_match_the_float64_reference(approximate):
    """fp32 inputs far beyond any activation (up to the float32 limit) and infinities: the value
    and the gradient equal the float64 reference's, NaN exactly where it has one (an infinite
    input's gradient). The tanh form's gradient was NaN for finite |x| > 1.9e19 (0 * inf: the
    polynomial of its vanishing second term overflowed), as F.gelu's is."""
    big = [1e4, -1e4, 2e4, 1e19, 2e19, 1e20, -1e20, 1e30, 3e38, -3e38, float("inf"), float("-inf")]
    x = torch.tensor(big + rand((20,), torch.float32, scale=8.0).tolist(), device=DEVICE)
    xs = x.clone().requires_grad_(True)
    out = fastbert.gelu(xs, approximate, backend="triton")
    out.backward(torch.ones_like(out))
    xr = x.double().requires_grad_(True)
    ref = reference.gelu(xr, approximate)
    ref.backward(torch.ones_like(ref))
    for name, o, r in (("out", out, ref), ("grad", xs.grad, xr.grad)):
        assert torch.equal(o.isnan(), r.isnan()), (name, o, r)
        ok = ~r.isnan()
        assert_close(o[ok], r[ok].float(), None, atol=1e-6, name=name)


def test_bias_gelu_fp32_bias_fp16_input():
    x = rand((17, 97), torch.float16, scale=3.0)
    b = rand((97,), torch.float32)
    _, _, db = _check_bias_gelu(x, b, "none")
    assert db.dtype == torch.float32


def test_bias_gelu_deterministic():
    """The bias gradient (a column sum over many rows) is bitwise reproducible: no atomics."""
    x = rand((131, 300), torch.float16, scale=3.0)
    b = rand((300,), torch.float16)
    dy = rand((131, 300), torch.float16)
    results = []
    for _ in range(2):
        xs, bs = _leaf(x), _leaf(b)
        out = fastbert.bias_gelu(xs, bs, backend="triton")
        out.backward(dy)
        results.append((out, xs.grad, bs.grad))
    for a, c in zip(*results):
        assert torch.equal(a, c)
    # and it is the column sum of the input's gradient
    torch.testing.assert_close(results[0][2].float(), results[0][1].float().sum(0),
                               atol=2e-2, rtol=2e-3)


def test_launch_grids_stay_within_cudas_limits(monkeypatch):
    """Every launch has one flat grid axis (up to 2^31 - 1 programs): a second axis of column
    blocks is limited to 65535, which a last dim beyond 65535 * 1024 elements (a flattened 128M
    tensor, GEGLU on (4, 2^28)) exceeded, an invalid launch on a GPU. The launchers run on meta
    tensors here, the kernels replaced by a recorder."""
    from fastbert.kernels import gelu as kern

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    for name in ("_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel", "_geglu_kernel"):
        monkeypatch.setattr(kern, name, Recorder())
    wide = torch.empty(2 ** 27, device="meta", dtype=torch.float16)
    bias = torch.empty(2 ** 27, device="meta", dtype=torch.float16)
    kern.bias_gelu_fwd(wide, bias)
    kern.bias_gelu_bwd(wide, wide, bias, need_dbias=True)
    kern.bias_gelu_bwd(wide, wide, None)
    packed = torch.empty(4, 2 ** 28, device="meta", dtype=torch.float16)
    kern.geglu_fwd(packed, None)
    kern.geglu_bwd(torch.empty(4, 2 ** 27, device="meta", dtype=torch.float16), packed, None)
    assert len(grids) == 5
    for grid in grids:
        assert len(grid) == 1 and 0 < grid[0] < 2 ** 31, grid


def test_bias_gelu_empty():
    x = torch.zeros((0, 97), device=DEVICE, requires_grad=True)
    b = torch.ones(97, device=DEVICE, requires_grad=True)
    out = fastbert.bias_gelu(x, b, backend="triton")
    assert out.shape == (0, 97)
    out.sum().backward()
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_gelu_dispatch():
    x = rand((4, 97))
    if DEVICE == "cpu":  # 'auto' never picks the interpreter: the torch reference serves CPU
        assert select("gelu", None, x.device, input=x, approximate="none").backend == "torch"
        assert select("bias_gelu", None, x.device, input=x, bias=None,
                      approximate="none").backend == "torch"
    with pytest.raises(BackendError, match="input is float64"):
        fastbert.gelu(x.double(), backend="triton")
    with pytest.raises(BackendError, match="bias is float64"):
        fastbert.bias_gelu(x, rand((97,), torch.float64), backend="triton")
    torch.testing.assert_close(fastbert.gelu(x.double()), F.gelu(x.double()))


def test_bias_gelu_compile():
    """torch.compile(fullgraph=True) through the custom ops, forward and backward."""
    x = rand((17, 97), requires_grad=True)
    b = rand((97,), requires_grad=True)
    fn = torch.compile(lambda x, b: fastbert.bias_gelu(x, b, "tanh", backend="triton"),
                       fullgraph=True)
    out = fn(x, b)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, b), dy)
    eager = fastbert.bias_gelu(x, b, "tanh", backend="triton")
    assert torch.equal(out, eager)
    for g, e in zip(grads, torch.autograd.grad(eager, (x, b), dy)):
        assert torch.equal(g, e)


@pytest.mark.cuda
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("shape", [(4099, 3072), (3, 513, 4096), (17, 65536)],
                         ids=lambda s: "x".join(map(str, s)))
def test_bias_gelu_cuda(shape, dtype, approximate):
    x = rand(shape, dtype, scale=3.0)
    _check_bias_gelu(x, rand((shape[-1],), dtype), approximate)


# ----------------------------------------------------------------------------------------------
# backend="cuda" (csrc/gelu, extension fastbert._C): GPU only, against the fp64 reference with the
# reference in the input's dtype setting the bound. C++ allocations bypass conftest's NaN
# poisoning, so the CUDA cache's free blocks are filled with NaN first.
# ----------------------------------------------------------------------------------------------
def _cuda_check(x, bias, approximate, dy, public="bias_gelu"):
    """Output and every gradient of the CUDA op vs the fp64 reference (same dy); the reference
    computed in x's dtype sets the bound."""
    poison_cuda_cache()

    def fn(xl, bl, backend, **kw):
        if backend == "cuda":
            return (fastbert.gelu(xl, approximate, backend="cuda") if public == "gelu"
                    else fastbert.bias_gelu(xl, bl, approximate, backend="cuda"))
        return reference.bias_gelu(xl, bl, approximate, **kw)

    compare_to_reference(fn, [x, bias], [dy], x.dtype, public, backend="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("shape", [(1,), (67, 1), (67, 7), (5, 13, 97), (129, 768), (67, 1000), (33, 3072),
                                   (17, 4096), (9, 8192)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_cuda_bias_gelu(shape, dtype, approximate, with_bias):
    x = rand(shape, dtype, "cuda", scale=3.0)
    bias = rand((shape[-1],), dtype, "cuda") if with_bias else None
    _cuda_check(x, bias, approximate, rand(shape, dtype, "cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("shape", [(), (1,), (1001,), (4, 17, 96)], ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("approximate", APPROX)
def test_cuda_gelu(shape, dtype, strided, approximate):
    if strided and not shape:
        pytest.skip("a 0-d tensor has no strided view")
    x = rand(shape, dtype, "cuda", scale=3.0, noncontiguous=strided) if shape else rand((), dtype, "cuda")
    _cuda_check(x, None, approximate, rand(shape, dtype, "cuda"), public="gelu")


@pytest.mark.cuda
def test_cuda_bias_gelu_transposed_input():
    x = rand((768, 129), torch.bfloat16, "cuda").t()  # (129, 768) with a column-major layout
    _cuda_check(x, rand((768,), torch.bfloat16, "cuda"), "tanh", rand((129, 768), torch.bfloat16, "cuda"))


@pytest.mark.cuda
def test_cuda_bias_gelu_deterministic():
    x, b, dy = rand((4099, 768), torch.float16, "cuda"), rand((768,), torch.float16, "cuda"), rand((4099, 768), torch.float16, "cuda")
    grads = []
    for _ in range(2):
        bl = leaf_like(b)
        fastbert.bias_gelu(x, bl, backend="cuda").backward(dy)
        grads.append(bl.grad)
    assert torch.equal(*grads)


@pytest.mark.cuda
def test_cuda_gelu_opcheck_and_compile():
    from fastbert.ops.gelu import _cuda_ops

    x = rand((33, 1000), torch.float16, "cuda", requires_grad=True)
    b = rand((1000,), torch.float16, "cuda", requires_grad=True)
    for bias in (b, None):
        torch.library.opcheck(_cuda_ops().bias_gelu_fwd, (x, bias, "tanh"))
    f = lambda x, b: fastbert.bias_gelu(x, b, backend="cuda") + fastbert.gelu(x, "tanh", backend="cuda")  # noqa: E731
    eager = f(x, b)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, b), eager, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# fastbert.geglu: gelu(a) * g, packed (one (..., 2N) input) or with a separate gate.
# ----------------------------------------------------------------------------------------------
def _check_geglu(x, gate, approximate, dy=None, backend="triton"):
    """The op vs the fp64 reference vs the reference computed in x's dtype (its error sets the
    bound), output and every gradient with the same upstream gradient."""
    dtype = x.dtype
    runs = []
    for cast, kw in ((None, {}), (torch.float64, {}), (None, {"compute_dtype": dtype})):
        xs, gs = _leaf(x, cast), _leaf(gate, cast)
        if kw or cast is not None:
            out = reference.geglu(xs, gs, approximate, **kw)
        else:
            out = fastbert.geglu(xs, gs, approximate, backend=backend)
        if dy is None:
            dy = torch.randn(out.shape, device=x.device).to(dtype)
        out.backward(dy.to(out.dtype))
        runs.append((out, xs.grad, None if gs is None else gs.grad))
    (out, dx, dg), (r_out, r_dx, r_dg), (l_out, l_dx, l_dg) = runs
    assert out.shape == (x.shape if gate is not None else (*x.shape[:-1], x.shape[-1] // 2))
    assert dx.shape == x.shape
    pairs = [("out", out, r_out, l_out), ("grad_input", dx, r_dx, l_dx)]
    if gate is not None:
        pairs.append(("grad_gate", dg, r_dg, l_dg))
    for name, o, r, lo in pairs:
        assert o.dtype == dtype, f"{name}: dtype {o.dtype}, expected {dtype}"
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        assert_close(o, r, lo, atol=interpreter_atol(dtype, r), name=name)
    return out, dx, dg


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "gate"])
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("width", [1, 97, 1000, 1152, 4096], ids=lambda n: f"N{n}")
def test_geglu(width, dtype, approximate, packed):
    rows = 17 if width < 1024 else 3
    if packed:
        x, gate = rand((rows, 2 * width), dtype, scale=3.0), None
    else:
        x, gate = rand((rows, width), dtype, scale=3.0), rand((rows, width), dtype)
    _check_geglu(x, gate, approximate)


@pytest.mark.parametrize("layout", ["strided-cols", "transposed-batch", "linear-output-halves"])
def test_geglu_noncontiguous(layout):
    if layout == "strided-cols":  # packed input and upstream gradient with a column stride of 2
        x, gate = rand((2, 9, 194), torch.float16, scale=3.0, noncontiguous=True), None
    elif layout == "transposed-batch":  # leading dims that do not merge: the launcher copies
        x = rand((9, 2, 97), torch.float16, scale=3.0).transpose(0, 1)
        gate = rand((9, 2, 97), torch.float16).transpose(0, 1)
    else:  # the halves of one matmul output passed as two views (row stride 2N)
        x, gate = rand((2, 5, 194), torch.float16, scale=3.0).chunk(2, dim=-1)
    assert not x.is_contiguous()
    n = x.shape[-1] // 2 if gate is None else x.shape[-1]
    _check_geglu(x, gate, "tanh", dy=rand((*x.shape[:-1], n), torch.float16, noncontiguous=True))


@pytest.mark.parametrize("approximate", APPROX)
def test_geglu_large_magnitude_fp16(approximate):
    """Saturated GELU (|a| up to the fp16 limit): no overflow and no NaN; exact limits."""
    a = rand((17, 97), torch.float32, scale=300.0)
    a[0, :4] = torch.tensor([60000.0, -60000.0, 65504.0, -65504.0])
    g = rand((17, 97), torch.float32)
    g[0, :4] = 1.0
    x = torch.cat([a, g], dim=-1).to(torch.float16)
    out, dx, _ = _check_geglu(x, None, approximate, dy=torch.ones((17, 97), dtype=torch.float16))
    assert out[0, :4].tolist() == [60000.0, 0.0, 65504.0, 0.0]
    assert dx[0, :4].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert dx[0, 97:101].tolist() == [60000.0, 0.0, 65504.0, 0.0]


def test_geglu_shapes_and_grad_of_one_input():
    """0-d and empty tensors; only the gate requiring grad; the packed form equals the gated one."""
    a, g = torch.randn((), device=DEVICE), torch.randn((), device=DEVICE)
    _check_geglu(a, g, "none")
    empty = torch.zeros((0, 6), device=DEVICE, requires_grad=True)
    out = fastbert.geglu(empty, backend="triton")
    assert out.shape == (0, 3)
    out.sum().backward()
    assert empty.grad.shape == (0, 6)
    x = rand((7, 2, 130))
    gate = x[..., 65:].clone().requires_grad_(True)
    out = fastbert.geglu(x[..., :65], gate, backend="triton")
    assert torch.equal(out, fastbert.geglu(x, backend="triton"))
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(gate.grad, F.gelu(x[..., :65]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_geglu_packed_odd_width_is_refused(backend):
    """A packed input (gate=None) with an odd last dim cannot be split into two halves: the
    documented ValueError naming the input and its shape, before any backend is chosen (not an
    error from inside a kernel or torch.chunk), and a gated call of the same width is served."""
    x = rand((3, 2 * int(torch.randint(1, 50, ())) + 1))
    with pytest.raises(ValueError, match=r"input must have an even last dim when gate is None.*"
                                         + re.escape(str(tuple(x.shape)))):
        fastbert.geglu(x, backend=backend)
    out = fastbert.geglu(x, x.clone(), backend=backend)
    assert out.shape == x.shape


def test_geglu_dispatch_and_compile():
    x = rand((4, 98))
    if DEVICE == "cpu":  # 'auto' never picks the interpreter: the torch reference serves CPU
        assert select("geglu", None, x.device, input=x, gate=None, approximate="none").backend == "torch"
    with pytest.raises(BackendError, match="input is float64"):
        fastbert.geglu(x.double(), backend="triton")
    a, g = x.double().chunk(2, dim=-1)
    torch.testing.assert_close(fastbert.geglu(x.double()), F.gelu(a) * g)
    # torch.compile(fullgraph=True) through the custom ops, forward and backward
    x = rand((17, 98), requires_grad=True)
    fn = torch.compile(lambda x: fastbert.geglu(x, approximate="tanh", backend="triton"), fullgraph=True)
    out = fn(x)
    dy = torch.randn_like(out)
    eager = fastbert.geglu(x, approximate="tanh", backend="triton")
    assert torch.equal(out, eager)
    assert torch.equal(torch.autograd.grad(out, x, dy)[0], torch.autograd.grad(eager, x, dy)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("shape", [(4099, 2 * 1152), (3, 513, 2 * 4096), (17, 2 * 65536)],
                         ids=lambda s: "x".join(map(str, s)))
def test_geglu_triton_gpu(shape, dtype, approximate):
    _check_geglu(rand(shape, dtype, scale=3.0), None, approximate)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("shape", [(1,), (67, 7), (5, 13, 97), (129, 1152), (33, 4096), (9, 8192)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("form", ["packed", "gate", "halves"])
def test_cuda_geglu(shape, dtype, approximate, form):
    """backend="cuda": packed (..., 2N) input, a separate gate, or the two halves of one matrix."""
    poison_cuda_cache()
    n = shape[-1]
    if form == "packed":
        inputs = [rand((*shape[:-1], 2 * n), dtype, "cuda", scale=3.0), None]
    elif form == "gate":
        inputs = [rand(shape, dtype, "cuda", scale=3.0), rand(shape, dtype, "cuda")]
    else:
        inputs = list(rand((*shape[:-1], 2 * n), dtype, "cuda", scale=3.0).chunk(2, dim=-1))

    def fn(x, gate, backend, **kw):
        if backend == "cuda":
            return fastbert.geglu(x, gate, approximate, backend="cuda")
        return reference.geglu(x, gate, approximate, **kw)

    compare_to_reference(fn, inputs, [rand(shape, dtype, "cuda")], dtype, f"geglu {form}", backend="cuda")


@pytest.mark.cuda
def test_cuda_geglu_opcheck_and_compile():
    from fastbert.ops.gelu import _cuda_ops

    x = rand((33, 2 * 1152), torch.bfloat16, "cuda", requires_grad=True)
    torch.library.opcheck(_cuda_ops().geglu_fwd, (x, None, "tanh"))
    torch.library.opcheck(_cuda_ops().geglu_fwd, (x[:, :1152], x[:, 1152:], "none"))
    f = lambda x: fastbert.geglu(x, backend="cuda")  # noqa: E731
    eager = f(x)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), eager, rtol=0, atol=0)


@pytest.mark.parametrize("width", [1, 7, 97, 128, 768, 1000, 1024, 1152, 2624, 3072, 4096, 4097, 8192])
def test_tile_choice_pads_little(width):
    """The elementwise kernels' tile: a power-of-two column block (128 to 1024; smaller only for a
    narrower row) whose padding of the row is at most 1/8 of it where such a block exists, and
    BLOCK_M x BLOCK_N within the tile budget."""
    gelu = pytest.importorskip("fastbert.kernels.gelu")
    bm, bn = gelu._config(width)
    assert bn & (bn - 1) == 0 and bm >= 1 and bm * bn <= max(gelu.TILE_ELEMS, bn)
    assert bn <= gelu.MAX_BLOCK_N and (bn >= 128 or bn >= width)
    padded = -(-width // bn) * bn
    if width >= 128:  # each of these has such a block
        assert 8 * (padded - width) <= width, (width, bn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT.get)
def test_bias_gelu_grad_of_the_bias_alone(dtype):
    """Only the bias requires grad (a frozen input): the op runs and the bias gradient (a column
    sum of dy * gelu'(x + b)) is right, with the same upstream gradient for all three runs."""
    x, b = rand((17, 97), dtype, scale=3.0), rand((97,), dtype)
    dy = rand(x.shape, dtype)
    runs = []
    for cast in (None, torch.float64, "low"):
        bs = _leaf(b, None if cast == "low" else cast)
        xs = x.double() if cast is torch.float64 else x
        if cast is None:
            out = fastbert.bias_gelu(xs, bs, "none", backend="triton")
        elif cast == "low":
            out = F.gelu(xs + bs, approximate="none")
        else:
            out = reference.bias_gelu(xs, bs, "none")
        assert out.requires_grad
        out.backward(dy.to(out.dtype))
        runs.append((out, bs.grad))
    (out, db), (r_out, r_db), (l_out, l_db) = runs
    assert db.dtype == dtype and db.shape == b.shape
    assert_close(out, r_out, l_out, name="out")
    assert_close(db, r_db, l_db, name="grad_bias")
