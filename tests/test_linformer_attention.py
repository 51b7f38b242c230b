"""fastbert.linformer_attention: the reference against the explicit Linformer formula (values and
gradients, proj_k/proj_v included), padding that must not leak into the projections, per-head and
shared projections, and the Triton path (masked projections + the dense Triton attention kernel)
against the reference in float64."""
import math

import pytest
import torch

import fastbert
from fastbert import reference
from fastbert.backends import BackendError, implementations
from fastbert.testing import DEVICE, assert_close, rand


def explicit_linformer(q, k, v, e, f, pad=None, scale=None, keep=None, p=0.0):
    """The formula, written out per (batch, head): K' = sum over real positions j of
    E[:, j] k_j^T, V' likewise with F; out = softmax(Q K'^T * scale) V' (dropout: P * keep / (1-p))."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = []
    for bi in range(b):
        heads = []
        for hi in range(h):
            eh = e if e.dim() == 2 else e[hi if e.shape[0] > 1 else 0]
            fh = f if f.dim() == 2 else f[hi if f.shape[0] > 1 else 0]
            real = [j for j in range(lk) if pad is None or not bool(pad[bi, j])]
            kp = sum(eh[:, j:j + 1] * k[bi, hi, j][None, :] for j in real) if real else \
                torch.zeros(eh.shape[0], d, dtype=q.dtype) + 0 * eh.sum()
            vp = sum(fh[:, j:j + 1] * v[bi, hi, j][None, :] for j in real) if real else \
                torch.zeros(fh.shape[0], v.shape[-1], dtype=q.dtype) + 0 * fh.sum()
            s = q[bi, hi] @ kp.T * scale
            pr = torch.exp(s - s.max(dim=-1, keepdim=True).values)
            pr = pr / pr.sum(dim=-1, keepdim=True)
            if keep is not None:
                pr = pr * keep[bi, hi].double() / (1.0 - p)
            heads.append(pr @ vp)
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def grads(out, leaves, g):
    return torch.autograd.grad(out, leaves, g, allow_unused=False)


# (name, B, H, Lq, Lk, D, k, projection kind, padding)
REF_CASES = [
    ("shared", 2, 2, 9, 13, 8, 4, "2d", True),
    ("perhead", 2, 3, 7, 11, 8, 5, "3d", True),
    ("one-head-3d", 1, 2, 6, 10, 4, 3, "3d1", False),
    ("same-tensor", 2, 2, 5, 12, 8, 4, "same", True),
]


def make_proj(kind, h, kdim, lk, dtype, device):
    if kind == "2d":
        return rand((kdim, lk), dtype, device), rand((kdim, lk), dtype, device)
    if kind == "3d":
        return rand((h, kdim, lk), dtype, device), rand((h, kdim, lk), dtype, device)
    if kind == "3d1":
        return rand((1, kdim, lk), dtype, device), rand((h, kdim, lk), dtype, device)
    e = rand((h, kdim, lk), dtype, device)
    return e, e  # shared key/value projection: one tensor


def make_pad(b, lk, device, full_row=False):
    lengths = torch.randint(1, lk + 1, (b,))
    lengths[0] = lk // 2
    pad = torch.arange(lk)[None, :] >= lengths[:, None]  # True = padding
    if full_row and b > 1:
        pad[-1] = True  # a sequence that is all padding
    return pad.to(device)


@pytest.mark.parametrize("case", REF_CASES, ids=[c[0] for c in REF_CASES])
@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "dropout"])
def test_reference_matches_formula(case, dropout):
    _, b, h, lq, lk, d, kdim, kind, padded = case
    q, k, v = (rand((b, h, n, d), torch.float64, "cpu", requires_grad=True) for n in (lq, lk, lk))
    e, f = make_proj(kind, h, kdim, lk, torch.float64, "cpu")
    e.requires_grad_(True)
    if f is not e:
        f.requires_grad_(True)
    pad = make_pad(b, lk, "cpu", full_row=True) if padded else None
    p = 0.25 if dropout else 0.0
    keep = torch.rand(b, h, lq, kdim) >= p if dropout else None
    leaves = [q, k, v, e] + ([f] if f is not e else [])
    got = reference.linformer_attention(q, k, v, e, f, pad, p, 0.3, dropout_mask=keep)
    want = explicit_linformer(q, k, v, e, f, pad, 0.3, keep, p)
    assert_close(got, want, atol=1e-12)
    g = torch.randn_like(got)
    for n, a, r in zip(("dq", "dk", "dv", "dproj_k", "dproj_v"), grads(got, leaves, g),
                       grads(want, leaves, g)):
        assert_close(a, r, atol=1e-12, name=n)


def test_padding_does_not_leak_reference_and_torch_backend():
    b, h, lq, lk, d, kdim = 2, 2, 9, 17, 8, 4
    q, k, v = (rand((b, h, n, d), torch.float64, "cpu") for n in (lq, lk, lk))
    e, f = make_proj("3d", h, kdim, lk, torch.float64, "cpu")
    pad = make_pad(b, lk, "cpu")
    k2, v2 = k.clone(), v.clone()
    k2[pad[:, None, :, None].expand_as(k2)] = 1e3  # change every padded value
    v2[pad[:, None, :, None].expand_as(v2)] = -7.0
    for fn in (reference.linformer_attention,
               lambda *a: fastbert.linformer_attention(*a, backend="torch")):
        assert torch.equal(fn(q, k, v, e, f, pad), fn(q, k2, v2, e, f, pad))
    kk, vv = k.clone().requires_grad_(True), v.clone().requires_grad_(True)
    out = reference.linformer_attention(q, kk, vv, e, f, pad)
    dk, dv = torch.autograd.grad(out, (kk, vv), torch.randn_like(out))
    padded = pad[:, None, :, None].expand_as(dk)
    assert (dk[padded] == 0).all() and (dv[padded] == 0).all()


@pytest.mark.parametrize("call,exc,words", [
    ("proj_shape", ValueError, "proj_k must have shape"),
    ("k_mismatch", ValueError, "same k"),
    ("pad_dtype", TypeError, "key_padding_mask must be a bool"),
    ("pad_shape", ValueError, "key_padding_mask must have shape"),
])
def test_validation(call, exc, words):
    q = rand((2, 2, 5, 8), device="cpu")
    e = f = rand((3, 5), device="cpu")
    pad = None
    if call == "proj_shape":
        e = rand((3, 6), device="cpu")
    elif call == "k_mismatch":
        f = rand((4, 5), device="cpu")
    elif call == "pad_dtype":
        pad = torch.zeros(2, 5)
    elif call == "pad_shape":
        pad = torch.zeros(2, 6, dtype=torch.bool)
    with pytest.raises(exc, match=words):
        fastbert.linformer_attention(q, q, q, e, f, pad)


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------
def require_dense_triton():
    if "triton" not in implementations("scaled_dot_product_attention"):
        pytest.skip("the dense Triton attention (scaled_dot_product_attention, backend 'triton') "
                    "is not registered yet; the Triton Linformer runs on it")


# (name, B, H, Lq, Lk, D, k, projection kind, dtype, proj dtype)
TRITON_CASES = [
    ("shared-fp32", 2, 2, 97, 130, 40, 16, "2d", torch.float32, torch.float32),
    ("perhead-fp16", 2, 3, 33, 97, 64, 24, "3d", torch.float16, torch.float16),
    ("same-tensor-fp16-fp32proj", 1, 2, 17, 70, 80, 16, "same", torch.float16, torch.float32),
]


# bf16: GPU only (the interpreter's tl.dot is wrong on bf16); the CUDA backend needs a GPU
FAST_CASES = [pytest.param(c, id=c[0]) for c in TRITON_CASES] + [
    pytest.param(("perhead-bf16", 2, 4, 130, 300, 64, 32, "3d", torch.bfloat16, torch.bfloat16),
                 id="perhead-bf16", marks=pytest.mark.cuda)]
FAST_BACKENDS = [pytest.param("triton", id="triton"),
                 pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", FAST_CASES)
def test_fast_backend_matches_reference(case, backend):
    if backend == "triton":
        require_dense_triton()
    _, b, h, lq, lk, d, kdim, kind, dtype, pdtype = case
    q, k, v = (rand((b, h, n, d), dtype) for n in (lq, lk, lk))
    e, f = make_proj(kind, h, kdim, lk, pdtype, DEVICE)
    e, f = e / math.sqrt(lk), (e / math.sqrt(lk) if f is e else f / math.sqrt(lk))
    pad = make_pad(b, lk, DEVICE)
    # padded positions hold NaN for the kernel path: they must not reach the projections
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[pad[:, None, :, None].expand_as(k)] = float("nan")
    v_nan[pad[:, None, :, None].expand_as(v)] = float("nan")
    projs = [e] if f is e else [e, f]

    def leaves_of(ts, cast=None):
        return [(t.detach().to(cast) if cast else t.detach().clone()).requires_grad_(True) for t in ts]

    tk = leaves_of([q, k_nan, v_nan] + projs)
    ref = leaves_of([q, k, v] + projs, torch.float64)
    low = leaves_of([q, k, v] + projs)

    def call(fn, ls, **kw):
        ee = ls[3]
        ff = ls[3] if f is e else ls[4]
        return fn(ls[0], ls[1], ls[2], ee, ff, pad, 0.0, 0.2, **kw)

    out = call(fastbert.linformer_attention, tk, backend=backend)
    out_ref = call(reference.linformer_attention, ref)
    out_low = call(reference.linformer_attention, low, compute_dtype=dtype)
    assert out.dtype == dtype
    assert_close(out, out_ref, out_low, name="out")
    g = torch.randn(out.shape, device=DEVICE).to(dtype)  # the same upstream gradient for all
    names = ["dq", "dk", "dv", "dproj_k"] + ([] if f is e else ["dproj_v"])
    for n, a, r, lo in zip(names, grads(out, tk, g), grads(out_ref, ref, g.double()),
                           grads(out_low, low, g)):
        assert torch.isfinite(a).all(), n
        if n in ("dk", "dv"):
            assert (a[pad[:, None, :, None].expand_as(a)] == 0).all(), f"{n} leaks into padding"
        assert_close(a, r, lo, name=n)


def test_triton_dropout_is_the_dense_kernels():
    """With dropout, the Triton Linformer equals the dense Triton attention (same seed from torch's
    generator) over the explicitly projected keys and values; and manual_seed reproduces it."""
    require_dense_triton()
    b, h, lq, lk, d, kdim, p = 2, 2, 40, 50, 32, 16, 0.3
    q, k, v = (rand((b, h, n, d)) for n in (lq, lk, lk))
    e, f = (t / math.sqrt(lk) for t in make_proj("3d", h, kdim, lk, torch.float32, DEVICE))
    pad = make_pad(b, lk, DEVICE)
    torch.manual_seed(11)
    out = fastbert.linformer_attention(q, k, v, e, f, pad, p, backend="triton")
    torch.manual_seed(11)
    again = fastbert.linformer_attention(q, k, v, e, f, pad, p, backend="triton")
    assert torch.equal(out, again)
    keep = (~pad)[:, None, :, None]
    kp = torch.einsum("hkl,bhld->bhkd", e, torch.where(keep, k, 0.0))
    vp = torch.einsum("hkl,bhld->bhkd", f, torch.where(keep, v, 0.0))
    torch.manual_seed(11)
    dense = fastbert.scaled_dot_product_attention(q, kp, vp, dropout_p=p, backend="triton")
    assert_close(out, dense, atol=1e-4)  # projections by matmul vs einsum; another mask: O(1)
    nodrop = fastbert.linformer_attention(q, k, v, e, f, pad, backend="triton")
    assert not torch.allclose(out, nodrop)


def test_triton_reasons(monkeypatch):
    import importlib

    lin = importlib.import_module("fastbert.ops.linformer_attention")  # the module, not the function

    q = rand((1, 2, 9, 16))
    e = rand((4, 9))
    # without the dense Triton kernel the reason says so
    monkeypatch.setattr(lin, "_dense_triton", lambda: None)
    with pytest.raises(BackendError, match="dense Triton attention kernel.*not registered"):
        fastbert.linformer_attention(q, q, q, e, e, backend="triton")
    out = fastbert.linformer_attention(q, q, q, e, e)  # auto falls back to torch
    assert out.shape == q.shape
    monkeypatch.undo()
    require_dense_triton()
    # the dense kernel's own limits come back naming the projected keys
    q64 = q.double()
    with pytest.raises(BackendError, match="projected keys"):
        fastbert.linformer_attention(q64, q64, q64, e.double(), e.double(), backend="triton")


@pytest.mark.parametrize("scale_e,scale_kv", [(1e5, 1e-2), (1e-6, 1e3)], ids=["large-proj", "tiny-proj"])
def test_triton_fp32_projections_of_fp16_keys_are_not_rounded(scale_e, scale_kv):
    """fp32 projections of fp16 keys/values are applied in fp32 (as the reference), not rounded to
    fp16 first: 1e5 overflowed to inf (NaN output), 1e-6 fell in fp16's subnormals (3e-2 error).

    The projected keys and values (up to ~1e4 here) then feed fp16 attention, so the error allowed
    is that of fp16 attention over them (projected in fp32, rounded once to fp16) plus one fp16 ulp
    of the output's scale: measured against attention with fp32 projected keys instead, a near tie
    between two scores of ~1e4 failed ~5% of seeds (rounding a key moves its score by several
    units). Rounding the projection matrix to fp16 first still fails by a factor of 3 or more."""
    require_dense_triton()
    b, h, lq, lk, d, kdim = 1, 2, 24, 64, 16, 4
    q = rand((b, h, lq, d), torch.float16)
    k, v = ((rand((b, h, lk, d)) * scale_kv).half() for _ in range(2))
    e, f = (rand((kdim, lk)) * scale_e for _ in range(2))
    out = fastbert.linformer_attention(q, k, v, e, f, backend="triton")
    ref = reference.linformer_attention(*(t.double() for t in (q, k, v, e, f)))
    k_proj, v_proj = ((p @ x.float()).half() for p, x in ((e, k), (f, v)))
    low = reference.scaled_dot_product_attention(q, k_proj, v_proj)
    assert torch.isfinite(out).all()
    assert_close(out, ref, low, atol=ref.abs().max().item() * 2.0 ** -10, name="out")


# (name, dtype, dropout p); B 3, H 2, Lq 33, Lk 40, D 40, k 16
TRITON_VIEW_CASES = [("fp32", torch.float32, 0.0), ("fp16", torch.float16, 0.0),
                     ("fp32-p0.3", torch.float32, 0.3)]


@pytest.mark.parametrize("name,dtype,p", TRITON_VIEW_CASES, ids=[c[0] for c in TRITON_VIEW_CASES])
def test_triton_views_all_padding_sequence_and_dropout(name, dtype, p, fresh_seed):
    """The Triton path on (B, L, H, D) tensors viewed as (B, H, L, D), with a sequence that is all
    padding (its padded keys / values NaN) and one partly padded; with dropout, the exact keep-mask
    of the dense kernel over the k projected keys: the output (0 for the all-padding sequence) and
    the gradients of q, k, v and both projections against fp64, one upstream gradient for all."""
    require_dense_triton()
    from fastbert._rng import dropout_seed
    from fastbert.kernels.attention import attention_dropout_mask

    b, h, lq, lk, d, kdim = 3, 2, 33, 40, 40, 16
    q, k, v = (rand((b, n, h, d), dtype) for n in (lq, lk, lk))  # stored (B, L, H, D)
    e, f = rand((h, kdim, lk), dtype) / math.sqrt(lk), rand((kdim, lk), dtype) / math.sqrt(lk)
    pad = torch.zeros((b, lk), dtype=torch.bool, device=DEVICE)
    pad[1] = True
    pad[2, 25:] = True
    padded = pad[:, :, None, None].expand_as(k)
    k_nan, v_nan = k.masked_fill(padded, float("nan")), v.masked_fill(padded, float("nan"))
    keep = None
    if p:
        torch.manual_seed(fresh_seed)  # the one draw of the call: the dense kernel's seed
        keep = attention_dropout_mask(dropout_seed(p, q.device), p, (b, h, lq, kdim))

    def call(fn, ls, **kw):  # q, k, v as (B, H, L, D) views of the (B, L, H, D) leaves
        return fn(*(t.transpose(1, 2) for t in ls[:3]), *ls[3:], pad, p, None, **kw)

    def leaves(ts, cast=None):
        return [(t.detach().to(cast) if cast else t.detach().clone()).requires_grad_(True) for t in ts]

    ours = leaves([q, k_nan, v_nan, e, f])
    ref, low = leaves([q, k, v, e, f], torch.float64), leaves([q, k, v, e, f])
    torch.manual_seed(fresh_seed)
    out = call(fastbert.linformer_attention, ours, backend="triton")
    out_ref = call(reference.linformer_attention, ref, dropout_mask=keep)
    out_low = call(reference.linformer_attention, low, dropout_mask=keep, compute_dtype=dtype)
    assert out.dtype == dtype and (out[1] == 0).all()
    assert_close(out, out_ref, out_low, name="out")
    g = rand(out.shape, dtype)
    for n, a, r, lo in zip(("dq", "dk", "dv", "dproj_k", "dproj_v"), grads(out, ours, g),
                           grads(out_ref, ref, g.double()), grads(out_low, low, g)):
        assert torch.isfinite(a).all(), n
        if n in ("dk", "dv"):
            assert (a[padded] == 0).all(), f"{n} leaks into padding"
        assert_close(a, r, lo, name=n)
