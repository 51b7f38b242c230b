"""fastbert.layer_norm and fastbert.add_layer_norm, Triton backend, against fastbert.reference in
float64 (and torch.nn.functional in the input's precision, for the tolerance rule).

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py), so CPU shapes stay
small; the wide rows (8192 one-pass, 65536 looped) run in the ``cuda`` tests. The looped kernels
are also checked on CPU by shrinking the one-pass limit (``MAX_FUSED_N``) for a test.
"""
import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import reference
from fastbert.backends import BackendError, select
from fastbert.kernels import layer_norm as kln
from fastbert.testing import (DEVICE, assert_close, assert_fresh_replays, compare_to_reference,
                              cuda_graph_replays, forbid_int64_host_reads, interpreter_atol, leaf_like,
                              poison_cuda_cache, rand)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
WIDTHS = [1, 7, 97, 768, 1000, 1024, 4096]
# (rows, width) on CPU: every width, 1 and 17 rows among them, fewer rows where the interpreter is
# slow (it runs each program's block ops in numpy, one program after another)
SHAPES = [(1, 1), (17, 1), (17, 7), (1, 97), (17, 97), (17, 768), (1, 1000), (17, 1000), (5, 1024),
          (3, 4096)]


def _leaf(t, dtype=None):
    if t is None:
        return None
    t = t.detach()
    t = t.to(dtype) if dtype is not None else t.clone()
    return t.requires_grad_(True)


def _grads(ts):
    return [None if t is None else t.grad for t in ts]


def _check(name, outs, refs, lows):
    for i, (o, r, lo) in enumerate(zip(outs, refs, lows)):
        if r is None:
            assert o is None, f"{name}[{i}]: expected no gradient"
            continue
        assert o is not None, f"{name}[{i}]: missing"
        assert o.dtype == lo.dtype, f"{name}[{i}]: dtype {o.dtype}, expected {lo.dtype}"
        assert_close(o, r, lo, atol=interpreter_atol(o.dtype, r), name=f"{name}[{i}]")


# ----------------------------------------------------------------------------------------------
# layer_norm
# ----------------------------------------------------------------------------------------------
def _check_layer_norm(x, normalized_shape, weight, bias, eps=1e-5, dy=None, lowp=None):
    """Runs the Triton op, the fp64 reference and F.layer_norm in x's dtype (or ``lowp``) with the
    same upstream gradient, and compares the output and every gradient."""
    dtype = x.dtype
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    ins = [x, weight, bias]
    ours = [_leaf(t) for t in ins]
    out = fastbert.layer_norm(ours[0], normalized_shape, ours[1], ours[2], eps, backend="triton")
    assert out.dtype == dtype and out.shape == x.shape
    if dy is None:
        dy = torch.randn(x.shape, device=x.device).to(dtype)
    out.backward(dy)

    refs = [_leaf(t, torch.float64) for t in ins]
    ref = reference.layer_norm(refs[0], normalized_shape, refs[1], refs[2], eps)
    ref.backward(dy.double())

    lows = [_leaf(t) for t in ins]  # PyTorch's own low-precision computation
    if lowp is None:
        w_, b_ = (None if t is None else t.to(dtype) for t in lows[1:])
        low = F.layer_norm(lows[0], normalized_shape, w_, b_, eps)
    else:
        low = lowp(*lows)
    low.backward(dy)
    _check("out", [out], [ref], [low])
    _check("grad", _grads(ours), _grads(refs), _grads(lows))
    return out, _grads(ours)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("rows, width", SHAPES, ids=[f"M{m}-N{n}" for m, n in SHAPES])
def test_layer_norm(rows, width, dtype):
    x = rand((rows, width), dtype, scale=2.0) + 0.5
    w = rand((width,), dtype) * 0.5 + 1.0
    b = rand((width,), dtype)
    _check_layer_norm(x, (width,), w, b)


@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_layer_norm_without_weight_or_bias(affine):
    x = rand((3, 5, 97), torch.float16, scale=3.0)
    w = rand((97,), torch.float16) if affine == "weight" else None
    b = rand((97,), torch.float16) if affine == "bias" else None
    _check_layer_norm(x, 97, w, b)


@pytest.mark.parametrize("layout", ["strided-cols", "transposed-batch", "row-slice"])
def test_layer_norm_noncontiguous(layout):
    if layout == "strided-cols":  # every other element: row and column strides, no copy
        x = rand((2, 9, 97), torch.float16, noncontiguous=True)
    elif layout == "transposed-batch":  # leading dims cannot merge: the launcher copies
        x = rand((9, 2, 97), torch.float16).transpose(0, 1)
    else:  # rows with a gap between them
        x = rand((17, 130), torch.float16)[:, 5:102]
    assert not x.is_contiguous()
    w = rand((194,), torch.float16)[::2]  # strided parameters too
    b = rand((97,), torch.float16)
    dy = rand(x.shape, torch.float16, noncontiguous=True)  # strided upstream gradient
    _check_layer_norm(x, 97, w, b, dy=dy)


def test_layer_norm_expanded_grad():
    """out.sum().backward() hands the kernel a stride-0 gradient."""
    x = rand((17, 97), torch.float32)
    w, b = rand((97,)), rand((97,))
    _check_layer_norm(x, 97, w, b, dy=torch.ones((), device=DEVICE).expand(17, 97))


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_layer_norm_multidim_normalized_shape(contiguous):
    x = rand((3, 4, 25), torch.float16) if contiguous else rand((3, 4, 25), torch.float16,
                                                                noncontiguous=True)
    w = rand((4, 25), torch.float16)
    b = rand((4, 25), torch.float16)
    _check_layer_norm(x, (4, 25), w, b)


def test_layer_norm_large_magnitude_fp16():
    """Rows of magnitude ~1e3 with a small spread: the statistics must be fp32 and two-pass."""
    x = (rand((17, 768), torch.float32, scale=30.0) + 1000.0).to(torch.float16)
    w = rand((768,), torch.float16) * 0.5 + 1.0
    b = rand((768,), torch.float16)
    dy = rand((17, 768), torch.float16, scale=30.0)  # so the gradients are well above the floor
    _check_layer_norm(x, 768, w, b, dy=dy)


@pytest.mark.parametrize("looped", [False, True], ids=["one-pass", "looped"])
@pytest.mark.parametrize("offset", [100.0, 1000.0])
def test_layer_norm_fp32_near_a_large_common_offset(monkeypatch, offset, looped):
    """fp32 rows of values near a large offset (std 1): the outputs must not subtract a mean
    rounded to fp32 (ulp(1000) / 2 = 3e-5 of error, up to 1.9x the allowed 2x torch's on a row;
    the corrected mean gives < 0.03x). One-pass and looped kernels."""
    width = 768
    if looped:
        monkeypatch.setattr(kln, "MAX_FUSED_N", 128)
        monkeypatch.setattr(kln, "LOOPED_BLOCK_N", 128)
        monkeypatch.setattr(kln, "COLS_BLOCK_N", 128)
    for _ in range(8):  # output, one row at a time: its error against torch's on that row
        x, w, b = rand((1, width)) + offset, rand((width,)), rand((width,))
        out = fastbert.layer_norm(x, (width,), w, b, backend="triton")
        # a quarter of the usual bound: here the kernel is 30x more accurate than torch, which
        # subtracts its rounded mean (the old kernel's error was 0.5-2x torch's on a row)
        assert_close(out, reference.layer_norm(x.double(), (width,), w.double(), b.double()),
                     F.layer_norm(x, (width,), w, b), factor=0.5, name=f"row near {offset:g}")
    # gradients (and output) over rows: the backward, like torch's, takes x - mean with the mean
    # as stored in fp32, so on one row it is as likely as torch to be the less accurate one
    _check_layer_norm(rand((17, width)) + offset, width, rand((width,)), rand((width,)))


def test_layer_norm_fp32_params_fp16_input():
    """Parameters may keep their own dtype; their gradients come back in it."""
    x = rand((17, 97), torch.float16)
    w = rand((97,), torch.float32)
    b = rand((97,), torch.float32)

    def lowp(x_, w_, b_):  # fp32 math, fp16 output: what F.layer_norm does inside
        return reference.layer_norm(x_, 97, w_, b_, 1e-5)

    _, (_, dw, db) = _check_layer_norm(x, 97, w, b, lowp=lowp)
    assert dw.dtype == torch.float32 and db.dtype == torch.float32


@pytest.mark.parametrize("width", [300, 1000], ids=lambda n: f"N{n}")
def test_layer_norm_looped(monkeypatch, width):
    """The looped (wide-row) kernels, forced on CPU with a small one-pass limit and chunk."""
    monkeypatch.setattr(kln, "MAX_FUSED_N", 128)
    monkeypatch.setattr(kln, "LOOPED_BLOCK_N", 128)
    monkeypatch.setattr(kln, "COLS_BLOCK_N", 128)
    x = rand((5, width), torch.float16, scale=2.0) + 1.0
    w = rand((width,), torch.float16)
    b = rand((width,), torch.float16)
    _check_layer_norm(x, width, w, b)


def test_layer_norm_deterministic():
    """Two runs give identical bits, the weight / bias gradients included (no atomics)."""
    x = rand((67, 768), torch.float16)
    w, b = rand((768,), torch.float16), rand((768,), torch.float16)
    dy = rand((67, 768), torch.float16)
    results = []
    for _ in range(2):
        xs, ws, bs = _leaf(x), _leaf(w), _leaf(b)
        out = fastbert.layer_norm(xs, 768, ws, bs, backend="triton")
        out.backward(dy)
        results.append([out, xs.grad, ws.grad, bs.grad])
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


def test_layer_norm_empty_rows():
    x = torch.zeros((0, 97), device=DEVICE, requires_grad=True)
    w = torch.ones(97, device=DEVICE, requires_grad=True)
    out = fastbert.layer_norm(x, 97, w, None, backend="triton")
    assert out.shape == (0, 97)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_layer_norm_dispatch():
    x = rand((4, 97))
    # CPU tensors: 'auto' never picks the interpreter, the torch reference serves the call
    if DEVICE == "cpu":
        assert select("layer_norm", None, x.device, input=x, normalized_shape=(97,), weight=None,
                      bias=None, eps=1e-5).backend == "torch"
    with pytest.raises(BackendError, match="float64"):
        fastbert.layer_norm(x.double(), 97, backend="triton")
    with pytest.raises(BackendError, match="weight is float64"):
        fastbert.layer_norm(x, 97, rand((97,), torch.float64), backend="triton")
    # and the auto fallback for float64 still gives the right answer
    torch.testing.assert_close(fastbert.layer_norm(x.double(), 97), F.layer_norm(x.double(), (97,)))


def test_layer_norm_compile():
    """torch.compile(fullgraph=True) through the custom ops, forward and backward."""
    x = rand((17, 97), torch.float32, requires_grad=True)
    w, b = rand((97,), requires_grad=True), rand((97,), requires_grad=True)
    fn = torch.compile(lambda x, w, b: fastbert.layer_norm(x, (97,), w, b, backend="triton"),
                       fullgraph=True)
    out = fn(x, w, b)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w, b), dy)
    eager = fastbert.layer_norm(x, (97,), w, b, backend="triton")
    eager_grads = torch.autograd.grad(eager, (x, w, b), dy)
    assert torch.equal(out, eager)
    for g, e in zip(grads, eager_grads):
        assert torch.equal(g, e)


# ----------------------------------------------------------------------------------------------
# add_layer_norm
# ----------------------------------------------------------------------------------------------
def _torch_add_layer_norm(x, r, w, b, eps, xb, p, mask, return_residual):
    """The unfused composition in x's dtype, the LayerNorm in that of the sum (x's, or promoted by
    a residual of another dtype): PyTorch's own low-precision computation."""
    dt = x.dtype
    h = x if xb is None else x + xb.to(dt)
    if mask is not None:
        h = h * mask.to(dt) / (1.0 - p)
    s = h + r
    out = F.layer_norm(s, (x.shape[-1],), None if w is None else w.to(s.dtype),
                       None if b is None else b.to(s.dtype), eps)
    return (out, s) if return_residual else out


def _seed_of_call(user_seed, x, r, p):
    """The dropout seed tensor that the forward op returns right after torch.manual_seed(user_seed)
    (which the public op called after the same torch.manual_seed draws too)."""
    torch.manual_seed(user_seed)
    return torch.ops.fastbert.add_layer_norm_fwd(x.detach(), r.detach(), None, None, None, 1e-5, p,
                                                 False)[-1]


def _check_add_layer_norm(x, r, w, b, xb=None, p=0.0, return_residual=True, eps=1e-5,
                          dy=None, dsum=None):
    """Triton op vs fp64 reference vs the fp16/bf16/fp32 composition, same upstream gradients;
    under dropout the reference uses the exact mask the kernel drew (materialised from the seed
    tensor that the forward op returns under the same torch.manual_seed)."""
    ins = [x, r, w, b, xb]
    mask = None
    user_seed = int(torch.randint(0, 2**31, ()))  # from the test's fresh generator
    if p > 0.0:
        mask = kln.dropout_keep_mask(_seed_of_call(user_seed, x, r, p), x.shape, p)
    ours = [_leaf(t) for t in ins]
    torch.manual_seed(user_seed)
    res = fastbert.add_layer_norm(ours[0], ours[1], ours[2], ours[3], eps, input_bias=ours[4],
                                  dropout_p=p, return_residual=return_residual, backend="triton")
    outs = list(res) if return_residual else [res]
    dtype = torch.promote_types(x.dtype, r.dtype)  # of both results
    assert all(o.dtype == dtype for o in outs)
    if dy is None:
        dy = torch.randn(x.shape, device=x.device).to(dtype)
    if dsum is None:
        dsum = torch.randn(x.shape, device=x.device).to(dtype)
    ups = [dy, dsum][:len(outs)]
    torch.autograd.backward(outs, ups)

    refs = [_leaf(t, torch.float64) for t in ins]
    ref = reference.add_layer_norm(refs[0], refs[1], refs[2], refs[3], eps, input_bias=refs[4],
                                   dropout_p=p, return_residual=return_residual, dropout_mask=mask)
    ref = list(ref) if return_residual else [ref]
    torch.autograd.backward(ref, [u.double() for u in ups])

    lows = [_leaf(t) for t in ins]
    low = _torch_add_layer_norm(*lows[:4], eps, lows[4], p, mask, return_residual)
    low = list(low) if return_residual else [low]
    torch.autograd.backward(low, ups)

    _check("out", outs, ref, low)
    _check("grad", _grads(ours), _grads(refs), _grads(lows))
    return outs, _grads(ours)


def _add_inputs(shape, dtype, scale=1.0, offset=0.0):
    n = shape[-1]
    x = rand(shape, dtype, scale=scale) + offset
    r = rand(shape, dtype, scale=scale) + offset
    w = rand((n,), dtype) * 0.5 + 1.0
    b = rand((n,), dtype)
    xb = rand((n,), dtype)
    return x, r, w, b, xb


@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("width", WIDTHS, ids=lambda n: f"N{n}")
def test_add_layer_norm(width, dtype):
    x, r, w, b, xb = _add_inputs((3 if width > 1024 else 17, width), dtype)
    _check_add_layer_norm(x, r, w, b, xb)


DROPOUT_CASES = [(97, torch.float32, True), (97, torch.float16, False), (768, torch.float16, True),
                 (768, torch.bfloat16, False)]


@pytest.mark.parametrize("width, dtype, return_residual", DROPOUT_CASES,
                         ids=[f"N{n}-{DT[d]}-{'return-residual' if r else 'out-only'}"
                              for n, d, r in DROPOUT_CASES])
def test_add_layer_norm_dropout_exact(width, dtype, return_residual):
    x, r, w, b, xb = _add_inputs((3, 7, width), dtype)
    _check_add_layer_norm(x, r, w, b, xb, p=0.25, return_residual=return_residual)


@pytest.mark.parametrize("params", ["none", "weight", "bias", "input_bias"])
def test_add_layer_norm_optional_params(params):
    x, r, w, b, xb = _add_inputs((17, 97), torch.float16)
    _check_add_layer_norm(x, r, w if params == "weight" else None, b if params == "bias" else None,
                          xb if params == "input_bias" else None, p=0.1)


def test_add_layer_norm_noncontiguous():
    x = rand((2, 9, 97), torch.float16, noncontiguous=True)          # strided columns
    r = rand((9, 2, 97), torch.float16).transpose(0, 1)               # needs a copy
    w = rand((97,), torch.float16)
    b = rand((97,), torch.float16)
    xb = rand((194,), torch.float16)[::2]
    dy = rand((2, 9, 97), torch.float16, noncontiguous=True)
    dsum = torch.ones((), device=DEVICE, dtype=torch.float16).expand(2, 9, 97)
    _check_add_layer_norm(x, r, w, b, xb, p=0.2, dy=dy, dsum=dsum)


def test_add_layer_norm_large_magnitude_fp16():
    x, r, w, b, xb = _add_inputs((17, 768), torch.float16, scale=30.0, offset=500.0)
    dy = rand((17, 768), torch.float16, scale=30.0)
    _check_add_layer_norm(x, r, w, b, xb, dy=dy, dsum=rand((17, 768), torch.float16))


def test_add_layer_norm_only_sum_used():
    """With return_residual, a graph that uses only the pre-norm sum still gets every gradient."""
    x, r, w, b, xb = _add_inputs((5, 97), torch.float32)
    xs, rs, ws, bs, xbs = (_leaf(t) for t in (x, r, w, b, xb))
    _, s = fastbert.add_layer_norm(xs, rs, ws, bs, input_bias=xbs, return_residual=True,
                                   backend="triton")
    ds = torch.randn_like(s)
    s.backward(ds)
    torch.testing.assert_close(s, x + xb + r)
    torch.testing.assert_close(xs.grad, ds)
    torch.testing.assert_close(rs.grad, ds)
    torch.testing.assert_close(xbs.grad, ds.sum(0))
    assert ws.grad is None or torch.count_nonzero(ws.grad) == 0


@pytest.mark.parametrize("grad_of", ["weight", "bias", "input", "residual", "input_bias", "none"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_add_layer_norm_sum_requires_grad_as_its_inputs(backend, grad_of):
    """The pre-norm sum needs a gradient only when input, residual or input_bias does (as torch's
    ``input + residual``): with only the LayerNorm's weight or bias requiring one it had
    requires_grad=True on the Triton backend (its gradient is always zero)."""
    x, r, w, b, xb = _add_inputs((3, 40), torch.float32)
    named = dict(input=x, residual=r, weight=w, bias=b, input_bias=xb)
    if grad_of != "none":
        named[grad_of] = _leaf(named[grad_of])
    out, s = fastbert.add_layer_norm(named["input"], named["residual"], named["weight"],
                                     named["bias"], input_bias=named["input_bias"],
                                     return_residual=True, backend=backend)
    assert out.requires_grad == (grad_of != "none")
    assert s.requires_grad == (grad_of in ("input", "residual", "input_bias"))


@pytest.mark.parametrize("width", [300, 1000], ids=lambda n: f"N{n}")
def test_add_layer_norm_looped(monkeypatch, width):
    monkeypatch.setattr(kln, "MAX_FUSED_N", 128)
    monkeypatch.setattr(kln, "LOOPED_BLOCK_N", 256)
    monkeypatch.setattr(kln, "COLS_BLOCK_N", 256)
    x, r, w, b, xb = _add_inputs((3, width), torch.float16)
    _check_add_layer_norm(x, r, w, b, xb, p=0.2)


MIXED = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
         (torch.float32, torch.bfloat16)]
MIXED_IDS = [f"{DT[x]}+{DT[r]}" for x, r in MIXED]


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("return_residual", [False, True], ids=["out", "out+sum"])
@pytest.mark.parametrize("width", [97, 768], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("x_dtype, r_dtype", MIXED, ids=MIXED_IDS)
def test_add_layer_norm_mixed_dtypes(x_dtype, r_dtype, width, return_residual, p):
    """Mixed precision: a 16-bit matmul output added to an fp32 residual stream (and the reverse),
    fp32 parameters. Each tensor is read in its own dtype; results in the promoted dtype; each
    gradient in its input's dtype (the checks assert every dtype)."""
    x, r = rand((17, width), x_dtype), rand((17, width), r_dtype)
    w, b, xb = rand((width,)) * 0.5 + 1.0, rand((width,)), rand((width,))
    _check_add_layer_norm(x, r, w, b, xb, p=p, return_residual=return_residual)


@pytest.mark.parametrize("width", [300, 1000], ids=lambda n: f"N{n}")
def test_add_layer_norm_mixed_dtypes_looped(monkeypatch, width):
    monkeypatch.setattr(kln, "MAX_FUSED_N", 128)
    monkeypatch.setattr(kln, "LOOPED_BLOCK_N", 256)
    monkeypatch.setattr(kln, "COLS_BLOCK_N", 256)
    for p in (0.0, 0.2):
        x, r = rand((3, width), torch.bfloat16), rand((3, width))
        _check_add_layer_norm(x, r, rand((width,)), rand((width,)), rand((width,)), p=p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT.get)
def test_add_layer_norm_mixed_dtypes_reads_each_dtype(dtype):
    """The Triton op on a 16-bit input and an fp32 residual equals, bit for bit, the op on the
    input cast to fp32 (the cast is exact; the kernel converts on load instead of in a separate
    pass); the input's gradient is that op's, rounded once to the input's dtype."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter rounds fp32 -> bf16 toward zero, torch to nearest even")
    x, r = rand((9, 200), dtype), rand((9, 200))
    w, b, xb = rand((200,)), rand((200,)), rand((200,))
    dy, dsum = rand((9, 200)), rand((9, 200))
    results = []
    for x_in in (x, x.float()):
        ins = [_leaf(t) for t in (x_in, r, w, b, xb)]
        torch.manual_seed(5)
        out, s = fastbert.add_layer_norm(*ins[:4], input_bias=ins[4], dropout_p=0.1,
                                         return_residual=True, backend="triton")
        torch.autograd.backward([out, s], [dy, dsum])
        results.append([out, s] + _grads(ins))
    (out, s, gx, *rest), (out32, s32, gx32, *rest32) = results
    assert torch.equal(out, out32) and torch.equal(s, s32)
    assert gx.dtype == dtype and torch.equal(gx, gx32.to(dtype))
    for g, g32 in zip(rest, rest32):
        assert torch.equal(g, g32)


def _seed(value):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


def test_dropout_statistics():
    """Kept fraction ~ 1 - p; the mask changes with the seed; rows and columns are not
    correlated (the same position in different rows, and neighbours in one row, differ)."""
    p, m, n = 0.3, 32, 512
    mask = kln.dropout_keep_mask(_seed(12345), (m, n), p)
    assert mask.dtype == torch.bool and mask.shape == (m, n)
    sigma = (p * (1 - p) / (m * n)) ** 0.5
    assert abs(mask.float().mean().item() - (1 - p)) < 5 * sigma
    col_frac = mask.float().mean(0)  # 32 draws per column: no column is always kept or dropped
    assert 0 < col_frac.min() and col_frac.max() < 1
    assert not torch.equal(mask[0], mask[1])
    other = kln.dropout_keep_mask(_seed(12346), (m, n), p)
    agree = (mask == other).float().mean().item()  # independent masks agree w.p. p^2 + (1-p)^2
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.02
    # the output itself drops what the mask says, scaled by 1 / (1 - p) where kept
    x = torch.ones((m, n), device=DEVICE)
    torch.manual_seed(7)
    _, s = fastbert.add_layer_norm(x, torch.zeros_like(x), None, None, dropout_p=p,
                                   return_residual=True, backend="triton")
    seen = kln.dropout_keep_mask(_seed_of_call(7, x, x, p), (m, n), p)
    torch.testing.assert_close(s, seen.float() / (1 - p))


def test_dropout_offset_is_the_flat_index():
    """Element (row, col) of an (M, N) input draws at offset row * N + col, the flat index (as the
    docstring says): the same mask as one (1, M * N) row, and as the attention kernels' mask (an
    independent kernel with the same rule). An offset of row * (N - 1) + col, which made
    neighbouring rows share a draw, passed every other dropout test in a mutation run."""
    from fastbert.kernels import attention as kat

    seed, m, n, p = _seed(4321), 7, 97, 0.5
    mask = kln.dropout_keep_mask(seed, (m, n), p)
    assert torch.equal(mask, kln.dropout_keep_mask(seed, (1, m * n), p).reshape(m, n))
    assert torch.equal(mask, kat.attention_dropout_mask(seed, p, (1, 1, m, n))[0, 0].bool())


def test_add_layer_norm_reproducible():
    """torch.manual_seed reproduces the dropout; another seed changes it; runs are bitwise
    deterministic, gradients included."""
    x, r, w, b, xb = _add_inputs((33, 256), torch.float16)
    dy = rand((33, 256), torch.float16)

    def run(seed):
        ins = [_leaf(t) for t in (x, r, w, b, xb)]
        torch.manual_seed(seed)
        out = fastbert.add_layer_norm(ins[0], ins[1], ins[2], ins[3], input_bias=ins[4],
                                      dropout_p=0.5, backend="triton")
        out.backward(dy)
        return [out] + _grads(ins)

    a, b_, c = run(1), run(1), run(2)
    for t1, t2 in zip(a, b_):
        assert torch.equal(t1, t2)
    assert not torch.equal(a[0], c[0])


def test_add_layer_norm_dispatch():
    x = rand((4, 97))
    with pytest.raises(BackendError, match="input_bias is float64"):
        fastbert.add_layer_norm(x, x, None, None, input_bias=rand((97,), torch.float64),
                                backend="triton")
    if DEVICE == "cpu":
        impl = select("add_layer_norm", None, x.device, input=x, residual=x, weight=None,
                      bias=None, eps=1e-5, input_bias=None, dropout_p=0.0, return_residual=False)
        assert impl.backend == "torch"


def test_add_layer_norm_compile_dropout():
    """torch.compile(fullgraph=True) with dropout and return_residual: the seed is drawn inside
    the opaque op, so compiled and eager runs under one torch.manual_seed agree bitwise."""
    x, r, w, b, _ = _add_inputs((5, 97), torch.float32)
    ins = [_leaf(t) for t in (x, r, w, b)]

    def fn(x, r, w, b):
        return fastbert.add_layer_norm(x, r, w, b, dropout_p=0.2, return_residual=True,
                                       backend="triton")

    compiled = torch.compile(fn, fullgraph=True)
    results = []
    for f in (compiled, fn):
        torch.manual_seed(3)
        out, s = f(*ins)
        grads = torch.autograd.grad((out * out).sum() + s.sum(), ins)
        results.append([out, s, *grads])
    for t1, t2 in zip(*results):
        assert torch.equal(t1, t2)


# ----------------------------------------------------------------------------------------------
# The dropout seed: drawn on the inputs' device, never read on the host
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
@pytest.mark.parametrize("device", ["inputs", "meta"], ids=["kernel", "fake-on-meta"])
def test_add_layer_norm_seed_output(device, p):
    """The forward op returns its seed as an int64 (1,) tensor on the input's device, an empty
    (0,) one without dropout; the fake agrees."""
    x = rand((5, 97))
    if device == "meta":
        x = x.to("meta")
    seed = torch.ops.fastbert.add_layer_norm_fwd(x, x, None, None, None, 1e-5, p, False)[-1]
    assert seed.dtype == torch.int64 and seed.device == x.device
    assert seed.shape == ((1,) if p > 0.0 else (0,))
    if device != "meta" and p > 0.0:
        assert 0 <= int(seed[0]) < 2 ** 63 - 1  # fastbert._rng draws 63-bit seeds


def test_add_layer_norm_seed_never_read_on_host(monkeypatch):
    """Forward and backward with dropout run while every host read of an int64 tensor's value
    (``int(seed[0])``, ``seed.item()``, ...) fails; results equal those of an unguarded run."""
    x, r, w, b, xb = _add_inputs((9, 97), torch.float32)
    dy = rand((9, 97))

    def run():
        ins = [_leaf(t) for t in (x, r, w, b, xb)]
        torch.manual_seed(5)
        out = fastbert.add_layer_norm(ins[0], ins[1], ins[2], ins[3], input_bias=ins[4],
                                      dropout_p=0.3, backend="triton")
        out.backward(dy)
        return [out] + _grads(ins)

    expected = run()

    with monkeypatch.context() as m:
        forbid_int64_host_reads(m)
        with pytest.raises(AssertionError, match="on the host"):
            int(torch.zeros((), dtype=torch.int64))  # the guard is active
        got = run()
    for a, e in zip(got, expected):
        assert torch.equal(a, e)


def test_add_layer_norm_fresh_seed_per_call():
    """Two calls in a row draw two seeds: different masks and outputs; each call's seed tensor
    reproduces its mask."""
    x = torch.ones((8, 97), device=DEVICE)
    z = torch.zeros_like(x)
    p = 0.3
    calls = [torch.ops.fastbert.add_layer_norm_fwd(x, z, None, None, None, 1e-5, p, True)
             for _ in range(2)]
    (_, s1, _, _, seed1), (_, s2, _, _, seed2) = calls
    assert not torch.equal(seed1, seed2)
    assert not torch.equal(s1, s2)
    for s, seed in ((s1, seed1), (s2, seed2)):
        torch.testing.assert_close(s, kln.dropout_keep_mask(seed, x.shape, p).float() / (1 - p))
    with pytest.raises(TypeError, match="int64 \\(1,\\) dropout seed tensor"):
        kln.dropout_keep_mask(12345, x.shape, p)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_add_layer_norm_cuda_graph_dropout_fresh_masks(backend):
    """A training step (forward + backward with dropout) captured in a CUDA graph draws a fresh
    seed on the device at every replay: two replays give different seeds, outputs and gradients,
    and each replay is the exact dropout add + LayerNorm of its own seed."""
    rows, n, p, dtype = 64, 768, 0.3, torch.float16
    x, r = rand((rows, n), dtype, "cuda", requires_grad=True), rand((rows, n), dtype, "cuda", requires_grad=True)
    w = (rand((n,), dtype, "cuda") * 0.5 + 1.0).requires_grad_()
    b = rand((n,), dtype, "cuda", requires_grad=True)
    dy = rand((rows, n), dtype, "cuda")
    if backend == "triton":
        fwd = lambda: torch.ops.fastbert.add_layer_norm_fwd(x, r, w, b, None, 1e-5, p, False)  # noqa: E731
        mask_of = lambda seed: kln.dropout_keep_mask(seed, (rows, n), p)  # noqa: E731
    else:
        from fastbert.ops.layer_norm import _cuda_ops

        ops = _cuda_ops()
        fwd = lambda: ops.add_layer_norm_fwd(x, r, w, b, None, 1e-5, p)  # noqa: E731
        mask_of = lambda seed: ops.dropout_mask(seed, [rows, n], p)  # noqa: E731

    def step():
        out, *_, seed = fwd()
        return [out, seed, *torch.autograd.grad(out, (x, r, w, b), dy)]

    replays = cuda_graph_replays(step)
    assert_fresh_replays(replays)
    for out, seed, *grads in replays:
        keep = mask_of(seed)
        refs = [_leaf(t, torch.float64) for t in (x, r, w, b)]
        ref = reference.add_layer_norm(*refs, 1e-5, dropout_p=p, dropout_mask=keep)
        ref.backward(dy.double())
        lows = [_leaf(t) for t in (x, r, w, b)]
        low = _torch_add_layer_norm(*lows, 1e-5, None, p, keep, False)
        low.backward(dy)
        _check(f"{backend} replay out", [out], [ref], [low])
        _check(f"{backend} replay grad", grads, _grads(refs), _grads(lows))


# ----------------------------------------------------------------------------------------------
# GPU only: wide rows (8192 one-pass, 65536 looped) and many rows
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("width", [768, 8192, 65536], ids=lambda n: f"N{n}")
def test_layer_norm_cuda(width, dtype):
    rows = 1031 if width <= 8192 else 67
    x = rand((rows, width), dtype, scale=2.0) + 0.5
    _check_layer_norm(x, width, rand((width,), dtype), rand((width,), dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("width", [1024, 8192, 65536], ids=lambda n: f"N{n}")
def test_add_layer_norm_cuda(width, dtype):
    rows = 1031 if width <= 8192 else 67
    x, r, w, b, xb = _add_inputs((rows, width), dtype)
    _check_add_layer_norm(x, r, w, b, xb, p=0.1)
    _check_add_layer_norm(x, r, w, b, xb, p=0.0, return_residual=False)


@pytest.mark.cuda
def test_layer_norm_cuda_noncontiguous_wide():
    x = rand((33, 65536), torch.bfloat16, noncontiguous=True)
    _check_layer_norm(x, 65536, None, rand((65536,), torch.bfloat16))


# ----------------------------------------------------------------------------------------------
# backend="cuda" (csrc/layer_norm, extension fastbert._C): GPU only. Reference in fp64 and, for
# the tolerance, the reference computed in the input's dtype; the same upstream gradient for all.
# C++ allocations bypass conftest's NaN poisoning, so the CUDA cache's free blocks are filled with
# NaN first: an output the kernel leaves unwritten then shows up as NaN.
# ----------------------------------------------------------------------------------------------
CUDA_WIDTHS = [1, 7, 97, 768, 1000, 1024, 4096, 8192, 65536]


def _cuda_compare(fn, inputs, dys, dtype, name):
    """``fn(*inputs, backend=b, **ref_kwargs)`` runs the CUDA op (b = "cuda") or the reference
    (b = "ref"). Compares outputs and input gradients (same upstream ``dys``, one per output) of
    the CUDA op against the fp64 reference, with the reference in ``dtype`` setting the bound."""
    poison_cuda_cache()
    compare_to_reference(fn, inputs, dys, dtype, name, backend="cuda")


def _cuda_layer_norm(shape):
    def fn(x, w, b, backend, **kw):
        if backend == "cuda":
            return fastbert.layer_norm(x, shape, w, b, 1e-5, backend="cuda")
        return reference.layer_norm(x, shape, w, b, 1e-5, **kw)
    return fn


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("rows,width", [pytest.param(r, w, id=f"R{r}-N{w}") for r, w in
                                        [(r, w) for w in CUDA_WIDTHS for r in (1, 67)] + [(1537, 768), (400, 1000)]])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_cuda_layer_norm(rows, width, dtype, affine):
    x = rand((rows, width), dtype, "cuda", scale=2.0) + 0.5
    w = rand((width,), dtype, "cuda") if affine else None
    b = rand((width,), dtype, "cuda") if affine else None
    _cuda_compare(_cuda_layer_norm((width,)), [x, w, b], [rand((rows, width), dtype, "cuda")], dtype,
                  f"layer_norm R{rows}-N{width}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("view", ["row-stride-768of1024", "row-stride-97of100", "every-other-1000",
                                  "3d-normalized-8x96"])
def test_cuda_layer_norm_views(view, dtype):
    if view == "row-stride-768of1024":  # vectorised fast path with a row stride
        x, shape = rand((33, 1024), dtype, "cuda")[:, :768], (768,)
    elif view == "row-stride-97of100":  # unaligned rows: the scalar path
        x, shape = rand((33, 100), dtype, "cuda")[:, 3:], (97,)
    elif view == "every-other-1000":
        x, shape = rand((2, 17, 1000), dtype, "cuda", noncontiguous=True), (1000,)
    else:
        x, shape = rand((3, 5, 8, 96), dtype, "cuda"), (8, 96)
    w, b = rand(shape, dtype, "cuda"), rand(shape, dtype, "cuda")
    _cuda_compare(_cuda_layer_norm(shape), [x, w, b], [rand(x.shape, dtype, "cuda")], dtype, f"layer_norm {view}")


@pytest.mark.cuda
@pytest.mark.parametrize("width", [768, 1000], ids=["N768-fast", "N1000-generic"])
def test_cuda_layer_norm_deterministic(width):
    x, w, b = rand((3000, width), torch.float16, "cuda"), rand((width,), torch.float16, "cuda"), rand((width,), torch.float16, "cuda")
    dy = rand((3000, width), torch.float16, "cuda")
    results = []
    for _ in range(2):
        leaves = [leaf_like(t) for t in (x, w, b)]
        out = fastbert.layer_norm(leaves[0], (width,), leaves[1], leaves[2], backend="cuda")
        out.backward(dy)
        results.append([out.detach()] + [t.grad for t in leaves])
    for t1, t2 in zip(*results):
        assert torch.equal(t1, t2)


def _cuda_add_ln(return_residual, dropout_p=0.0, mask=None):
    def fn(x, r, w, b, ib, backend, **kw):
        if backend == "cuda":
            return fastbert.add_layer_norm(x, r, w, b, 1e-5, input_bias=ib, dropout_p=dropout_p,
                                           return_residual=return_residual, backend="cuda")
        return reference.add_layer_norm(x, r, w, b, 1e-5, input_bias=ib, dropout_p=dropout_p,
                                        return_residual=return_residual, dropout_mask=mask, **kw)
    return fn


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("rows,width", [pytest.param(r, w, id=f"R{r}-N{w}") for r, w in [
    (1, 1), (67, 7), (67, 97), (1537, 768), (67, 1000), (300, 1024), (67, 4096), (9, 8192), (3, 65536)]])
@pytest.mark.parametrize("params", ["all", "no-input-bias", "none"])
@pytest.mark.parametrize("return_residual", [False, True], ids=["out", "out+sum"])
def test_cuda_add_layer_norm(rows, width, dtype, params, return_residual):
    x, r = rand((rows, width), dtype, "cuda"), rand((rows, width), dtype, "cuda")
    w = rand((width,), dtype, "cuda") if params != "none" else None
    b = rand((width,), dtype, "cuda") if params != "none" else None
    ib = rand((width,), dtype, "cuda") if params == "all" else None
    dys = [rand((rows, width), dtype, "cuda") for _ in range(2 if return_residual else 1)]
    _cuda_compare(_cuda_add_ln(return_residual), [x, r, w, b, ib], dys, dtype,
                  f"add_layer_norm R{rows}-N{width}-{params}")


@pytest.mark.cuda
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=DT.get)
@pytest.mark.parametrize("rows,width", [(67, 97), (1537, 768), (300, 1024), (67, 4096), (9, 8192)],
                         ids=lambda v: str(v))
def test_cuda_add_layer_norm_mixed_dtypes(rows, width, x_dtype):
    """Mixed precision on the CUDA kernels: a 16-bit input read as it is, with an fp32 residual and
    fp32 parameters; results fp32, the input's gradient in its dtype."""
    x, r = rand((rows, width), x_dtype, "cuda"), rand((rows, width), torch.float32, "cuda")
    w, b, ib = (rand((width,), torch.float32, "cuda") for _ in range(3))
    dys = [rand((rows, width), torch.float32, "cuda") for _ in range(2)]
    _cuda_compare(_cuda_add_ln(True), [x, r, w, b, ib], dys, x_dtype,
                  f"add_layer_norm mixed R{rows}-N{width}")


def _with_seed(seed, fn):
    torch.manual_seed(seed)
    return fn()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("shape", [(3, 5, 97), (2, 50, 768), (67, 1000), (9, 4096)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.1, 0.5], ids=["p0.1", "p0.5"])
def test_cuda_add_layer_norm_dropout_exact(shape, dtype, p):
    """The CUDA forward's keep-mask (materialised from its seed by dropout_mask) given to the
    reference reproduces output, pre-norm sum and every gradient."""
    from fastbert.ops.layer_norm import _cuda_ops

    ops = _cuda_ops()
    n = shape[-1]
    x, r = rand(shape, dtype, "cuda"), rand(shape, dtype, "cuda")
    w, b, ib = rand((n,), dtype, "cuda"), rand((n,), dtype, "cuda"), rand((n,), dtype, "cuda")
    outs = _with_seed(1234, lambda: ops.add_layer_norm_fwd(x.reshape(-1, n), r.reshape(-1, n), w, b, ib, 1e-5, p))
    keep = ops.dropout_mask(outs[-1], list(shape), p)
    assert 0.0 < keep.float().mean().item() < 1.0

    def fn(*args, backend, **kw):
        if backend == "cuda":  # the public op, drawing the same seed
            return _with_seed(1234, lambda: _cuda_add_ln(True, p)(*args, backend="cuda"))
        return _cuda_add_ln(True, p, keep)(*args, backend=backend, **kw)

    _cuda_compare(fn, [x, r, w, b, ib], [rand(shape, dtype, "cuda"), rand(shape, dtype, "cuda")], dtype,
                  f"add_layer_norm dropout {shape} p{p}")


@pytest.mark.cuda
def test_cuda_add_layer_norm_dropout_reproducible():
    x, r = rand((64, 768), torch.float16, "cuda"), rand((64, 768), torch.float16, "cuda")
    run = lambda: fastbert.add_layer_norm(x, r, None, None, dropout_p=0.3, backend="cuda")  # noqa: E731
    first, again = _with_seed(7, run), _with_seed(7, run)
    assert torch.equal(first, again)
    assert not torch.equal(first, run())  # the generator moved on: a fresh mask


@pytest.mark.cuda
def test_cuda_add_layer_norm_only_sum_used():
    x, r = rand((17, 97), torch.float32, "cuda"), rand((17, 97), torch.float32, "cuda")
    grads = []
    for backend, cast in (("cuda", None), ("ref", torch.float64)):
        xl, rl = leaf_like(x, cast), leaf_like(r, cast)
        _, s = _cuda_add_ln(True)(xl, rl, None, None, None, backend=backend)
        s.backward(torch.ones_like(s))
        grads.append((xl.grad, rl.grad))
    for got, want in zip(*grads):
        assert_close(got, want)


@pytest.mark.cuda
def test_cuda_layer_norm_opcheck():
    from fastbert.ops.layer_norm import _cuda_ops

    ops = _cuda_ops()
    x = rand((17, 97), torch.float16, "cuda", requires_grad=True)
    r = rand((17, 97), torch.float16, "cuda")
    w, b = rand((97,), torch.float16, "cuda", requires_grad=True), rand((97,), torch.float16, "cuda")
    torch.library.opcheck(ops.layer_norm_fwd, (x, w, b, 1e-5))
    torch.library.opcheck(ops.add_layer_norm_fwd, (x, r, w, b, b, 1e-5, 0.0))


@pytest.mark.cuda
def test_cuda_layer_norm_compile_fullgraph():
    x, r = rand((33, 768), torch.float16, "cuda"), rand((33, 768), torch.float16, "cuda")
    w, b = rand((768,), torch.float16, "cuda"), rand((768,), torch.float16, "cuda")

    def f(x, r, w, b):
        y = fastbert.layer_norm(x, (768,), w, b, backend="cuda")
        return fastbert.add_layer_norm(y, r, w, b, input_bias=b, backend="cuda")

    eager = f(x, r, w, b)  # loads the extension and registers its fakes before tracing
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, r, w, b), eager, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_layer_norm_16bit_input_into_fp32(dtype):
    """The Triton kernels normalise a 16-bit input into an fp32 output without a cast pass (layer_norm
    under CUDA autocast), fp32 parameters; the input's gradient comes back in its dtype."""
    import sys
    ln_ops = sys.modules["fastbert.ops.layer_norm"]
    x = rand((17, 97), dtype, scale=3.0)
    w, b = rand((97,)), rand((97,))
    dy = rand((17, 97))
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    out = ln_ops._layer_norm_triton(*leaves[:1], (97,), *leaves[1:], 1e-5, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    out.backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = F.layer_norm(ref_leaves[0], (97,), ref_leaves[1], ref_leaves[2], 1e-5)
    ref.backward(dy.double())
    low_leaves = [t.detach().float().requires_grad_() for t in (x, w, b)]  # PyTorch's: cast first
    low = F.layer_norm(low_leaves[0], (97,), low_leaves[1], low_leaves[2], 1e-5)
    low.backward(dy)
    assert_close(out, ref, low, name="out")
    assert leaves[0].grad.dtype == dtype
    assert_close(leaves[0].grad, ref_leaves[0].grad, low_leaves[0].grad.to(dtype),
                 atol=interpreter_atol(dtype, ref_leaves[0].grad), name="grad input")
    for name, got, r, lo in (("weight", leaves[1], ref_leaves[1], low_leaves[1]),
                             ("bias", leaves[2], ref_leaves[2], low_leaves[2])):
        assert_close(got.grad, r.grad, lo.grad, name=f"grad {name}")


def test_cuda_backend_declines_rows_beyond_its_limit():
    """The CUDA kernels index within a row with 32-bit counters (csrc/common.h kMaxRowLength): a
    longer row is declined with that reason, so "auto" takes another backend, instead of the
    extension's bare "invalid argument"."""
    import sys
    ln_ops = sys.modules["fastbert.ops.layer_norm"]  # (the package attribute is the function)

    x = torch.empty(1, 2 ** 31, device="meta", dtype=torch.float16)
    reasons = ln_ops._layer_norm_cuda_reasons(input=x, normalized_shape=(2 ** 31,))
    assert any("limit" in r for r in reasons), reasons
    reasons = ln_ops._add_layer_norm_cuda_reasons(input=x, residual=x)
    assert any("limit" in r for r in reasons), reasons
    ok = torch.empty(4, 768, device="meta", dtype=torch.float16)
    assert ln_ops._layer_norm_cuda_reasons(input=ok, normalized_shape=(768,)) == []


# ----------------------------------------------------------------------------------------------
# only one input requiring grad (helper 59's coverage audit)
# ----------------------------------------------------------------------------------------------
def _check_grad_of_one(make, inputs, which, dy):
    """``make(ts, kind)`` runs the Triton op (kind "triton"), the fp64 reference ("ref") or
    PyTorch's low-precision composition ("low") on ``ts``; only ``inputs[which]`` requires grad.
    The output and that one gradient against fp64, with the same upstream gradient ``dy``."""
    runs = []
    for kind, cast in (("triton", None), ("ref", torch.float64), ("low", None)):
        ts = [None if t is None else t.detach().to(cast) if cast else t.detach().clone() for t in inputs]
        ts[which].requires_grad_(True)
        out = make(ts, kind)
        assert out.requires_grad
        g, = torch.autograd.grad(out, ts[which], dy.to(out.dtype))
        runs.append((out, g))
    (out, g), (ref, ref_g), (low, low_g) = runs
    _check("out", [out], [ref], [low])
    _check("grad", [g], [ref_g], [low_g])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT.get)
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_layer_norm_grad_of_weight_or_bias_alone(which, dtype):
    """Only the weight, or only the bias, requires grad (a frozen input): that gradient (a column
    sum over the rows) is right."""
    x = rand((17, 97), dtype, scale=2.0) + 0.5
    w, b = rand((97,), dtype) * 0.5 + 1.0, rand((97,), dtype)

    def make(ts, kind):
        if kind == "triton":
            return fastbert.layer_norm(ts[0], 97, ts[1], ts[2], backend="triton")
        if kind == "ref":
            return reference.layer_norm(ts[0], (97,), ts[1], ts[2], 1e-5)
        return F.layer_norm(ts[0], (97,), ts[1], ts[2], 1e-5)

    _check_grad_of_one(make, [x, w, b], {"weight": 1, "bias": 2}[which], rand(x.shape, dtype))


@pytest.mark.parametrize("which,dtype", [("residual", torch.float16), ("weight", torch.float32),
                                         ("input_bias", torch.float16)],
                         ids=["residual-fp16", "weight-fp32", "input_bias-fp16"])
def test_add_layer_norm_grad_of_one_input_with_dropout(which, dtype):
    """With dropout, only the residual, only the weight or only the input bias requires grad: the
    op runs and that gradient is right (against the reference on the kernel's exact keep-mask)."""
    p = 0.3
    x, r, w, b, xb = _add_inputs((2, 9, 97), dtype)
    user_seed = int(torch.randint(0, 2**31, ()))  # from the test's fresh generator
    mask = kln.dropout_keep_mask(_seed_of_call(user_seed, x, r, p), x.shape, p)

    def make(ts, kind):
        if kind == "triton":
            torch.manual_seed(user_seed)
            return fastbert.add_layer_norm(*ts[:4], input_bias=ts[4], dropout_p=p, backend="triton")
        if kind == "ref":
            return reference.add_layer_norm(*ts[:4], 1e-5, input_bias=ts[4], dropout_p=p,
                                            dropout_mask=mask)
        return _torch_add_layer_norm(*ts[:4], 1e-5, ts[4], p, mask, False)

    which = ["input", "residual", "weight", "bias", "input_bias"].index(which)
    _check_grad_of_one(make, [x, r, w, b, xb], which, rand(x.shape, dtype))
