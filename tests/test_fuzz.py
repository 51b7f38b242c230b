"""Property-based tests: random combinations of the options the other files test one grid at a time.

Each example draws a shape, dtype, layout and a set of options (mask kind and broadcast, causal,
window, ALiBi, grouped-query heads, scale; normalized shapes, strides, affine parameters, an fp32
residual stream under a 16-bit input; Linformer's projection length, shared or per-head
projections, one tensor for both, key padding) and checks the op's output and every gradient
against fastbert.reference in fp64 with the usual rule (fastbert.testing.compare_to_reference).
The inputs come from a generator seeded by a drawn integer, so a failing example is replayed
exactly from what hypothesis prints.

Dropout (attention, add_layer_norm, varlen, block-sparse and Linformer attention; p = 0.25 in a
third of the examples) is checked exactly: the op runs right after torch.manual_seed(seed), the
test draws the same dropout seed after the same torch.manual_seed, materialises the kernels' keep-mask
for it (the Triton kernels' mask functions, or the CUDA binding's dropout_mask) and hands it to the
reference as ``dropout_mask``. Attention examples where every row sees at most one key are left
out on the Triton kernels in fp32 or with dropout (see _assume_scores_matter).

Without a GPU the Triton kernels run under the interpreter (12 small examples per test), and the
CUDA kernels take part through the emulator of tests/cuda_emu ("emu": the backend="cuda"
implementation functions, each example in a drawn thread order, every allocation NaN-filled). On a
GPU both backends run compiled (20 examples: each new combination compiles kernels).
``FASTBERT_FUZZ_EXAMPLES=N`` sets the number of examples per test, for a longer hunt than CI's.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
from pathlib import Path

import pytest
import torch

import fastbert
from fastbert import reference
from fastbert._rng import dropout_seed
from fastbert.backends import backend_reasons
from fastbert.ops.attention import check_window_size
from fastbert.testing import (DEVICE, assert_close, compare_to_reference, nan_filled_allocations, rand,
                              run_with_grads)

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import build_emu as cuda_emu  # noqa: E402  (tests/cuda_emu/build_emu.py)

# the op family modules (fastbert.ops.gelu etc. are shadowed by the functions of that name)
attention_ops = sys.modules["fastbert.ops.attention"]
gelu_ops = sys.modules["fastbert.ops.gelu"]
layer_norm_ops = sys.modules["fastbert.ops.layer_norm"]
linformer_ops = sys.modules["fastbert.ops.linformer_attention"]

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

ON_GPU = DEVICE == "cuda"
BACKENDS = ["triton", "cuda"] if ON_GPU else ["triton", "emu"]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])  # interpreter: no bf16 dot
SETTINGS = hypothesis.settings(
    max_examples=int(os.environ.get("FASTBERT_FUZZ_EXAMPLES") or (20 if ON_GPU else 12)),
    deadline=None, database=None, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture,
                           hypothesis.HealthCheck.too_slow])
pytestmark = [
    # Under the interpreter numpy reports an inf / NaN arising anywhere inside a kernel (even in
    # rows that are never stored) as a RuntimeWarning: an error here, as in test_attention.py.
    pytest.mark.filterwarnings("error::RuntimeWarning"),
    # On a GPU every example compiles a few kernel variants: a fuzz test weighs like that many
    # ordinary tests when bench/gpu_run.sh balances its parallel shards.
    pytest.mark.shard_weight(3 * SETTINGS.max_examples),
]


def _skip_unavailable(backend):
    if backend == "emu":
        reason = cuda_emu.toolchain_missing()
    else:
        reason = "; ".join(backend_reasons(backend, torch.device(DEVICE), explicit=True))
    if reason:
        pytest.skip(f"backend {backend!r} unavailable here: {reason}")


def _fuzz(backend, cases, check):
    """Runs ``check(backend, case)`` on hypothesis-drawn ``cases`` (skipped when ``backend`` is
    unavailable here)."""
    _skip_unavailable(backend)

    @SETTINGS
    @hypothesis.given(case=cases)
    def run(case):
        check(backend, case)

    run()


@contextlib.contextmanager
def _running(backend, order):
    """Where ``backend`` runs: for "emu", the emulated CUDA kernels in thread order ``order``, with
    every allocation (the C++ ones too) filled with NaN (and the families' ``_cuda_ops`` giving the
    emulated ops, so :func:`_dropout_keep` materialises the emulated kernels' masks in here)."""
    if backend != "emu":
        yield
        return
    with nan_filled_allocations(), cuda_emu.emulated_cuda_backend(order):
        yield


def _sdpa(backend):
    """fastbert.scaled_dot_product_attention on ``backend`` (for "emu": the backend="cuda"
    implementation function, which takes the checked arguments)."""
    if backend == "emu":
        return lambda q, k, v, m, p, causal, scale, gqa, alibi, window: attention_ops._sdpa_cuda(
            q, k, v, m, p, causal, scale, gqa, alibi, check_window_size(window))
    return lambda q, k, v, m, p, causal, scale, gqa, alibi, window: fastbert.scaled_dot_product_attention(
        q, k, v, m, p, causal, scale, gqa, alibi_slopes=alibi, window_size=window, backend=backend)


def _layer_norm(backend):
    if backend == "emu":
        return lambda x, norm, w, b, eps: layer_norm_ops._layer_norm_cuda(x, tuple(norm), w, b, eps)
    return lambda x, norm, w, b, eps: fastbert.layer_norm(x, norm, w, b, eps, backend=backend)


def _add_layer_norm(backend):
    if backend == "emu":
        return lambda x, r, w, b, eps, xb, p, ret: layer_norm_ops._add_layer_norm_cuda(
            x, r, w, b, eps, xb, p, ret)
    return lambda x, r, w, b, eps, xb, p, ret: fastbert.add_layer_norm(
        x, r, w, b, eps, input_bias=xb, dropout_p=p, return_residual=ret, backend=backend)


def _linformer(backend):
    """fastbert.linformer_attention on ``backend``. For "emu": the backend="cuda" implementation
    function, whose dense attention over the projected keys goes through the public op, which
    refuses backend="cuda" for CPU tensors; that call is routed to the CUDA implementation
    function (the emulated kernels) for the duration."""
    if backend == "emu":
        def run(q, k, v, e, f, pad, p, scale):
            def dense(q, k, v, *, dropout_p, scale, backend):
                assert backend == "cuda"
                return attention_ops._sdpa_cuda(q, k, v, None, dropout_p, False, scale, False, None, None)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(attention_ops, "scaled_dot_product_attention", dense)
                return linformer_ops._linformer_cuda(q, k, v, e, f, pad, p, scale)
        return run
    return lambda q, k, v, e, f, pad, p, scale: fastbert.linformer_attention(
        q, k, v, e, f, pad, p, scale, backend=backend)


def _bias_gelu(backend):
    if backend == "emu":
        return lambda x, b, approx: (gelu_ops._gelu_cuda(x, approx) if b is None
                                     else gelu_ops._bias_gelu_cuda(x, b, approx))
    return lambda x, b, approx: fastbert.bias_gelu(x, b, approximate=approx, backend=backend)


_ORDERS = st.sampled_from(["forward", "reverse"])
# Dropout in a third of the examples: the others keep the dropout-free paths as common as before.
_DROPOUT = st.sampled_from([0.0, 0.0, 0.25])


def _assume_scores_matter(backend, fn, inputs, dys, dtype, p):
    """Skips (hypothesis.assume) the Triton examples, in fp32 or with dropout, whose every row sees
    one key or none while some see one: each softmax is then 1 whatever the scores, so the exact
    gradients through them (dq, dk, a float mask's) are 0, and PyTorch's too, which leaves the
    absolute floor as the whole tolerance. The Triton backward, dS = P * (dP - D) with
    D = rowsum(dO * O) from the stored output, keeps a rounding residue there that the sums over
    rows lift past the floor: fp32 (seen: 1.25e-5 > 1e-5 over 130 rows) and, with dropout, fp16
    (O rounded after the 1 / (1 - p) rescale; seen: 2.4e-3 > 2e-3 over 80 rows, 1e-2 with GQA).
    fp16 / bf16 without dropout stay far below their floor; the CUDA kernels, which keep P, give
    exact zeros. ``inputs[0]`` is the query."""
    if backend != "triton" or (p == 0.0 and dtype != torch.float32):
        return
    outs, grads = run_with_grads(fn, inputs, dys, torch.float64, backend="ref")
    hypothesis.assume(bool(grads[0].any()) or not outs[0].any())


def _seed_of_call(backend, seed, p):
    """The dropout seed that ``backend``'s forward op draws when it runs right after
    torch.manual_seed(seed): the op's first draw from torch's generators, which is
    fastbert._rng.dropout_seed for the Triton ops, and for the CUDA binding (csrc/fastbert.cpp
    draw_seed) at::randint(2^63 - 1, {1}) on the inputs' device."""
    torch.manual_seed(seed)
    if backend == "triton":
        return dropout_seed(p, torch.device(DEVICE))
    return torch.randint(torch.iinfo(torch.int64).max, (1,), device=DEVICE)


def _dropout_keep(backend, p, seed, shape, triton_mask, family=attention_ops):
    """The keep-mask (bool, True = kept) over ``shape`` that ``backend``'s op draws when it runs right
    after torch.manual_seed(seed); None without dropout. ``triton_mask(seed_tensor)`` materialises
    the Triton kernels' mask; the CUDA families share one rule (a counter per flat element index),
    materialised by the binding's dropout_mask (``family._cuda_ops()``: the emulated ops inside
    :func:`_running`)."""
    if p == 0.0:
        return None
    s = _seed_of_call(backend, seed, p)
    if backend == "triton":
        return triton_mask(s)
    return family._cuda_ops().dropout_mask(s, list(shape), p)


def _attention_mask_of(p, shape):
    """The dense Triton attention kernels' mask of a seed over (B, H, Lq, Lk), H the query heads."""
    from fastbert.kernels.attention import attention_dropout_mask

    return lambda s: attention_dropout_mask(s, p, shape)


# Sequence lengths: small under the interpreter; on a GPU also some past the lengths where the
# kernels change strategy (key limits of padded bool masks from 256 keys, several key blocks).
_SEQ = st.one_of(st.integers(1, 70), st.integers(200, 700)) if ON_GPU else st.integers(1, 70)


def _tensor(gen, shape, dtype, layout):
    """A (..., L, D)-shaped tensor in one of three memory layouts: contiguous, "transposed" (the
    last two-but-one dims stored swapped: (B, L, H, D) viewed as (B, H, L, D)) or "strided" (every
    other element of a twice-as-wide last dim)."""
    if layout == "transposed" and len(shape) == 4:
        b, h, l, d = shape
        return rand((b, l, h, d), dtype, DEVICE, generator=gen).transpose(1, 2)
    return rand(shape, dtype, DEVICE, generator=gen, noncontiguous=(layout == "strided"))


@st.composite
def attention_cases(draw):
    b = draw(st.integers(1, 3))
    hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3]))
    h = hkv * group
    lq, lk = draw(_SEQ), draw(_SEQ)
    d = draw(st.sampled_from([16, 24, 40, 64, 80, 96]))
    dv = draw(st.sampled_from([d, 16, 40]))
    mask = draw(st.sampled_from(["none", "bool", "float", "float_grad"]))
    # which of (B, H, Lq, Lk) the mask spans (1: broadcast); Lk always spanned for key masks
    mask_dims = [draw(st.booleans()) for _ in range(3)]
    window = draw(st.one_of(st.none(), st.tuples(st.integers(-1, 40), st.integers(-1, 40))))
    return dict(
        shape=(b, h, hkv, lq, lk, d, dv), dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        mask=mask, mask_dims=mask_dims, causal=draw(st.booleans()), window=window,
        alibi=draw(st.sampled_from([None, "per_head", "per_batch"])), dropout_p=draw(_DROPOUT),
        scale=draw(st.sampled_from([None, 0.3])), seed=draw(st.integers(0, 2 ** 31 - 1)), order=draw(_ORDERS))


def _attention_inputs(case):
    b, h, hkv, lq, lk, d, dv = case["shape"]
    dtype, layout = case["dtype"], case["layout"]
    gen = torch.Generator().manual_seed(case["seed"])
    q = _tensor(gen, (b, h, lq, d), dtype, layout)
    k = _tensor(gen, (b, hkv, lk, d), dtype, layout)
    v = _tensor(gen, (b, hkv, lk, dv), dtype, layout)
    mshape = tuple(n if keep else 1 for n, keep in zip((b, h, lq), case["mask_dims"])) + (lk,)
    if case["mask"] == "bool":  # some rows see no key at all
        m = (torch.rand(mshape, generator=gen) < 0.6).to(DEVICE)
        if lq > 2 and mshape[2] > 1:
            m[..., 1, :] = False
    elif case["mask"].startswith("float"):  # a bias with -inf entries, and a row of finfo.min padding
        m = rand(mshape, dtype, DEVICE, generator=gen)
        m[torch.rand(mshape, generator=gen).to(DEVICE) < 0.15] = float("-inf")
        if mshape[2] > 1:
            m[..., 0, :] = torch.finfo(dtype).min
    else:
        m = None
    alibi = None
    if case["alibi"] == "per_head":
        alibi = (torch.rand((h,), generator=gen) * 0.5).to(DEVICE)
    elif case["alibi"] == "per_batch":
        alibi = (torch.rand((b, h), generator=gen) * 0.5).to(DEVICE)
    dout = rand((b, h, lq, dv), dtype, DEVICE, generator=gen)
    return q, k, v, m, alibi, dout


def _check_attention(backend, case):
    sdpa = _sdpa(backend)
    q, k, v, m, alibi, dout = _attention_inputs(case)
    p, seed = case["dropout_p"], case["seed"]
    args = (p, case["causal"], case["scale"], q.shape[1] != k.shape[1], alibi, case["window"])
    b, h, lq, _ = q.shape

    def fn(q, k, v, m, backend, **kw):
        if backend == "ref":
            p, causal, scale, gqa, alibi, window = args
            return reference.scaled_dot_product_attention(q, k, v, m, p, causal, scale, gqa,
                                                          alibi_slopes=alibi, window_size=window,
                                                          dropout_mask=keep, **kw)
        torch.manual_seed(seed)  # the seed draw that _dropout_keep reproduced
        return sdpa(q, k, v, m, *args)

    # a constant float mask (no gradient asked for) goes in as a non-leaf constant
    inputs = [q, k, v] + ([m] if case["mask"] != "float" else [])
    call = fn if case["mask"] != "float" else (lambda q, k, v, backend, **kw: fn(q, k, v, m, backend, **kw))
    with _running(backend, case["order"]):
        shape = (b, h, lq, k.shape[2])
        keep = _dropout_keep(backend, p, seed, shape, _attention_mask_of(p, shape))
        _assume_scores_matter(backend, call, inputs, [dout], case["dtype"], p)
        compare_to_reference(call, inputs, [dout], case["dtype"], f"attention {case}", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_fuzz(backend):
    _fuzz(backend, attention_cases(), _check_attention)


@st.composite
def layer_norm_cases(draw):
    rows = draw(st.sampled_from([(1,), (17,), (3, 5), (2, 1, 7)]))
    norm = draw(st.sampled_from([(1,), (7,), (97,), (768,), (1000,), (4, 24), (2, 3, 16)]))
    return dict(
        rows=rows, norm=norm, dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(["contiguous", "strided", "row_slice"])),
        weight=draw(st.booleans()), bias=draw(st.booleans()),
        residual=draw(st.booleans()), input_bias=draw(st.booleans()),
        mixed=draw(st.booleans()),  # add_layer_norm, 16-bit input: fp32 residual and parameters
        return_residual=draw(st.booleans()), dropout_p=draw(_DROPOUT),  # dropout: add_layer_norm only
        eps=draw(st.sampled_from([1e-5, 1e-12, 0.1])),
        scale=draw(st.sampled_from([1.0, 30.0])), seed=draw(st.integers(0, 2 ** 31 - 1)), order=draw(_ORDERS))


def _ln_input(shape, dtype, layout, gen, scale):
    if layout == "row_slice":  # every other row of a twice-as-long leading dim
        full = rand((2 * shape[0],) + tuple(shape[1:]), dtype, DEVICE, generator=gen, scale=scale)
        return full[::2]
    return rand(shape, dtype, DEVICE, generator=gen, scale=scale, noncontiguous=(layout == "strided"))


def _check_layer_norm(backend, case):
    """layer_norm, and add_layer_norm when the case has a residual (with dropout on the input
    branch, against the kernel's exact keep-mask)."""
    layer_norm, add_layer_norm = _layer_norm(backend), _add_layer_norm(backend)
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, norm, eps = case["dtype"], case["norm"], case["eps"]
    shape = case["rows"] + norm
    x = _ln_input(shape, dtype, case["layout"], gen, case["scale"])
    dy = rand(shape, dtype, DEVICE, generator=gen)
    name = f"layer_norm {case}"
    pdt = dtype  # of the parameters (and the residual)
    if case["residual"]:  # add_layer_norm normalizes the last dim (the others become rows)
        norm = norm[-1:]
        if case["mixed"]:  # mixed precision: a 16-bit matmul output, an fp32 residual stream
            pdt = torch.float32
    w = rand(norm, pdt, DEVICE, generator=gen) if case["weight"] else None
    b = rand(norm, pdt, DEVICE, generator=gen) if case["bias"] else None
    if not case["residual"]:
        def fn(x, w, b, backend, **kw):
            if backend == "ref":
                return reference.layer_norm(x, norm, w, b, eps, **kw)
            return layer_norm(x, norm, w, b, eps)
        with _running(backend, case["order"]):
            compare_to_reference(fn, [x, w, b], [dy], dtype, name, backend=backend)
        return
    r = _ln_input(shape, pdt, case["layout"], gen, case["scale"])
    xb = rand(norm, pdt, DEVICE, generator=gen) if case["input_bias"] else None
    ret, p, seed = case["return_residual"], case["dropout_p"], case["seed"]

    def fn(x, r, w, b, xb, backend, **kw):
        if backend == "ref":
            return reference.add_layer_norm(x, r, w, b, eps, input_bias=xb, dropout_p=p, return_residual=ret,
                                            dropout_mask=keep, **kw)
        torch.manual_seed(seed)  # the seed draw that _dropout_keep reproduced
        return add_layer_norm(x, r, w, b, eps, xb, p, ret)
    dys = [dy.to(pdt), rand(shape, pdt, DEVICE, generator=gen)] if ret else [dy.to(pdt)]
    with _running(backend, case["order"]):
        keep = _dropout_keep(backend, p, seed, shape, _layer_norm_mask_of(p, shape), layer_norm_ops)
        compare_to_reference(fn, [x, r, w, b, xb], dys, dtype, name, backend=backend)


def _layer_norm_mask_of(p, shape):
    """The Triton add_layer_norm kernels' mask of a seed over ``shape`` (rows of its last dim)."""
    from fastbert.kernels.layer_norm import dropout_keep_mask

    return lambda s: dropout_keep_mask(s, shape, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_fuzz(backend):
    _fuzz(backend, layer_norm_cases(), _check_layer_norm)


@st.composite
def gelu_cases(draw):
    return dict(
        shape=draw(st.sampled_from([(1,), (5, 1), (17, 97), (3, 4, 768), (2, 1000)])),
        dtype=draw(st.sampled_from(DTYPES)), approximate=draw(st.sampled_from(["none", "tanh"])),
        bias=draw(st.booleans()), layout=draw(st.sampled_from(["contiguous", "strided", "row_slice"])),
        scale=draw(st.sampled_from([1.0, 4.0])), seed=draw(st.integers(0, 2 ** 31 - 1)), order=draw(_ORDERS))


def _check_bias_gelu(backend, case):
    bias_gelu = _bias_gelu(backend)
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, shape, approx = case["dtype"], case["shape"], case["approximate"]
    x = _ln_input(shape, dtype, case["layout"], gen, case["scale"])
    b = rand(shape[-1:], dtype, DEVICE, generator=gen) if case["bias"] else None
    dy = rand(shape, dtype, DEVICE, generator=gen)

    def fn(x, b, backend, **kw):
        if backend == "ref":
            return reference.bias_gelu(x, b, approximate=approx, **kw)
        return bias_gelu(x, b, approx)
    with _running(backend, case["order"]):
        compare_to_reference(fn, [x, b], [dy], dtype, f"bias_gelu {case}", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gelu_fuzz(backend):
    _fuzz(backend, gelu_cases(), _check_bias_gelu)


def _geglu(backend):
    if backend == "emu":
        return lambda x, g, approx: gelu_ops._geglu_cuda(x, g, approx)
    return lambda x, g, approx: fastbert.geglu(x, g, approx, backend=backend)


@st.composite
def geglu_cases(draw):
    return dict(
        shape=draw(st.sampled_from([(1,), (5, 1), (17, 97), (3, 4, 768), (2, 1152)])),
        dtype=draw(st.sampled_from(DTYPES)), approximate=draw(st.sampled_from(["none", "tanh"])),
        form=draw(st.sampled_from(["packed", "gate", "halves"])),
        layout=draw(st.sampled_from(["contiguous", "strided", "row_slice"])),
        scale=draw(st.sampled_from([1.0, 4.0])), seed=draw(st.integers(0, 2 ** 31 - 1)), order=draw(_ORDERS))


def _check_geglu(backend, case):
    """geglu of ``shape`` (the output's): packed (..., 2N), a separate gate, or the two halves of
    one (..., 2N) matrix as input and gate; each operand in the drawn layout."""
    geglu = _geglu(backend)
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, shape, approx, form = case["dtype"], case["shape"], case["approximate"], case["form"]
    wide = tuple(shape[:-1]) + (2 * shape[-1],)
    if form == "gate":
        x = _ln_input(shape, dtype, case["layout"], gen, case["scale"])
        g = _ln_input(shape, dtype, case["layout"], gen, 1.0)
    else:
        x, g = _ln_input(wide, dtype, case["layout"], gen, case["scale"]), None
        if form == "halves":
            x, g = x.chunk(2, dim=-1)
    dy = rand(shape, dtype, DEVICE, generator=gen)

    def fn(x, g, backend, **kw):
        if backend == "ref":
            return reference.geglu(x, g, approx, **kw)
        return geglu(x, g, approx)
    with _running(backend, case["order"]):
        compare_to_reference(fn, [x, g], [dy], dtype, f"geglu {case}", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_geglu_fuzz(backend):
    _fuzz(backend, geglu_cases(), _check_geglu)


@st.composite
def varlen_cases(draw):
    n = draw(st.integers(1, 4))
    lens_q = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    same = draw(st.booleans())  # self-attention: the same lengths for keys
    lens_k = lens_q if same else draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    hkv = draw(st.sampled_from([1, 2]))
    return dict(
        lens_q=lens_q, lens_k=lens_k, h=hkv * draw(st.sampled_from([1, 2])), hkv=hkv,
        d=draw(st.sampled_from([16, 40, 64, 80])), dtype=draw(st.sampled_from(DTYPES)),
        strided=draw(st.booleans()), causal=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.tuples(st.integers(-1, 20), st.integers(-1, 20)))),
        alibi=draw(st.sampled_from([None, "per_head", "per_sequence"])), dropout_p=draw(_DROPOUT),
        scale=draw(st.sampled_from([None, 0.3])), seed=draw(st.integers(0, 2 ** 31 - 1)))


def _check_varlen_attention(backend, case):
    """Packed sequences of random lengths (empty ones included), per-sequence causal / window /
    ALiBi, grouped-query heads, strided token rows, dropout; the Triton backend (the only one with
    varlen)."""
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, h, hkv, d = case["dtype"], case["h"], case["hkv"], case["d"]
    hypothesis.assume(sum(case["lens_q"]) > 0 and sum(case["lens_k"]) > 0)

    def cu(lens):
        return torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    cu_q, cu_k = cu(case["lens_q"]), cu(case["lens_k"])
    tq, tk = sum(case["lens_q"]), sum(case["lens_k"])
    q = rand((tq, h, d), dtype, DEVICE, generator=gen, noncontiguous=case["strided"])
    k = rand((tk, hkv, d), dtype, DEVICE, generator=gen, noncontiguous=case["strided"])
    v = rand((tk, hkv, d), dtype, DEVICE, generator=gen, noncontiguous=case["strided"])
    n = len(case["lens_q"])
    alibi = {None: None, "per_head": (h,), "per_sequence": (n, h)}[case["alibi"]]
    if alibi is not None:
        alibi = (torch.rand(alibi, generator=gen) * 0.5).to(DEVICE)
    mq, mk = max(case["lens_q"]), max(case["lens_k"])
    p, seed = case["dropout_p"], case["seed"]
    kwargs = dict(dropout_p=p, is_causal=case["causal"], scale=case["scale"], alibi_slopes=alibi,
                  window_size=case["window"])
    keep = _dropout_keep(backend, p, seed, None, _varlen_masks_of(p, cu_q, cu_k, h, mq, mk))

    def fn(q, k, v, backend, **kw):
        if backend != "ref":
            torch.manual_seed(seed)  # the seed draw that _dropout_keep reproduced
            return fastbert.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, **kwargs, backend=backend)
        return reference.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, **kwargs, dropout_mask=keep,
                                          **kw)
    dys = [rand((tq, h, d), dtype, DEVICE, generator=gen)]
    _assume_scores_matter(backend, fn, [q, k, v], dys, dtype, p)
    compare_to_reference(fn, [q, k, v], dys, dtype, f"varlen_attention {case}", backend=backend)


def _varlen_masks_of(p, cu_q, cu_k, h, max_q, max_k):
    """The varlen Triton kernels' per-sequence masks of a seed (their offsets use max_seqlen_*)."""
    from fastbert.kernels.attention import varlen_attention_dropout_masks

    return lambda s: varlen_attention_dropout_masks(s, p, cu_q, cu_k, h, max_q, max_k)


def test_varlen_attention_fuzz():
    _fuzz("triton", varlen_cases(), _check_varlen_attention)


@st.composite
def varlen_inference_cases(draw):
    n = draw(st.integers(1, 4))
    lens_q = draw(st.lists(st.integers(0, 150), min_size=n, max_size=n))
    lens_k = draw(st.lists(st.integers(0, 150), min_size=n, max_size=n))
    return dict(lens_q=lens_q, lens_k=lens_k, h=draw(st.sampled_from([1, 3])),
                d=draw(st.sampled_from([64, 128])),
                dtype=draw(st.sampled_from([torch.float16, torch.bfloat16])),
                causal=draw(st.booleans()), scale=draw(st.sampled_from([None, 0.3])),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def _check_varlen_inference(backend, case):
    """The CUDA backend's varlen kernel (inference: the fused tensor-core forward over packed
    sequences) on random lengths, sequences without queries or keys included; forward only."""
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, h, d = case["dtype"], case["h"], case["d"]
    hypothesis.assume(sum(case["lens_q"]) > 0 and max(case["lens_k"]) > 0)
    cu_q, cu_k = (torch.tensor([0] + list(itertools.accumulate(case[x])), dtype=torch.int32,
                               device=DEVICE) for x in ("lens_q", "lens_k"))
    q = rand((int(cu_q[-1]), h, d), dtype, DEVICE, generator=gen)
    k, v = (rand((int(cu_k[-1]), h, d), dtype, DEVICE, generator=gen) for _ in range(2))
    args = (cu_q, cu_k, max(case["lens_q"]), max(case["lens_k"]))
    kw = dict(is_causal=case["causal"], scale=case["scale"])
    with _running(backend, "forward"), torch.no_grad():
        if backend == "emu":
            out = attention_ops._varlen_cuda(q, k, v, *args, 0.0, kw["is_causal"], kw["scale"], None, None, None)
        else:
            out = fastbert.varlen_attention(q, k, v, *args, **kw, backend=backend)
    ref = reference.varlen_attention(q.double(), k.double(), v.double(), *args, **kw)
    low = reference.varlen_attention(q, k, v, *args, **kw, compute_dtype=dtype)
    assert_close(out, ref, low, name=f"varlen inference {case}")


def test_varlen_attention_cuda_inference_fuzz():
    _fuzz("cuda" if ON_GPU else "emu", varlen_inference_cases(), _check_varlen_inference)


@st.composite
def block_sparse_cases(draw):
    bs = draw(st.sampled_from([16, 32, 64]))
    return dict(
        b=draw(st.integers(1, 2)), h=draw(st.sampled_from([1, 2, 3])), lq=draw(st.integers(1, 140)),
        lk=draw(st.integers(1, 140)), d=draw(st.sampled_from([16, 40, 64])), block=bs,
        dtype=draw(st.sampled_from(DTYPES)), per_head=draw(st.booleans()),
        density=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])),
        mask=draw(st.sampled_from(["none", "key_padding", "float"])), scale=draw(st.sampled_from([None, 0.3])),
        dropout_p=draw(_DROPOUT), seed=draw(st.integers(0, 2 ** 31 - 1)))


def _check_block_sparse_attention(backend, case):
    """Random layouts (empty, dense and in between, per head or shared; sizes not multiples of the
    block), with no mask, a key-padding mask or a float bias (with -inf entries and a row of
    finfo.min padding), with or without dropout; the Triton backend against the reference, which
    expands the layout into a dense token mask."""
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, lq, lk, d, bs, dtype = (case[x] for x in ("b", "h", "lq", "lk", "d", "block", "dtype"))
    q = rand((b, h, lq, d), dtype, DEVICE, generator=gen)
    k = rand((b, h, lk, d), dtype, DEVICE, generator=gen)
    v = rand((b, h, lk, d), dtype, DEVICE, generator=gen)
    nq, nk = -(-lq // bs), -(-lk // bs)
    layout = (torch.rand((h if case["per_head"] else 1, nq, nk), generator=gen) < case["density"]).to(DEVICE)
    mask = None
    if case["mask"] == "key_padding":
        lengths = torch.randint(0, lk + 1, (b,), generator=gen)
        mask = (torch.arange(lk)[None, :] < lengths[:, None])[:, None, None, :].to(DEVICE)
    elif case["mask"] == "float":  # (1, H, Lq, Lk): a bias, -inf entries, a finfo.min padded row
        mask = rand((1, h, lq, lk), dtype, DEVICE, generator=gen)
        mask[torch.rand((1, h, lq, lk), generator=gen).to(DEVICE) < 0.15] = float("-inf")
        mask[:, :, lq // 2, :] = torch.finfo(dtype).min

    p, seed = case["dropout_p"], case["seed"]
    keep = _dropout_keep(backend, p, seed, None, _block_sparse_mask_of(p, (b, h, lq, lk)))

    def fn(q, k, v, backend, **kw):
        if backend == "ref":
            return reference.block_sparse_attention(q, k, v, layout, bs, mask, p, case["scale"],
                                                    dropout_mask=keep, **kw)
        torch.manual_seed(seed)  # the seed draw that _dropout_keep reproduced
        return fastbert.block_sparse_attention(q, k, v, layout, bs, mask, p, case["scale"], backend=backend)
    dys = [rand((b, h, lq, d), dtype, DEVICE, generator=gen)]
    _assume_scores_matter(backend, fn, [q, k, v], dys, dtype, p)
    compare_to_reference(fn, [q, k, v], dys, dtype, f"block_sparse_attention {case}", backend=backend)


def _block_sparse_mask_of(p, shape):
    """The block-sparse Triton kernels' mask of a seed over (B, H, Lq, Lk)."""
    from fastbert.kernels.block_sparse_attention import block_sparse_attention_dropout_mask

    return lambda s: block_sparse_attention_dropout_mask(s, shape, p)


def test_block_sparse_attention_fuzz():
    _fuzz("triton", block_sparse_cases(), _check_block_sparse_attention)


@st.composite
def linformer_cases(draw):
    d = draw(st.sampled_from([16, 40, 64]))
    return dict(
        b=draw(st.integers(1, 2)), h=draw(st.integers(1, 3)), lq=draw(st.integers(1, 70)),
        lk=draw(st.integers(1, 70)), d=d, dv=draw(st.sampled_from([d, 16, 40])),
        k=draw(st.sampled_from([2, 7, 16, 33, 1])), dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        # (k, Lk) shared by the heads, (H, k, Lk) per head or (1, k, Lk); one tensor for both or two
        proj=draw(st.sampled_from(["shared", "per_head", "one_head"])), same_proj=draw(st.booleans()),
        proj_fp32=draw(st.booleans()), padding=draw(st.booleans()), dropout_p=draw(_DROPOUT),
        scale=draw(st.sampled_from([None, 0.3])), seed=draw(st.integers(0, 2 ** 31 - 1)),
        order=draw(_ORDERS))


def _check_linformer_attention(backend, case):
    """Linformer: projections shared by the heads or per head (or one head broadcast), in the input
    dtype or fp32, the same tensor for keys and values or two; a key-padding mask whose padded
    keys / values hold NaN (they must not reach the projections); dropout on the attention over the
    k projected keys. Gradients of q, k, v and the projection(s).

    A projection's gradient sums B * H * D products (H: for one shared by the heads): it grows
    with their square root (to ~50 here) while the per-dtype floor is sized for values near 1, so
    the tail of the kernels' own error (the backward recomputes P from the saved row statistics:
    on a peaked row up to ~3.5x PyTorch's fp32 error, seen 4.9e-5 > 3.8e-5 at a gradient of 23)
    fails it. The leaves hold the projections times 2^n ~ sqrt(B * H * D) and the op gets them
    times 2^-n (exact in every dtype): their gradients come out near 1, as the others do."""
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, lq, lk, d, dv, kp, dtype = (case[x] for x in ("b", "h", "lq", "lk", "d", "dv", "k", "dtype"))
    q = _tensor(gen, (b, h, lq, d), dtype, case["layout"])
    k = _tensor(gen, (b, h, lk, d), dtype, case["layout"])
    v = _tensor(gen, (b, h, lk, dv), dtype, case["layout"])
    pshape = {"shared": (kp, lk), "per_head": (h, kp, lk), "one_head": (1, kp, lk)}[case["proj"]]
    summed = b * max(d, dv) * (h if case["proj"] != "per_head" else 1)
    unit = 2.0 ** -round(0.5 * math.log2(summed))
    # 1/sqrt(max(Lk, k)): projected keys / values no larger than the inputs, and k / v gradients
    # (sums over the k projected rows) no larger than the dense attention's
    projs = [rand(pshape, dtype, DEVICE, generator=gen, scale=max(lk, kp) ** -0.5 / unit)
             for _ in range(1 if case["same_proj"] else 2)]
    pad = None
    if case["padding"]:  # True = padding; a sequence may be all padding
        lengths = torch.randint(0, lk + 1, (b,), generator=gen)
        pad = (torch.arange(lk)[None, :] >= lengths[:, None]).to(DEVICE)
        k[pad[:, None, :, None].expand_as(k)] = float("nan")
        v[pad[:, None, :, None].expand_as(v)] = float("nan")
    p, seed = case["dropout_p"], case["seed"]
    shape = (b, h, lq, kp)  # the dense attention over the projected keys draws the mask
    linformer = _linformer(backend)

    def fn(q, k, v, e, f=None, *, backend, **kw):
        e, f = _projections(e, e if f is None else f, unit, case["proj_fp32"] and backend != "ref")
        if backend == "ref":
            return reference.linformer_attention(q, k, v, e, f, pad, p, case["scale"],
                                                 dropout_mask=keep, **kw)
        torch.manual_seed(seed)  # the seed draw that _dropout_keep reproduced
        return linformer(q, k, v, e, f, pad, p, case["scale"])
    dys = [rand((b, h, lq, dv), dtype, DEVICE, generator=gen)]
    with _running(backend, case["order"]):
        keep = _dropout_keep(backend, p, seed, shape, _attention_mask_of(p, shape))
        _assume_scores_matter(backend, fn, [q, k, v] + projs, dys, dtype, p)
        compare_to_reference(fn, [q, k, v] + projs, dys, dtype, f"linformer_attention {case}",
                             backend=backend)


def _projections(e, f, unit, fp32):
    """The projections the op gets from the leaves ``e`` and ``f``: times ``unit`` (a power of
    two), in fp32 if ``fp32``; one tensor when ``f`` is ``e``. fp32 projections of low-precision
    inputs hold the leaves' values, and their gradients flow back to those input-dtype leaves: the
    op casts projections to the inputs' dtype and computes their gradients in it, so that dtype's
    tolerance applies (with fp32 leaves the fp32 floor would leave "2x PyTorch's fp16 error" alone,
    which the fp16 gradient exceeds now and then: seen 1.9e-3 > 1.46e-3)."""
    def cast(t):
        t = t * unit
        return t.float() if fp32 else t
    e_op = cast(e)
    return e_op, (e_op if f is e else cast(f))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linformer_attention_fuzz(backend):
    _fuzz(backend, linformer_cases(), _check_linformer_attention)
