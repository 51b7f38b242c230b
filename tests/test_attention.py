"""Triton backend of fastbert.scaled_dot_product_attention and fastbert.varlen_attention.

Every check runs the kernel (forward and backward, with one upstream gradient) against
fastbert.reference in float64, with the FlashAttention rule of fastbert.testing.assert_close: the
kernel's error is at most twice that of the reference computed in the input dtype
(``compute_dtype=dtype``), plus the per-dtype floor. Without a GPU the kernels run under the
Triton interpreter (small, awkward shapes); ``@pytest.mark.cuda`` tests add large shapes, bf16 and
head dim 256 on a GPU.
"""
from __future__ import annotations

import itertools
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import reference
from fastbert.backends import BackendError, interpreter_enabled
from fastbert.ops.attention import _cuda_ops
from fastbert.testing import (DEVICE, assert_close, assert_fresh_replays, compare_to_reference,
                              cuda_graph_replays, forbid_int64_host_reads, leaf_like, poison_cuda_cache,
                              rand)

kernels = pytest.importorskip("fastbert.kernels.attention")

# Under the interpreter, numpy reports inf / NaN arising anywhere inside a kernel (even in rows
# that are never stored) as a RuntimeWarning: make it an error.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _case_id(b, h, lq, lk, d, dtype, causal=False, extra=""):
    s = f"B{b}-H{h}-Lq{lq}-Lk{lk}-D{d}-{DTYPE_NAMES[dtype]}"
    if causal:
        s += "-causal"
    return s + (f"-{extra}" if extra else "")


def _leaves(b, h, lq, lk, d, dv, dtype, layout, hkv=None):
    """q, k, v leaves in their storage layout; ``_views`` turns them into (B, H, L, D). ``hkv``:
    key / value heads (grouped-query attention), default ``h``."""
    hkv = h if hkv is None else hkv
    if layout == "blhd":  # (B, L, H, D) storage, the layout a fused QKV projection produces
        shapes = [(b, lq, h, d), (b, lk, hkv, d), (b, lk, hkv, dv)]
    else:
        shapes = [(b, h, lq, d), (b, hkv, lk, d), (b, hkv, lk, dv)]
    return [rand(s, dtype, requires_grad=True, noncontiguous=(layout == "strided")) for s in shapes]


def _views(leaves, layout):
    return [t.transpose(1, 2) for t in leaves] if layout == "blhd" else list(leaves)


def _clone_leaf(t, dtype=None):
    if t is None:
        return None
    c = t.detach().clone() if dtype is None else t.detach().to(dtype)
    return c.requires_grad_(t.requires_grad)


def _run_sdpa(leaves, layout, mask, causal, dropout_p=0.0, scale=None, gqa=False,
              backend="triton", alibi=None, window=None):
    q, k, v = _views(leaves, layout)
    return fastbert.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                 is_causal=causal, scale=scale, enable_gqa=gqa,
                                                 alibi_slopes=alibi, window_size=window,
                                                 backend=backend)


def _grads(out, leaves, mask, dout):
    wrt = list(leaves) + ([mask] if mask is not None and mask.requires_grad else [])
    return torch.autograd.grad(out, wrt, dout)


def _check_sdpa(leaves, layout, mask=None, causal=False, dropout_p=0.0, dropout_mask=None,
                scale=None, gqa=False, backend="triton", alibi=None, window=None, fast_mask=None):
    """Output and every gradient (q, k, v, and the mask when it requires grad) vs fp64.
    ``fast_mask``: what fastbert gets as ``attn_mask`` in place of ``mask`` (e.g. torch's causal-bias
    object, whose meaning ``mask`` spells out for the reference)."""
    dtype = leaves[0].dtype
    out = _run_sdpa(leaves, layout, mask if fast_mask is None else fast_mask, causal, dropout_p,
                    scale, gqa, backend, alibi, window)
    dout = rand(out.shape, dtype)
    grads = _grads(out, leaves, mask, dout)

    mask_dtype64 = torch.float64 if mask is not None and mask.is_floating_point() else None
    ref_leaves = [_clone_leaf(t, torch.float64) for t in leaves]
    ref_mask = _clone_leaf(mask, mask_dtype64)
    ref = reference.scaled_dot_product_attention(
        *_views(ref_leaves, layout), ref_mask, dropout_p, causal, scale, gqa,
        alibi_slopes=None if alibi is None else alibi.double(), window_size=window,
        dropout_mask=dropout_mask)
    ref_grads = _grads(ref, ref_leaves, ref_mask, dout.double())

    low_leaves = [_clone_leaf(t) for t in leaves]
    low_mask = _clone_leaf(mask)
    low = reference.scaled_dot_product_attention(*_views(low_leaves, layout), low_mask, dropout_p,
                                                 causal, scale, gqa, alibi_slopes=alibi,
                                                 window_size=window, dropout_mask=dropout_mask,
                                                 compute_dtype=dtype)
    low_grads = _grads(low, low_leaves, low_mask, dout)

    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, low, name="out")
    for name, g, r, lo in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads, low_grads):
        assert g.dtype == (mask.dtype if name == "dmask" else dtype)
        assert_close(g, r, lo, name=name)
    return out, grads


# ----------------------------------------------------------------------------------------------
# dense: shapes, layouts, dtypes
# ----------------------------------------------------------------------------------------------
F16, F32 = torch.float16, torch.float32
SHAPES = [
    # b, h, lq, lk, d, dv, dtype, causal, layout
    (1, 1, 1, 1, 16, 16, F32, False, "bhld"),
    (2, 3, 17, 17, 40, 40, F16, False, "bhld"),
    (2, 3, 17, 130, 80, 80, F16, True, "bhld"),      # causal with Lq < Lk
    (1, 2, 130, 17, 96, 96, F32, True, "bhld"),      # causal with Lq > Lk: rows past Lk see all keys
    (2, 2, 97, 97, 64, 64, F16, True, "blhd"),      # (B, L, H, D).transpose(1, 2), no copy
    (1, 2, 97, 130, 128, 128, F32, False, "blhd"),
    (2, 1, 130, 1, 40, 40, F16, False, "bhld"),
    (1, 2, 1, 97, 80, 80, F32, True, "bhld"),
    (1, 2, 17, 33, 40, 80, F16, False, "bhld"),      # value head dim != query head dim
    (2, 2, 33, 17, 96, 96, F16, True, "strided"),   # every tensor has a last-dim stride of 2
    (1, 3, 17, 97, 24, 24, F32, False, "strided"),
    (1, 1, 17, 20, 160, 160, F16, True, "bhld"),     # padded to BLOCK_D = 256
    (1, 1, 20, 17, 256, 256, F32, False, "blhd"),
]


@pytest.mark.parametrize(
    "b,h,lq,lk,d,dv,dtype,causal,layout",
    [pytest.param(*s, id=_case_id(*s[:5], s[6], s[7], s[8] + (f"-Dv{s[5]}" if s[5] != s[4] else "")))
     for s in SHAPES])
def test_sdpa_shapes(b, h, lq, lk, d, dv, dtype, causal, layout):
    leaves = _leaves(b, h, lq, lk, d, dv, dtype, layout)
    out, _ = _check_sdpa(leaves, layout, causal=causal)
    if layout == "blhd" and h > 1 and lq > 1:  # the output keeps the (B, L, H, D) storage
        assert out.transpose(1, 2).is_contiguous()


GQA_SHAPES = [
    # b, h, hkv, lq, lk, d, dtype, causal, layout
    (2, 4, 2, 17, 33, 40, F16, False, "bhld"),
    (1, 6, 1, 33, 17, 64, F32, True, "blhd"),      # multi-query: one key / value head
    (2, 4, 2, 17, 97, 80, F16, True, "strided"),
    (1, 6, 3, 20, 20, 96, F32, False, "blhd"),
]


@pytest.mark.parametrize(
    "b,h,hkv,lq,lk,d,dtype,causal,layout",
    [pytest.param(*s, id=_case_id(s[0], s[1], s[3], s[4], s[5], s[6], s[7], f"Hkv{s[2]}-{s[8]}"))
     for s in GQA_SHAPES])
def test_sdpa_gqa(b, h, hkv, lq, lk, d, dtype, causal, layout):
    """Grouped-query attention (enable_gqa): key / value read in place; dk / dv sum over each
    group's query heads inside the kernel."""
    leaves = _leaves(b, h, lq, lk, d, d, dtype, layout, hkv=hkv)
    _, grads = _check_sdpa(leaves, layout, causal=causal, gqa=True)
    assert grads[1].shape == leaves[1].shape and grads[2].shape == leaves[2].shape


@pytest.mark.parametrize("shape_code", ["B11K", "1HQK", "BHQK"])
def test_sdpa_gqa_with_masks_and_dropout(shape_code, fresh_seed):
    """GQA with a trainable bias (per query head, or broadcast) and dropout, exact against the
    reference with the kernel's keep-mask (drawn per query head)."""
    b, h, hkv, lq, lk, d, p = 2, 4, 2, 17, 33, 16, 0.3
    leaves = _leaves(b, h, lq, lk, d, d, F32, "bhld", hkv=hkv)
    mask = (_make_mask("float", _mask_shape(shape_code, b, h, lq, lk), F32) * 0.5).requires_grad_()
    q, k, v = (t.detach() for t in leaves)
    torch.manual_seed(fresh_seed)
    _, _, seed = torch.ops.fastbert.attention_fwd(q, k, v, mask.detach(), p, False, d ** -0.5)
    keep = kernels.attention_dropout_mask(seed, p, (b, h, lq, lk))
    torch.manual_seed(fresh_seed)
    _, grads = _check_sdpa(leaves, "bhld", mask=mask, dropout_p=p, dropout_mask=keep, gqa=True)
    assert grads[3].shape == mask.shape


def test_sdpa_gqa_arguments():
    q = rand((1, 4, 5, 16))
    k3, k2 = rand((1, 3, 5, 16)), rand((1, 2, 5, 16))
    with pytest.raises(ValueError, match="enable_gqa=True"):
        fastbert.scaled_dot_product_attention(q, k2, k2, backend="triton")
    with pytest.raises(ValueError, match="divide"):
        fastbert.scaled_dot_product_attention(q, k3, k3, enable_gqa=True, backend="triton")
    with pytest.raises(TypeError, match="enable_gqa"):
        fastbert.scaled_dot_product_attention(q, k2, k2, enable_gqa=1, backend="triton")
    # equal head counts with enable_gqa=True are plain attention, as in torch
    out = fastbert.scaled_dot_product_attention(q, q, q, enable_gqa=True, backend="triton")
    ref = reference.scaled_dot_product_attention(q.double(), q.double(), q.double())
    assert_close(out, ref, name="out")


def _coded_mask(code, b, h, lq, lk, dtype):
    """None, or the mask a code such as "boolB11K" / "float1HQK" names (kind + shape code); a
    float mask requires grad, so its gradient is checked too."""
    if code is None:
        return None
    kind, shape_code = code[:-4], code[-4:]
    mask = _make_mask(kind, _mask_shape(shape_code, b, h, lq, lk), dtype)
    return mask.requires_grad_() if kind == "float" else mask


def _slopes(shape):
    """ALiBi slopes of the usual geometric kind (2^(-8 i / H)), per head or per (batch, head)."""
    h = shape[-1]
    base = torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], device=DEVICE)
    return base.expand(shape).contiguous() * (1 + 0.1 * torch.rand(shape, device=DEVICE))


ALIBI = [
    # b, h, hkv, lq, lk, d, dtype, causal, layout, slopes shape code, mask
    (2, 3, 3, 17, 33, 40, F16, False, "bhld", "H", None),
    (2, 3, 3, 33, 17, 64, F32, True, "blhd", "BH", "boolB11K"),
    (1, 4, 2, 20, 97, 80, F16, True, "bhld", "H", "float1HQK"),     # + GQA, trainable broadcast bias
    (2, 2, 2, 17, 17, 16, F32, False, "strided", "BH", "floatBHQK"),
]


@pytest.mark.parametrize(
    "b,h,hkv,lq,lk,d,dtype,causal,layout,slopes,mask_code",
    [pytest.param(*a, id=_case_id(a[0], a[1], a[3], a[4], a[5], a[6], a[7],
                                  f"alibi{a[9]}-{a[8]}" + (f"-Hkv{a[2]}" if a[2] != a[1] else "")
                                  + (f"-{a[10]}" if a[10] else ""))) for a in ALIBI])
def test_sdpa_alibi(b, h, hkv, lq, lk, d, dtype, causal, layout, slopes, mask_code):
    """ALiBi computed in the kernels (no bias tensor), against the reference's explicit bias:
    output, dq / dk / dv, and the gradient of a float mask given beside it."""
    leaves = _leaves(b, h, lq, lk, d, d, dtype, layout, hkv=hkv)
    mask = _coded_mask(mask_code, b, h, lq, lk, dtype)
    alibi = _slopes((h,) if slopes == "H" else (b, h))
    _check_sdpa(leaves, layout, mask=mask, causal=causal, gqa=hkv != h, alibi=alibi)


@pytest.mark.parametrize("cause", ["alibi", "large_logits"])
def test_sdpa_keys_past_lk_stay_finite(cause):
    """Lk below one key block, with real scores far below 0 (steep ALiBi slopes; q and k pointing
    apart): the key slots past Lk in the dK / dV kernel's tile (score 0, as k loads as 0)
    lie far above the rows' real scores, so unless they are cut their P = exp2(s - m) overflows
    the fp16 cast (under the interpreter numpy's overflow warning is an error here; compiled it
    would be inf in rows never stored). Found by tests/test_fuzz.py."""
    if cause == "alibi":
        leaves = _leaves(1, 2, 22, 1, 96, 96, F16, "strided", hkv=1)
        _check_sdpa(leaves, "strided", gqa=True, alibi=torch.tensor([1.0, 0.5], device=DEVICE))
        return
    b, h, lq, lk, d = 1, 2, 40, 5, 64
    q = (rand((b, h, lq, d), F32).abs() * 4).to(F16)     # q . k ~ -650: every real score far below 0
    k = (-rand((b, h, lk, d), F32).abs() * 4).to(F16)
    leaves = [t.requires_grad_(True) for t in (q, k, rand((b, h, lk, d), F16))]
    for causal in (False, True):
        _check_sdpa(leaves, "bhld", causal=causal)


def test_sdpa_alibi_with_dropout(fresh_seed):
    b, h, lq, lk, d, p = 2, 2, 17, 33, 16, 0.3
    leaves = _leaves(b, h, lq, lk, d, d, F32, "bhld")
    alibi = _slopes((h,))
    q, k, v = (t.detach() for t in leaves)
    torch.manual_seed(fresh_seed)
    _, _, seed = torch.ops.fastbert.attention_fwd(q, k, v, None, p, True, d ** -0.5, alibi)
    keep = kernels.attention_dropout_mask(seed, p, (b, h, lq, lk))
    torch.manual_seed(fresh_seed)
    _check_sdpa(leaves, "bhld", causal=True, dropout_p=p, dropout_mask=keep, alibi=alibi)


def test_sdpa_alibi_arguments():
    q = rand((2, 3, 5, 16))
    sdpa = fastbert.scaled_dot_product_attention
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        sdpa(q, q, q, alibi_slopes=torch.ones(4, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        sdpa(q, q, q, alibi_slopes=torch.ones(3, 2, device=DEVICE), backend="triton")
    with pytest.raises(TypeError, match="floating"):
        sdpa(q, q, q, alibi_slopes=torch.ones(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TypeError, match="alibi_slopes must be a torch.Tensor"):
        sdpa(q, q, q, alibi_slopes=[0.5, 0.25, 0.125])
    with pytest.raises(NotImplementedError, match="constants"):
        sdpa(q, q, q, alibi_slopes=torch.ones(3, device=DEVICE, requires_grad=True))
    with pytest.raises(ValueError, match="is on meta"):
        sdpa(q, q, q, alibi_slopes=torch.ones(3, device="meta"))
    # zero slopes are plain attention
    out = sdpa(q, q, q, alibi_slopes=torch.zeros(3, device=DEVICE), backend="triton")
    assert_close(out, reference.scaled_dot_product_attention(q.double(), q.double(), q.double()),
                 name="out")


WINDOWS = [
    # lq, lk, (left, right), causal, dtype, layout, mask code
    (97, 97, (8, 8), False, F16, "bhld", None),          # ModernBERT-like local attention
    (33, 130, (0, 0), False, F32, "blhd", None),         # each query sees one key
    (130, 33, (20, 3), True, F16, "bhld", "boolB11K"),   # Lq > Lk, causal, key padding
    (17, 97, (-1, 5), False, F32, "strided", "float11QK"),  # left unbounded, trainable shared bias
    (70, 40, (6, -1), True, F32, "bhld", "floatBHQK"),   # right unbounded (= causal window)
    (40, 40, (100, 100), False, F16, "blhd", None),     # wider than the sequence: dense
]


@pytest.mark.parametrize(
    "lq,lk,window,causal,dtype,layout,mask_code",
    [pytest.param(*w, id=_case_id(1, 2, w[0], w[1], 40, w[4], w[3],
                                  f"window{w[2][0]}_{w[2][1]}-{w[5]}" + (f"-{w[6]}" if w[6] else "")))
     for w in WINDOWS])
def test_sdpa_window(lq, lk, window, causal, dtype, layout, mask_code):
    """Sliding-window attention: only the key blocks the window reaches are visited, every one of
    them checked; against the reference with the window as a mask (rows that see no key: 0)."""
    b, h, d = 1, 2, 40
    leaves = _leaves(b, h, lq, lk, d, d, dtype, layout)
    mask = _coded_mask(mask_code, b, h, lq, lk, dtype)
    _check_sdpa(leaves, layout, mask=mask, causal=causal, window=window)


@pytest.mark.parametrize("blocks", ["bm16-bn64", "bm64-bn16"])
def test_sdpa_window_block_sizes(blocks, monkeypatch):
    """Window edges that cut tiles of either shape, with GQA, ALiBi and dropout together."""
    cfg = BLOCK_CONFIGS[blocks]
    monkeypatch.setattr(kernels, "attention_config", lambda kind, *a, **k: cfg[kind])
    b, h, hkv, lq, lk, d, p = 1, 4, 2, 70, 97, 16, 0.2
    leaves = _leaves(b, h, lq, lk, d, d, F32, "bhld", hkv=hkv)
    alibi = _slopes((h,))
    q, k, v = (t.detach() for t in leaves)
    seed_value = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    torch.manual_seed(seed_value)
    _, _, seed = torch.ops.fastbert.attention_fwd(q, k, v, None, p, True, d ** -0.5, alibi, 9, 30)
    keep = kernels.attention_dropout_mask(seed, p, (b, h, lq, lk))
    torch.manual_seed(seed_value)
    _check_sdpa(leaves, "bhld", causal=True, dropout_p=p, dropout_mask=keep, gqa=True,
                alibi=alibi, window=(9, 30))


@pytest.mark.parametrize("blocks", ["bm16-bn64", "bm64-bn16"])
def test_sdpa_window_sides_one_past_a_tile(blocks, monkeypatch):
    """Window sides of k * tile + 1 (1, 17, 65): the last row / key block such a window reaches
    holds one real row / key. A bound one block short there (dK/dV's row range, the forward's and
    dQ's key range) survived every other window test in a mutation run; this one kills it."""
    cfg = BLOCK_CONFIGS[blocks]
    monkeypatch.setattr(kernels, "attention_config", lambda kind, *a, **k: cfg[kind])
    tiles = sorted({t for kind in ("fwd", "bwd_dkdv", "bwd_dq") for t in cfg[kind][:2]})
    sides = [1] + [t + 1 for t in tiles]
    for window in {(a, b) for a in sides for b in sides if a == b or 1 in (a, b)}:
        leaves = _leaves(1, 1, 97, 97, 16, 16, F32, "bhld")
        _check_sdpa(leaves, "bhld", window=window)


def test_sdpa_window_arguments():
    q = rand((1, 2, 5, 16))
    sdpa = fastbert.scaled_dot_product_attention
    for bad, exc in (((3,), TypeError), ((1.5, 2), TypeError), (5, TypeError), ((-2, 0), ValueError)):
        with pytest.raises(exc, match="window_size"):
            sdpa(q, q, q, window_size=bad, backend="triton")
    # (-1, -1) is no window at all
    full = sdpa(q, q, q, window_size=(-1, -1), backend="triton")
    assert_close(full, reference.scaled_dot_product_attention(q.double(), q.double(), q.double()),
                 name="out")


def _causal_bias(variant, lq, lk):
    """torch's causal-bias object (``torch.nn.attention.bias``) and the (Lq, Lk) bool mask it means."""
    bias = pytest.importorskip("torch.nn.attention.bias")
    with warnings.catch_warnings():  # torch warns that lower-right with Lq > Lk gives NaN rows
        warnings.simplefilter("ignore", UserWarning)
        obj = getattr(bias, f"causal_{variant}")(lq, lk)
    diagonal = lk - lq if variant == "lower_right" else 0
    return obj, torch.ones(lq, lk, dtype=torch.bool, device=DEVICE).tril(diagonal)


CAUSAL_BIASES = [
    # lq, lk, variant, window, dtype, layout
    (5, 70, "lower_right", None, F32, "blhd"),      # a window bounded Lk - Lq keys ahead
    (17, 97, "lower_right", (8, 3), F16, "bhld"),   # intersected with a user window
    (70, 33, "lower_right", None, F32, "strided"),  # Lq > Lk: the first 37 rows see no key
    (33, 33, "lower_right", None, F16, "blhd"),     # Lq == Lk: plain causal
    (17, 97, "upper_left", (-1, 5), F32, "bhld"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "lq,lk,variant,window,dtype,layout",
    [pytest.param(*c, id=_case_id(1, 2, c[0], c[1], 40, c[4], False, f"{c[2]}-{c[5]}"
                                  + (f"-window{c[3][0]}_{c[3][1]}" if c[3] else "")))
     for c in CAUSAL_BIASES])
def test_sdpa_causal_bias(lq, lk, variant, window, dtype, layout, backend):
    """torch's ``causal_upper_left`` / ``causal_lower_right`` as ``attn_mask``, as in torch's SDPA:
    output and gradients against the reference given the mask they mean; and against torch's own
    SDPA with the same object where torch defines every row."""
    if backend == "torch" and dtype == F16 and DEVICE == "cpu":
        dtype = F32  # torch's CPU SDPA kernels in fp16 are not what this test is about
    b, h, d = 1, 2, 40
    obj, keep = _causal_bias(variant, lq, lk)
    leaves = _leaves(b, h, lq, lk, d, d, dtype, layout)
    out, _ = _check_sdpa(leaves, layout, mask=keep, window=window, fast_mask=obj, backend=backend)
    if window is None and not (variant == "lower_right" and lq > lk):
        torch_out = F.scaled_dot_product_attention(*_views([t.detach().double() for t in leaves],
                                                           layout), attn_mask=obj)
        assert_close(out, torch_out, torch_out.to(dtype), name="out vs torch's SDPA")


RANKS = [
    # query / key / value shapes (Lq 17, Lk 20 or 9), the mask's shape, mask kind, causal
    ((3, 17, 40), (3, 20, 40), (3, 20, 40), (3, 17, 20), "bool", False),          # (H, L, D)
    ((17, 40), (9, 40), (9, 24), None, None, True),                               # (L, D)
    ((2, 3, 2, 17, 16), (2, 3, 2, 20, 16), (2, 3, 2, 20, 16), (3, 1, 17, 20), "float", False),
    ((2, 2, 4, 17, 16), (2, 2, 2, 9, 16), (2, 2, 2, 9, 16), (2, 1, 1, 1, 9), "bool", False),  # GQA
]


@pytest.mark.parametrize("shapes", RANKS, ids=["HLD-bool", "LD-causal-Dv24", "5d-float-grad",
                                               "5d-gqa-keypad"])
def test_sdpa_any_rank(shapes):
    """Inputs of rank 2, 3 and 5, as torch's SDPA takes them: output and gradients (a float mask's
    included, summed over its broadcast) against torch's own SDPA in float64."""
    qs, ks, vs, ms, kind, causal = shapes
    leaves = [rand(s, F32, requires_grad=True) for s in (qs, ks, vs)]
    mask = None if ms is None else _make_mask(kind, ms, F32)
    if kind == "float":
        mask.requires_grad_()
    gqa = ks[-3] != qs[-3] if len(qs) > 2 else False
    out = fastbert.scaled_dot_product_attention(*leaves, attn_mask=mask, is_causal=causal,
                                                enable_gqa=gqa, backend="triton")
    assert out.shape == qs[:-1] + (vs[-1],)
    dout = rand(out.shape, F32)
    grads = _grads(out, leaves, mask, dout)

    def torch_sdpa(dtype):
        ls = [_clone_leaf(t, dtype) for t in leaves]
        m = _clone_leaf(mask, dtype if kind == "float" else None)
        o = F.scaled_dot_product_attention(*ls, attn_mask=m, is_causal=causal, enable_gqa=gqa)
        return o, _grads(o, ls, m, dout.to(dtype))
    ref, ref_grads = torch_sdpa(torch.float64)
    low, low_grads = torch_sdpa(F32)
    assert_close(out, ref, low, name="out")
    for name, g, r, lo in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads, low_grads):
        assert g.shape == r.shape
        assert_close(g, r, lo, name=name)


def test_sdpa_causal_bias_arguments():
    q = rand((1, 2, 5, 16))
    k = rand((1, 2, 9, 16))
    obj, _ = _causal_bias("lower_right", 5, 8)
    with pytest.raises(ValueError, match=r"causal bias for \(Lq, Lk\) = \(5, 8\).*\(5, 9\)"):
        fastbert.scaled_dot_product_attention(q, k, k, attn_mask=obj)
    obj, _ = _causal_bias("lower_right", 5, 9)
    with pytest.raises(ValueError, match="is_causal=False"):
        fastbert.scaled_dot_product_attention(q, k, k, attn_mask=obj, is_causal=True)
    layout = fastbert.sparsity.sliding_window(9, 16)
    with pytest.raises(TypeError, match="attn_mask is one of torch's causal-bias objects"):
        fastbert.block_sparse_attention(k, k, k, layout, 16, attn_mask=_causal_bias("upper_left", 9, 9)[0])


BLOCK_CONFIGS = {
    # pass -> (BLOCK_M, BLOCK_N, num_warps, num_stages); the causal split depends on BM vs BN
    "bm16-bn16": {"fwd": (16, 16, 4, 1), "bwd_dkdv": (16, 16, 4, 1), "bwd_dq": (16, 16, 4, 1)},
    "bm16-bn64": {"fwd": (16, 64, 4, 1), "bwd_dkdv": (64, 16, 4, 1), "bwd_dq": (16, 64, 4, 1)},
    "bm64-bn16": {"fwd": (64, 16, 4, 1), "bwd_dkdv": (16, 64, 4, 1), "bwd_dq": (64, 16, 4, 1)},
}


@pytest.mark.parametrize("blocks", list(BLOCK_CONFIGS))
@pytest.mark.parametrize("lq,lk", [(33, 70), (70, 33)], ids=["Lq33-Lk70", "Lq70-Lk33"])
def test_sdpa_block_sizes(blocks, lq, lk, monkeypatch, fresh_seed):
    """Causal + float mask (with its gradient) + dropout under other tilings than the default."""
    cfg = BLOCK_CONFIGS[blocks]
    monkeypatch.setattr(kernels, "attention_config", lambda kind, *args: cfg[kind])
    b, h, d, p = 1, 2, 40, 0.2
    leaves = _leaves(b, h, lq, lk, d, d, F32, "bhld")
    mask = _make_mask("float", (1, 1, lq, lk), F32).requires_grad_()
    seed = _seed_of_call(fresh_seed, leaves, mask, p, True)
    keep = kernels.attention_dropout_mask(seed, p, (b, h, lq, lk))
    torch.manual_seed(fresh_seed)
    _check_sdpa(leaves, "bhld", mask=mask, causal=True, dropout_p=p, dropout_mask=keep)


def test_sdpa_scale():
    leaves = _leaves(1, 2, 17, 33, 40, 40, F32, "bhld")
    _check_sdpa(leaves, "bhld", causal=True, scale=0.37)


# ----------------------------------------------------------------------------------------------
# dense: masks
# ----------------------------------------------------------------------------------------------
def _make_mask(kind, shape, dtype, keep_fraction=0.7):
    """bool: True = attend; float: a random bias with some -inf entries."""
    if kind == "bool":
        return torch.rand(shape, device=DEVICE) < keep_fraction
    m = torch.randn(shape, device=DEVICE)
    m = m.masked_fill(torch.rand(shape, device=DEVICE) > keep_fraction + 0.2, float("-inf"))
    return m.to(dtype)


MASKS = [
    # mask kind, mask shape (symbolic), mask dtype (None: query dtype), causal, q dtype
    ("bool", "B11K", None, False, F16),       # key padding (B, 1, 1, Lk)
    ("bool", "B11K", None, True, F32),
    ("float", "11QK", None, False, F16),     # a bias shared by batch and heads
    ("float", "11QK", None, True, F32),
    ("bool", "BHQK", None, False, F32),      # full mask
    ("float", "BHQK", None, True, F16),
    ("bool", "QK", None, True, F16),          # 2-D mask
    ("float", "QK", torch.float64, False, F32),
    ("float", "1H1K", torch.bfloat16, False, F16),
    ("float", "B1Q1", torch.float32, True, F16),   # per-query bias (stride 0 along keys)
    ("float", "1HQKt", None, True, F32),      # a transposed (1, H, Lk, Lq) view: stride 1 along Q
    ("bool", "BHQKt", None, False, F16),
]


def _mask_shape(code, b, h, lq, lk):
    sizes = {"B": b, "H": h, "Q": lq, "K": lk, "1": 1}
    return tuple(sizes[c] for c in code.rstrip("t"))


@pytest.mark.parametrize(
    "kind,shape_code,mask_dtype,causal,dtype",
    [pytest.param(*m, id=_case_id(2, 3, 17, 33, 40, m[4], m[3],
                                  f"{m[0]}{m[1]}" + (f"-{DTYPE_NAMES.get(m[2], 'fp64')}" if m[2] else "")))
     for m in MASKS])
def test_sdpa_masks(kind, shape_code, mask_dtype, causal, dtype):
    b, h, lq, lk, d = 2, 3, 17, 33, 40
    leaves = _leaves(b, h, lq, lk, d, d, dtype, "blhd")
    shape = _mask_shape(shape_code, b, h, lq, lk)
    if shape_code.endswith("t"):  # stored as (..., Lk, Lq), read through the transposed view
        mask = _make_mask(kind, shape[:-2] + (lk, lq), mask_dtype or dtype).transpose(-1, -2)
    else:
        mask = _make_mask(kind, shape, mask_dtype or dtype)
    _check_sdpa(leaves, "blhd", mask=mask, causal=causal)


@pytest.mark.parametrize("shape_code,causal,dtype", [
    pytest.param("11QK", False, F32, id=_case_id(2, 2, 17, 97, 40, F32, False, "dmask11QK")),
    pytest.param("11QK", True, F16, id=_case_id(2, 2, 17, 97, 40, F16, True, "dmask11QK")),
    pytest.param("BHQK", True, F32, id=_case_id(2, 2, 17, 97, 40, F32, True, "dmaskBHQK")),
    pytest.param("1HQK", False, F16, id=_case_id(2, 2, 17, 97, 40, F16, False, "dmask1HQK")),
    pytest.param("QK", True, F32, id=_case_id(2, 2, 17, 97, 40, F32, True, "dmaskQK")),
    pytest.param("B11K", False, F32, id=_case_id(2, 2, 17, 97, 40, F32, False, "dmaskB11K")),
])
def test_sdpa_mask_grad(shape_code, causal, dtype):
    """Gradient of a trainable additive bias (ALiBi / relative position), summed over its
    broadcast dims; -inf entries get zero gradient."""
    b, h, lq, lk, d = 2, 2, 17, 97, 40
    leaves = _leaves(b, h, lq, lk, d, d, dtype, "bhld")
    mask = _make_mask("float", _mask_shape(shape_code, b, h, lq, lk), dtype).requires_grad_()
    _, grads = _check_sdpa(leaves, "bhld", mask=mask, causal=causal)
    dmask = grads[3]
    assert dmask.shape == mask.shape
    assert torch.all(dmask[torch.isinf(mask.detach())] == 0)


@pytest.mark.parametrize("shape_code,causal,expect_kernel", [
    pytest.param("11QK", True, True, id="dmask11QK-causal-p0.3"),
    pytest.param("B11K", False, True, id="dmaskB11K-p0.3"),
    pytest.param("BHQK", False, False, id="dmaskBHQK-p0.3"),
])
def test_sdpa_mask_grad_with_dropout(shape_code, causal, expect_kernel, monkeypatch, fresh_seed):
    """A trainable bias with dropout, exact against the reference with the kernel's keep-mask. A
    bias broadcast over batch or heads takes the kernel that sums its gradient over them as it
    goes (scratch (MB, MH, Lq, Lk)); a full (B, H, Lq, Lk) one takes the dS of the dq kernel."""
    calls = []
    launch = kernels._launch_bwd_dmask
    monkeypatch.setattr(kernels, "_launch_bwd_dmask",
                        lambda *a, **kw: (calls.append(1), launch(*a, **kw))[1])
    b, h, lq, lk, d, p = 2, 3, 33, 40, 16, 0.3
    leaves = _leaves(b, h, lq, lk, d, d, F32, "bhld")
    mask = (_make_mask("float", _mask_shape(shape_code, b, h, lq, lk), F32) * 0.5).requires_grad_()
    seed = _seed_of_call(fresh_seed, leaves, mask, p, causal)
    keep = kernels.attention_dropout_mask(seed, p, (b, h, lq, lk))
    torch.manual_seed(fresh_seed)
    _, grads = _check_sdpa(leaves, "bhld", mask=mask, causal=causal, dropout_p=p, dropout_mask=keep)
    assert grads[3].shape == mask.shape
    assert bool(calls) == expect_kernel


def test_sdpa_fp32_dropout_scale_is_exact(fresh_seed):
    """fp32 at p = 0.999: the kept probabilities scale by 1 / (1 - p) from the caller's double p,
    passed to the kernels (forward, dK/dV, dQ and the broadcast-mask gradient) as torch computes
    it, not from p rounded to fp32 in the kernel (1.3e-5 relative off at 0.999). With that
    rounded scale passed from the host, the errors were 2.3-13x the bound (out, dq, dk, dv over
    5 draws); with the exact scale 0.1-0.7x. The interpreter keeps a float argument in double, so
    only a compiled run (GPU) could fail on an in-kernel scale. A random bias is left out: with
    ~3 kept keys scaled 1000x it makes outlier rows where dq reached 2.2x the bound, fixed."""
    b, h, lq, lk, d, p = 1, 2, 17, 3000, 32, 0.999  # ~3 kept keys per row
    leaves = _leaves(b, h, lq, lk, d, d, F32, "bhld")
    seed = _seed_of_call(fresh_seed, leaves, None, p, False)
    keep = kernels.attention_dropout_mask(seed, p, (b, h, lq, lk))
    assert keep.any(-1).float().mean().item() > 0.5  # most rows keep a key (~95%)
    torch.manual_seed(fresh_seed)
    _check_sdpa(leaves, "bhld", dropout_p=p, dropout_mask=keep)


@pytest.mark.parametrize("kind,causal,dtype", [
    pytest.param("bool", False, F16, id=_case_id(2, 2, 33, 20, 64, F16, False, "bool-dead-rows")),
    pytest.param("float", True, F32, id=_case_id(2, 2, 33, 20, 64, F32, True, "float-dead-rows")),
    pytest.param("keypad", True, F16, id=_case_id(2, 2, 33, 20, 64, F16, True, "keypad0-dead-row0")),
])
def test_sdpa_fully_masked_rows(kind, causal, dtype):
    """A query row with no key left gives exactly 0, zero gradients, and no NaN anywhere."""
    b, h, lq, lk, d = 2, 2, 33, 20, 64
    leaves = _leaves(b, h, lq, lk, d, d, dtype, "bhld")
    if kind == "keypad":
        # Key 0 is padding in batch 0; with causal, query 0 of batch 0 then sees no key at all.
        mask = torch.ones((b, 1, 1, lk), dtype=torch.bool, device=DEVICE)
        mask[0, ..., 0] = False
        dead = [(0, slice(None), 0)]
    else:
        mask = _make_mask(kind, (b, 1, lq, lk), dtype)
        if kind == "bool":
            mask[0, 0, [3, 17, 32]] = False
            mask[1, 0, 0] = False
        else:
            mask[0, 0, [3, 17, 32]] = float("-inf")
            mask[1, 0, 0] = float("-inf")
        dead = [(0, slice(None), [3, 17, 32]), (1, slice(None), 0)]
    out, grads = _check_sdpa(leaves, "bhld", mask=mask, causal=causal)
    for idx in dead:
        assert torch.all(out[idx] == 0)
        assert torch.all(grads[0][idx] == 0)
    for t in (out,) + tuple(grads):
        assert not torch.isnan(t).any()


def _padding_mask(lens, lk, lq=None):
    """Right padding as a bool key-padding mask (B, 1, 1, Lk), or with ``lq`` as HuggingFace's
    "sdpa" masks hand it over, materialised (B, 1, Lq, Lk)."""
    keep = torch.arange(lk, device=DEVICE)[None, :] < torch.tensor(lens, device=DEVICE)[:, None]
    keep = keep[:, None, None, :]
    return keep if lq is None else keep.expand(-1, 1, lq, -1).clone()


def test_key_limits():
    """One past the last key some head and query of each batch entry may attend, for any bool
    mask; None where it cannot pay (float masks, keys broadcast, short key lengths)."""
    b, h, lq, lk = 3, 2, 9, 70

    def limits(mask):
        m, strides, kind = kernels._mask_args(mask, (b, h, lq, lk), mask)
        out = kernels.key_limits(m, strides, kind, b, h, lq, lk)
        return None if out is None else out.tolist()

    assert limits(_padding_mask([70, 33, 0], lk)) == [70, 33, 0]
    assert limits(_padding_mask([5, 70, 1], lk, lq)) == [5, 70, 1]
    left = torch.zeros((b, 1, lq, lk), dtype=torch.bool, device=DEVICE)
    left[0, 0, 4, 50] = True        # one query of one entry sees one key
    left[1, 0, :, 20:] = True       # left padding: no keys to drop at the end
    left[2, 0, :, :3] = True
    assert limits(left) == [51, 70, 3]
    spread = torch.zeros((b, 1, 40, lk), dtype=torch.bool, device=DEVICE)
    spread[0, 0, 2, 10] = True      # rows in different programs (16 rows each) of one entry
    spread[0, 0, 37, 65] = True
    spread[1, 0, 2, 60] = True      # the later program finds the smaller limit: a max, not the last
    spread[1, 0, 37, 5] = True
    spread[2, 0, 39, 0] = True
    m, strides, kind = kernels._mask_args(spread, (b, h, 40, lk), spread)
    assert kernels.key_limits(m, strides, kind, b, h, 40, lk).tolist() == [66, 61, 1]
    per_head = torch.zeros((1, h, 1, lk), dtype=torch.bool, device=DEVICE)
    per_head[0, 1, 0, 60] = True    # shared by the batch: every entry gets the same limit
    assert limits(per_head) == [61, 61, 61]
    assert limits(torch.ones((lq, 1), dtype=torch.bool, device=DEVICE)) is None  # keys broadcast
    assert limits(torch.zeros((b, 1, 1, lk), device=DEVICE)) is None             # float mask
    m, strides, kind = kernels._mask_args(_padding_mask([3, 3, 3], 20), (b, h, lq, 20), left)
    assert kernels.key_limits(m, strides, kind, b, h, lq, 20) is None             # too short
    # Lk a multiple of 16: limits rounded up to one too (the keys in between stay masked)
    m, strides, kind = kernels._mask_args(_padding_mask([64, 33, 0], 64), (b, h, lq, 64), left)
    assert kernels.key_limits(m, strides, kind, b, h, lq, 64).tolist() == [64, 48, 0]


KEY_LIMIT_CASES = [
    # lens, lq, lk, hf-style (B, 1, Lq, Lk), causal, gqa, dtype
    ([130, 40, 0], 33, 130, False, False, False, F32),
    ([97, 61, 7], 97, 97, True, True, False, F16),
    ([100, 17], 50, 100, False, False, True, F32),
    ([128, 33, 70], 40, 128, True, False, False, F16),  # limits rounded up to 16: 128, 48, 80
]


@pytest.mark.parametrize(
    "lens,lq,lk,hf,causal,gqa,dtype",
    [pytest.param(*c, id=_case_id(len(c[0]), 4, c[1], c[2], 40, c[6], c[4],
                                  "lens" + "_".join(map(str, c[0])) + ("-hf" if c[3] else "-keypad")
                                  + ("-gqa" if c[5] else "")))
     for c in KEY_LIMIT_CASES])
def test_sdpa_key_limit_skips_padded_keys(lens, lq, lk, hf, causal, gqa, dtype, monkeypatch):
    """Right-padded keys are never visited (the kernels stop at each entry's key limit), and the
    output and every gradient stay exact: dK / dV of the skipped keys are stored as 0 (the
    outputs are NaN-poisoned), an entry with no key gives 0."""
    seen = []
    real = kernels.key_limits
    monkeypatch.setattr(kernels, "key_limits", lambda *a: seen.append(real(*a)) or seen[-1])
    b, h, d = len(lens), 4, 40
    leaves = _leaves(b, h, lq, lk, d, d, dtype, "blhd", hkv=2 if gqa else None)
    mask = _padding_mask(lens, lk, lq if hf else None)
    out, grads = _check_sdpa(leaves, "blhd", mask=mask, causal=causal, gqa=gqa)
    align = kernels.key_limit_align(lk)
    limits = [-(-n // align) * align for n in lens]
    assert seen and all(t is not None and t.tolist() == limits for t in seen)  # forward and backward
    for i, n in enumerate(lens):
        assert torch.all(grads[1][i, n:] == 0) and torch.all(grads[2][i, n:] == 0)
        if n == 0:
            assert torch.all(out[i] == 0)


def test_sdpa_key_limit_with_dropout(fresh_seed):
    """The dropout mask does not move when the padded keys are skipped (offsets use Lk)."""
    b, h, lq, lk, d, p = 2, 2, 40, 97, 16, 0.3
    leaves = _leaves(b, h, lq, lk, d, d, F32, "bhld")
    mask = _padding_mask([97, 50], lk)
    q, k, v = (t.detach() for t in leaves)
    seed_value = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    torch.manual_seed(seed_value)
    _, _, seed = torch.ops.fastbert.attention_fwd(q, k, v, mask, p, False, d ** -0.5)
    keep = kernels.attention_dropout_mask(seed, p, (b, h, lq, lk))
    torch.manual_seed(seed_value)
    _check_sdpa(leaves, "bhld", mask=mask, dropout_p=p, dropout_mask=keep)


@pytest.mark.parametrize("fill", [torch.finfo(F32).min, -1e4], ids=["finfo-min", "-1e4"])
def test_sdpa_large_negative_padding_mask(fill):
    """Additive padding masks with large finite values (HuggingFace uses torch.finfo(float32).min)
    keep "alive" rows: a sequence padded everywhere averages over its keys in the reference and
    must here too, gradients included (log2(e) * finfo.min must not overflow to -inf, and the
    backward pass must not lose log(l) next to a huge row max)."""
    b, h, lq, lk, d = 3, 2, 17, 20, 40
    leaves = _leaves(b, h, lq, lk, d, d, F32, "blhd")
    lengths = torch.tensor([20, 7, 0], device=DEVICE)
    pad = torch.arange(lk, device=DEVICE)[None, :] >= lengths[:, None]
    mask = torch.zeros((b, 1, 1, lk), device=DEVICE).masked_fill(pad[:, None, None, :], fill)
    out, _ = _check_sdpa(leaves, "blhd", mask=mask)
    assert torch.all(out[2] != 0)  # the all-padding sequence is averaged, not zeroed


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_sdpa_nan_propagates(mask_kind, causal, dtype):
    """NaN reaches exactly the rows it reaches in torch: a NaN in a query element (its row), in a
    key (every row that sees that key), in a float mask entry or a +inf one (its row; clamping
    finfo.min padding must not drop it). A NaN logit of a masked key does nothing; a fully masked
    row stays 0; a huge finite entry (3e38: log2(e) times it overflows fp32) gives its key all the
    weight; the other rows stay exact."""
    b, h, lq, lk, d = 1, 3, 9, 20, 64
    q, k, v = (rand((b, h, n, d), dtype) for n in (lq, lk, lk))
    q[0, 0, 3, 5] = float("nan")
    k[0, 1, 7, 0] = float("nan")
    if mask_kind == "bool":
        mask = torch.ones((b, 1, lq, lk), dtype=torch.bool, device=DEVICE)
        mask[0, 0, 4] = False       # a fully masked row
        mask[0, 0, 2, 7] = False    # row 2 (every head) does not see key 7: head 1's NaN misses it
    else:
        mask = torch.zeros((b, h, lq, lk), dtype=dtype, device=DEVICE)
        mask[0, 0, 4] = float("-inf")
        mask[0, 1, 2, 7] = float("-inf")                  # head 1, row 2: the NaN key masked
        mask[0, 2, 5, 2] = float("nan")                   # head 2, row 5
        mask[0, 2, 6, :] = torch.finfo(torch.float32).min  # head 2, row 6: "padding", stays alive
        mask[0, 2, 7, 3] = float("inf")                   # head 2, row 7: NaN, as in torch
        mask[0, 0, 8, 5] = 3e38 if dtype == F32 else 6e4  # head 0, row 8: all on key 5
    with warnings.catch_warnings():  # numpy, under the interpreter, warns of the NaN it computes
        warnings.simplefilter("ignore", RuntimeWarning)
        out = fastbert.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, backend="triton")
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                 mask if mask_kind == "bool" else mask.double(),
                                                 is_causal=causal)
    low = reference.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, compute_dtype=dtype)
    nan_rows = ref.isnan().any(-1)
    assert nan_rows[0, 0, 3] and nan_rows.sum() >= 2
    assert torch.equal(out.isnan(), ref.isnan()), (out.isnan().any(-1) != nan_rows).nonzero().tolist()
    assert (out[0, 0, 4] == 0).all()
    assert_close(out.nan_to_num(0.0), ref.nan_to_num(0.0), low.nan_to_num(0.0), name="rows without NaN")
    if mask_kind == "float":
        assert ref[0, 2, 7].isnan().all() and torch.equal(out[0, 0, 8], v[0, 0, 5])
        if not causal:  # torch's own SDPA (math, fp64) agrees on every row but the fully masked one
            theirs = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask.double())
            theirs[0, 0, 4] = 0.0
            assert torch.equal(theirs.isnan(), ref.isnan())


def test_sdpa_every_key_masked():
    """No row has a key: the whole output and every gradient are exactly 0."""
    leaves = _leaves(1, 2, 17, 20, 40, 40, F16, "bhld")
    mask = torch.zeros((1, 1, 1, 20), dtype=torch.bool, device=DEVICE)
    out = _run_sdpa(leaves, "bhld", mask, True)
    grads = _grads(out, leaves, None, rand(out.shape, F16))
    for t in (out,) + tuple(grads):
        assert torch.all(t == 0)


# ----------------------------------------------------------------------------------------------
# dense: dropout
# ----------------------------------------------------------------------------------------------
def _seed_of_call(user_seed, leaves, mask, p, causal, layout="bhld"):
    """The dropout seed tensor that the forward op returns when called right after
    torch.manual_seed(user_seed) (the public op called after the same torch.manual_seed draws it
    too)."""
    q, k, v = (t.detach() for t in _views(leaves, layout))
    torch.manual_seed(user_seed)
    _, _, seed = torch.ops.fastbert.attention_fwd(q, k, v, None if mask is None else mask.detach(),
                                                  p, causal, q.shape[-1] ** -0.5)
    return seed


@pytest.mark.parametrize("b,h,lq,lk,d,dtype,causal,with_mask", [
    pytest.param(2, 2, 17, 130, 40, F32, False, False, id=_case_id(2, 2, 17, 130, 40, F32, False, "p0.3")),
    pytest.param(2, 2, 17, 130, 40, F16, True, True, id=_case_id(2, 2, 17, 130, 40, F16, True, "p0.3-keypad")),
    pytest.param(1, 2, 97, 33, 80, F32, True, False, id=_case_id(1, 2, 97, 33, 80, F32, True, "p0.3")),
])
def test_sdpa_dropout_exact(b, h, lq, lk, d, dtype, causal, with_mask, fresh_seed):
    """The kernel's dropout equals the reference's with the materialised keep-mask, forward and
    backward (the backward pass regenerates the same mask)."""
    p = 0.3
    leaves = _leaves(b, h, lq, lk, d, d, dtype, "bhld")
    mask = _make_mask("bool", (b, 1, 1, lk), None) if with_mask else None
    seed = _seed_of_call(fresh_seed, leaves, mask, p, causal)
    keep = kernels.attention_dropout_mask(seed, p, (b, h, lq, lk))
    torch.manual_seed(fresh_seed)
    _check_sdpa(leaves, "bhld", mask=mask, causal=causal, dropout_p=p, dropout_mask=keep)


def _seed(value):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


def test_sdpa_dropout_statistics():
    p = 0.25
    keep = kernels.attention_dropout_mask(_seed(1234), p, (2, 4, 64, 130))
    assert keep.dtype == torch.bool and keep.shape == (2, 4, 64, 130)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    # Neighbouring rows/columns are not correlated (a broken counter would repeat patterns).
    kf = keep.float() - keep.float().mean()
    for a, c in ((kf[..., 1:, :], kf[..., :-1, :]), (kf[..., 1:], kf[..., :-1])):
        corr = (a * c).mean() / kf.var()
        assert abs(corr.item()) < 0.02
    other = kernels.attention_dropout_mask(_seed(1235), p, (2, 4, 64, 130))
    assert (other != keep).float().mean().item() > 0.3

    # Expectation: with uniform scores (q = 0) and value = 1, each output is
    # kept_j / (Lk (1 - p)); its mean over 4 * 64 rows is 1 up to ~0.004 (one std).
    b, h, lq, lk, d = 1, 4, 64, 64, 16
    q = torch.zeros((b, h, lq, d), device=DEVICE)
    k = rand((b, h, lk, d))
    v = torch.ones((b, h, lk, d), device=DEVICE)
    out = fastbert.scaled_dot_product_attention(q, k, v, dropout_p=p, backend="triton")
    assert abs(out[..., 0].mean().item() - 1.0) < 0.03
    assert (out[..., 0] != 1.0).any()  # dropout did something
    assert torch.all(out[..., 0] == out[..., 1])  # one mask per (row, key), shared by all dims


def test_sdpa_dropout_reproducible(fresh_seed):
    leaves = _leaves(1, 2, 17, 33, 40, 40, F32, "bhld")
    runs = []
    for s in (fresh_seed, fresh_seed, fresh_seed + 1):
        torch.manual_seed(s)
        out = _run_sdpa(leaves, "bhld", None, True, dropout_p=0.4)
        runs.append((out,) + tuple(_grads(out, leaves, None, torch.ones_like(out))))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0])


# ----------------------------------------------------------------------------------------------
# dense and varlen: the dropout seed is drawn on the inputs' device and never read on the host
# ----------------------------------------------------------------------------------------------
def _fwd_op(kind, q, p):
    """The dense or varlen forward op on ``q`` (B=1, H, L, D) as query, key and value:
    -> (out, stats, seed)."""
    if kind == "dense":
        return torch.ops.fastbert.attention_fwd(q, q, q, None, p, False, 0.25)
    x = q[0].transpose(0, 1)  # (L, H, D): one packed sequence
    n = x.shape[0]
    cu = torch.tensor([0, n], dtype=torch.int32, device=q.device)
    return torch.ops.fastbert.varlen_attention_fwd(x, x, x, cu, cu, n, n, p, False, 0.25)


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("device", ["inputs", "meta"], ids=["kernel", "fake-on-meta"])
@pytest.mark.parametrize("kind", ["dense", "varlen"])
def test_dropout_seed_output(kind, device, p):
    """The forward op returns its seed as an int64 (1,) tensor on the inputs' device (so a GPU
    call draws and keeps it on the GPU), an empty (0,) one without dropout; the fake agrees."""
    q = rand((1, 2, 17, 16))
    if device == "meta":
        q = q.to("meta")
    seed = _fwd_op(kind, q, p)[2]
    assert seed.dtype == torch.int64 and seed.device == q.device
    assert seed.shape == ((1,) if p > 0.0 else (0,))
    if device != "meta" and p > 0.0:
        assert 0 <= int(seed[0]) < 2 ** 63 - 1  # fastbert._rng draws 63-bit seeds


@pytest.mark.parametrize("kind", ["dense", "varlen"])
def test_dropout_seed_never_read_on_host(kind, monkeypatch, fresh_seed):
    """Forward and backward with dropout run with host reads of int64 tensors forbidden; the
    result is the same as without the guard (same torch.manual_seed)."""
    q = rand((1, 2, 33, 16), requires_grad=True)
    dout = rand((1, 2, 33, 16))

    def run():
        torch.manual_seed(fresh_seed)
        out = _fwd_op(kind, q, 0.3)[0]
        return (out,) + torch.autograd.grad(out, q, dout.view(out.shape))

    expected = run()
    with monkeypatch.context() as m:
        forbid_int64_host_reads(m)
        with pytest.raises(AssertionError, match="on the host"):
            torch.zeros(1, dtype=torch.int64).item()  # the guard is active
        got = run()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_dropout_fresh_seed_per_call():
    """Two calls in a row draw two seeds, so two different masks and outputs; the seed tensor
    alone reproduces each call's mask."""
    b, h, l, d, p = 1, 2, 33, 16, 0.3
    q = rand((b, h, l, d))
    out1, _, seed1 = _fwd_op("dense", q, p)
    out2, _, seed2 = _fwd_op("dense", q, p)
    assert not torch.equal(seed1, seed2)
    assert not torch.equal(out1, out2)
    keep1 = kernels.attention_dropout_mask(seed1, p, (b, h, l, l))
    keep2 = kernels.attention_dropout_mask(seed2, p, (b, h, l, l))
    assert not torch.equal(keep1, keep2)
    ref = reference.scaled_dot_product_attention(q, q, q, None, p, False, 0.25, dropout_mask=keep2)
    assert_close(out2, ref, atol=1e-5, name="out of the second call vs its own mask")


def test_dropout_mask_helpers_take_the_seed_tensor():
    with pytest.raises(TypeError, match="int64 \\(1,\\) dropout seed tensor"):
        kernels.attention_dropout_mask(1234, 0.1, (1, 1, 2, 2))
    q = rand((1, 1, 4, 16))
    with pytest.raises(TypeError, match="int64 \\(1,\\) dropout seed tensor"):
        kernels.attention_fwd(q, q, q, None, 0.1, False, 0.25, seed=None)


def test_sdpa_deterministic():
    """Two identical calls give bitwise identical outputs and gradients (no atomics)."""
    b, h, lq, lk, d = 2, 2, 97, 33, 40
    leaves = _leaves(b, h, lq, lk, d, d, F16, "blhd")
    mask = _make_mask("float", (1, h, lq, lk), F16).requires_grad_()
    dout = rand((b, h, lq, d), F16)
    runs = []
    for _ in range(2):
        out = _run_sdpa(leaves, "blhd", mask, True)
        runs.append((out,) + tuple(_grads(out, leaves, mask, dout)))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


# ----------------------------------------------------------------------------------------------
# torch.compile and the backend's declared limits
# ----------------------------------------------------------------------------------------------
def test_sdpa_compile_fullgraph():
    def fn(q, k, v, m):
        out = fastbert.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True,
                                                    backend="triton")
        return out * 2.0

    leaves = _leaves(1, 2, 17, 20, 16, 16, F32, "bhld")
    mask = _make_mask("float", (17, 20), F32).requires_grad_()
    compiled = torch.compile(fn, fullgraph=True)
    out = compiled(*leaves, mask)
    dout = rand(out.shape)
    grads = torch.autograd.grad(out, leaves + [mask], dout)
    eager = fn(*leaves, mask)
    eager_grads = torch.autograd.grad(eager, leaves + [mask], dout)
    assert torch.equal(out, eager)
    for g, e in zip(grads, eager_grads):
        assert torch.equal(g, e)


def _reasons(query, value):
    from fastbert.ops.attention import _sdpa_triton_reasons

    return _sdpa_triton_reasons(query=query, key=query, value=value)


@pytest.mark.parametrize("dtype,d,dv,needle", [
    pytest.param(torch.float64, 64, 64, "float64", id="fp64"),
    pytest.param(F16, 12, 12, "head dim D = 12", id="D12"),
    pytest.param(F16, 44, 44, "head dim D = 44", id="D44"),
    pytest.param(F16, 264, 264, "head dim D = 264", id="D264"),
    pytest.param(F16, 64, 20, "value head dim Dv = 20", id="Dv20"),
])
def test_triton_reasons(dtype, d, dv, needle):
    q = torch.zeros((1, 1, 4, d), dtype=dtype, device=DEVICE)
    v = torch.zeros((1, 1, 4, dv), dtype=dtype, device=DEVICE)
    reasons = _reasons(q, v)
    assert any(needle in r for r in reasons), reasons
    k = torch.zeros((1, 1, 4, d), dtype=dtype, device=DEVICE)
    with pytest.raises(BackendError, match="triton"):
        fastbert.scaled_dot_product_attention(q, k, v, backend="triton")
    # The public op still serves the call through the torch backend.
    fastbert.scaled_dot_product_attention(q, k, v, backend="torch")


def test_triton_reasons_accept_supported():
    for d in range(16, 257, 8):
        q = torch.zeros((1, 1, 1, d), dtype=F16, device=DEVICE)
        assert _reasons(q, q) == []
    q = torch.zeros((1, 1, 1, 64), dtype=torch.bfloat16, device=DEVICE)
    if DEVICE == "cpu" and interpreter_enabled():
        assert any("bfloat16" in r and "interpreter" in r for r in _reasons(q, q))
    else:
        assert _reasons(q, q) == []


def test_triton_reasons_32bit_slices():
    """One (batch, head) slice must span < 2^31 elements (meta tensors: nothing is allocated)."""
    from fastbert.ops.attention import _varlen_triton_reasons

    ok = torch.empty_strided((2, 2, 4, 64), (512, 256, 64, 1), dtype=F16, device="meta")
    assert _reasons(ok, ok) == []
    big = torch.empty_strided((1, 1, 2, 64), (0, 0, 2 ** 31, 1), dtype=F16, device="meta")
    assert any("32-bit" in r for r in _reasons(big, ok[:1, :1]))
    from fastbert.ops.attention import _sdpa_triton_reasons
    mask = torch.empty_strided((70000, 70000), (70000, 1), dtype=torch.bool, device="meta")
    q = torch.empty((1, 1, 70000, 64), dtype=F16, device="meta")
    assert any("attn_mask" in r for r in _sdpa_triton_reasons(query=q, key=q, value=q,
                                                               attn_mask=mask))
    for broadcast in ((1, 1, 1, 70000), (70000, 1), (70000,)):  # one row or column, read again
        m = torch.empty(broadcast, dtype=torch.bool, device="meta")
        assert _sdpa_triton_reasons(query=q, key=q, value=q, attn_mask=m) == []
    packed = torch.empty((10, 16, 128), dtype=F16, device="meta")
    assert _varlen_triton_reasons(q=packed, k=packed, v=packed, max_seqlen_q=10,
                                  max_seqlen_k=10) == []
    assert any("32-bit" in r for r in _varlen_triton_reasons(
        q=packed, k=packed, v=packed, max_seqlen_q=2 ** 21, max_seqlen_k=10))


@pytest.mark.parametrize("cc,smem_kb", [(90, 227), (80, 163), (86, 99)], ids=["sm90", "sm80", "sm86"])
def test_block_config_table(cc, smem_kb, monkeypatch):
    """Every (pass, head dim, dtype, dropout) gets power-of-two tiles >= 16 that fit the
    device's shared memory."""
    monkeypatch.setattr(kernels, "_device_limits", lambda index: (cc, smem_kb * 1024))
    kernels._cached_config.cache_clear()
    try:
        for kind in ("fwd", "bwd_dkdv", "bwd_dq"):
            for d in range(16, 257, 8):
                for elem, dropout, masked in itertools.product((2, 4), (False, True), (False, True)):
                    bd = kernels._block_dim(d)
                    bm, bn, warps, stages = kernels._cached_config(kind, 0, bd, bd, elem, dropout,
                                                                   masked)
                    for blk in (bm, bn):
                        assert blk >= 16 and blk & (blk - 1) == 0
                    assert warps in (4, 8) and stages >= 1
                    est = kernels._smem_estimate(kind, bm, bn, stages, bd, bd, elem)
                    assert est <= 0.9 * smem_kb * 1024, (kind, d, elem, bm, bn, stages)
    finally:
        kernels._cached_config.cache_clear()


# ----------------------------------------------------------------------------------------------
# varlen
# ----------------------------------------------------------------------------------------------
def _cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32,
                        device=DEVICE)


def _varlen_reference(q, k, v, lens_q, lens_k, causal, masks=None, p=0.0, compute_dtype=None):
    """Per-sequence dense reference (with explicit dropout masks when given)."""
    outs, cq, ck = [], 0, 0
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        qi = q[cq:cq + lq].transpose(0, 1)
        ki, vi = k[ck:ck + lk].transpose(0, 1), v[ck:ck + lk].transpose(0, 1)
        if lq == 0 or lk == 0:
            oi = vi.new_zeros((vi.shape[0], lq, vi.shape[-1])) + 0.0 * qi.sum()
        else:
            oi = reference.scaled_dot_product_attention(
                qi, ki, vi, dropout_p=p, is_causal=causal,
                dropout_mask=None if masks is None else masks[i], compute_dtype=compute_dtype)
        outs.append(oi.transpose(0, 1))
        cq, ck = cq + lq, ck + lk
    return torch.cat(outs, 0)


VARLEN = [
    # lens_q, lens_k, h, d, dtype, causal, layout, extra max_seqlen slack
    ([17, 0, 5, 33], [9, 4, 0, 40], 2, 40, F16, False, "plain", 0),
    ([17, 0, 5, 33], [17, 0, 5, 33], 3, 64, F32, True, "plain", 0),
    ([1, 97, 30], [130, 20, 30], 2, 80, F16, True, "qkv-packed-slack", 7),
    ([40, 17], [40, 17], 2, 96, F32, False, "strided", 0),
    ([17, 0, 5, 33], [9, 4, 0, 40], 4, 40, F16, True, "gqa2", 0),   # 2 query heads per K/V head
    ([30, 20], [25, 40], 3, 64, F32, False, "gqa3", 3),             # multi-query
]


def _varlen_id(lens_q, lens_k, h, d, dtype, causal, layout, slack):
    return (f"N{len(lens_q)}-H{h}-Lq{'_'.join(map(str, lens_q))}-Lk{'_'.join(map(str, lens_k))}"
            f"-D{d}-{DTYPE_NAMES[dtype]}" + ("-causal" if causal else "") + f"-{layout}")


def _varlen_leaves(lens_q, lens_k, h, d, dtype, layout):
    tq, tk = sum(lens_q), sum(lens_k)
    if layout.startswith("qkv-packed"):
        # Slices of fused (total, 3, H, D) projection outputs: token stride 3 * H * D.
        q = rand((tq, 3, h, d), dtype)[:, 0].requires_grad_()
        kv = rand((tk, 3, h, d), dtype)
        return [q, kv[:, 1].requires_grad_(), kv[:, 2].requires_grad_()]
    nc = layout == "strided"
    hkv = h // int(layout[3:]) if layout.startswith("gqa") else h  # "gqaG": G query heads per K/V
    return [rand((tq, h, d), dtype, requires_grad=True, noncontiguous=nc),
            rand((tk, hkv, d), dtype, requires_grad=True, noncontiguous=nc),
            rand((tk, hkv, d), dtype, requires_grad=True, noncontiguous=nc)]


@pytest.mark.parametrize("lens_q,lens_k,h,d,dtype,causal,layout,slack",
                         [pytest.param(*c, id=_varlen_id(*c)) for c in VARLEN])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_varlen(lens_q, lens_k, h, d, dtype, causal, layout, slack, backend):
    leaves = _varlen_leaves(lens_q, lens_k, h, d, dtype, layout)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    max_q, max_k = max(lens_q) + slack, max(lens_k) + slack
    out = fastbert.varlen_attention(*leaves, cu_q, cu_k, max_q, max_k, is_causal=causal,
                                    backend=backend)
    dout = rand(out.shape, dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [_clone_leaf(t, torch.float64) for t in leaves]
    ref = reference.varlen_attention(*ref_leaves, cu_q, cu_k, max_q, max_k, is_causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    low_leaves = [_clone_leaf(t) for t in leaves]
    low = reference.varlen_attention(*low_leaves, cu_q, cu_k, max_q, max_k, is_causal=causal,
                                     compute_dtype=dtype)
    low_grads = torch.autograd.grad(low, low_leaves, dout)
    assert_close(out, ref, low, name="out")
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert_close(g, r, lo, name=name)
    # Rows of a sequence with no key are exactly 0 and get zero gradient.
    cq = cu_q.tolist()
    for i, lk in enumerate(lens_k):
        if lk == 0:
            assert torch.all(out[cq[i]:cq[i + 1]] == 0)
            assert torch.all(grads[0][cq[i]:cq[i + 1]] == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_varlen_strided_cu_seqlens_and_inf_beside_an_empty_sequence(backend):
    """cu_seqlens given as a strided view (its values, not its memory, count); an inf in a query
    of a sequence with no key stays out of every output row and gradient (each such row is 0), as
    it does for dense attention with no key at all (whose shortcut adds no arithmetic on inputs)."""
    q, k, v = (rand((n, 2, 16), F32, requires_grad=True) for n in (8, 5, 5))
    backing = torch.tensor([0, 99, 3, 99, 8, 99], dtype=torch.int32, device=DEVICE)
    cu_q, cu_k = backing[::2], _cu([0, 5])  # values [0, 3, 8]; sequence 0 has no key
    with torch.no_grad():
        q[1, 0, 0] = float("inf")
    out = fastbert.varlen_attention(q, k, v, cu_q, cu_k, 5, 5, backend=backend)
    ref = reference.varlen_attention(*(t.detach().double() for t in (q, k, v)), _cu([3, 5]), cu_k, 5, 5)
    assert torch.equal(out[:3], torch.zeros_like(out[:3])) and torch.isfinite(out).all()
    assert_close(out[3:], ref[3:], ref[3:].float(), name="out")
    dq, = torch.autograd.grad(out, q, torch.ones_like(out))
    assert torch.equal(dq[:3], torch.zeros_like(dq[:3]))
    qd = rand((2, 2, 4, 16), F32, requires_grad=True)
    with torch.no_grad():
        qd[0, 0, 0, 0] = float("inf")
    kd = rand((2, 2, 0, 16), F32, requires_grad=True)
    od = fastbert.scaled_dot_product_attention(qd, kd, kd, backend=backend)
    assert torch.equal(od, torch.zeros_like(od))
    assert torch.equal(torch.autograd.grad(od, qd, torch.ones_like(od))[0], torch.zeros_like(qd))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_varlen_offsets_made_under_inference_mode_train(backend):
    """cu_seqlens built under torch.inference_mode (e.g. by a data pipeline) serve a training call
    on both backends (the Triton op used to fail saving them for its backward)."""
    with torch.inference_mode():
        cu = _cu([3, 5])
    q, k, v = (rand((8, 2, 16), F32, requires_grad=True) for _ in range(3))
    out = fastbert.varlen_attention(q, k, v, cu, cu, 5, 5, backend=backend)
    ref = reference.varlen_attention(*(t.detach().double() for t in (q, k, v)), _cu([3, 5]),
                                     _cu([3, 5]), 5, 5)
    assert_close(out, ref, ref.float(), name="out")
    out.backward(torch.randn_like(out))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_varlen_and_pad_input_propagate_shapes_without_values():
    """On meta tensors and under FakeTensorMode (shape inference, deferred initialisation), where
    no value can be read: the host checks of the offsets are skipped, as under torch.compile (they
    failed with "Cannot copy out of meta tensor" / a data-dependent error)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def shapes(device):
        q = torch.randn(12, 2, 16, device=device)
        v = torch.randn(12, 2, 8, device=device)
        cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
        out = fastbert.varlen_attention(q, q, v, cu, cu, 7, 7, backend="torch")
        packed, indices = torch.randn(5, 4, device=device), torch.tensor([0, 1, 3, 4, 5], device=device)
        padded = fastbert.pad_input(packed, indices, 2, 3)
        return tuple(out.shape), tuple(padded.shape)

    assert shapes("meta") == ((12, 2, 8), (2, 3, 4))
    with FakeTensorMode():
        assert shapes("cpu") == ((12, 2, 8), (2, 3, 4))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masks_and_slopes_made_under_inference_mode_train(backend):
    """A bool mask, a float mask and ALiBi slopes built under torch.inference_mode serve a training
    call, as they do for torch's SDPA (the Triton ops failed saving them for the backward:
    "Inference tensors cannot be saved for backward"); varlen's mask and slopes too."""
    with torch.inference_mode():
        keep = torch.rand(2, 1, 17, 9) > 0.3
        bias = torch.randn(1, 2, 17, 9)
        slopes = torch.tensor([0.5, 0.25])
        vbias = torch.randn(1, 2, 5, 5)
        cu = _cu([3, 5])
    q = rand((2, 2, 17, 16), F32, requires_grad=True)
    k, v = (rand((2, 2, 9, 16), F32, requires_grad=True) for _ in range(2))
    for kw in (dict(attn_mask=keep), dict(attn_mask=bias), dict(alibi_slopes=slopes)):
        out = fastbert.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
        plain = {n: t.clone() for n, t in kw.items()}  # the same values, not inference tensors
        ref = reference.scaled_dot_product_attention(
            *(t.detach().double() for t in (q, k, v)),
            **{n: (t.double() if t.is_floating_point() else t) for n, t in plain.items()})
        assert_close(out, ref, atol=1e-5, name=str(list(kw)))
        out.backward(torch.randn_like(out))
    pq = rand((8, 2, 16), F32, requires_grad=True)
    out = fastbert.varlen_attention(pq, pq, pq, cu, cu, 5, 5, attn_mask=vbias, alibi_slopes=slopes,
                                    backend=backend)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(pq.grad).all()


@pytest.mark.parametrize("per_sequence,layout,window", [(False, "plain", None), (True, "gqa2", None),
                                                       (False, "plain", (5, 3))],
                         ids=["N3-H4-D40-fp16-causal-alibiH", "N3-H4-D40-fp16-causal-alibiNH-gqa2",
                              "N3-H4-D40-fp16-causal-alibiH-window5_3"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_varlen_alibi(per_sequence, layout, window, backend):
    """ALiBi (and a sliding window) over packed sequences: positions counted within each
    sequence; slopes (H,) or one set per sequence (N, H)."""
    lens_q, lens_k, h, d = [17, 0, 33], [9, 4, 40], 4, 40
    leaves = _varlen_leaves(lens_q, lens_k, h, d, F16, layout)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    alibi = _slopes((len(lens_q), h) if per_sequence else (h,))
    out = fastbert.varlen_attention(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), is_causal=True,
                                    alibi_slopes=alibi, window_size=window, backend=backend)
    dout = rand(out.shape, F16)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [_clone_leaf(t, torch.float64) for t in leaves]
    ref = reference.varlen_attention(*ref_leaves, cu_q, cu_k, max(lens_q), max(lens_k),
                                     is_causal=True, alibi_slopes=alibi.double(),
                                     window_size=window)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    low_leaves = [_clone_leaf(t) for t in leaves]
    low = reference.varlen_attention(*low_leaves, cu_q, cu_k, max(lens_q), max(lens_k),
                                     is_causal=True, alibi_slopes=alibi, window_size=window,
                                     compute_dtype=F16)
    low_grads = torch.autograd.grad(low, low_leaves, dout)
    assert_close(out, ref, low, name="out")
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert_close(g, r, lo, name=name)


VARLEN_MASKS = {
    # kind: (lens_q, lens_k, h, d, dtype, causal, layout, window)
    "shared-bias-fp16": ([17, 0, 5, 33], [17, 0, 5, 33], 2, 40, F16, False, "plain", None),
    "per-seq-bool-causal-gqa2": ([17, 3, 30], [9, 4, 40], 4, 64, F32, True, "gqa2", None),
    "head-bias-strided-window": ([1, 97, 30], [130, 20, 30], 2, 80, F16, False, "strided", (5, 3)),
}


def _varlen_mask(kind, n, h, lq, lk):
    if kind.startswith("shared-bias"):  # a relative-position bias shared by every sequence
        return rand((1, h, lq, lk), F32, requires_grad=True)
    if kind.startswith("per-seq-bool"):  # with one fully masked query row
        m = torch.rand((n, 1, lq, lk), device=DEVICE) > 0.3
        m[0, 0, 2] = False
        return m
    # per head, a transposed (non-contiguous) view, requires grad
    return rand((h, lk, lq), F32).transpose(-1, -2).requires_grad_()


@pytest.mark.parametrize("kind", list(VARLEN_MASKS))
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_varlen_attn_mask(kind, backend):
    """A mask read at sequence-local positions (entry [i, h, r, c]: query r and key c of sequence
    i): outputs, dq / dk / dv and the float mask's gradient against the fp64 reference; the
    reference itself against padded per-sequence SDPA; a fully masked row gives 0."""
    lens_q, lens_k, h, d, dtype, causal, layout, window = VARLEN_MASKS[kind]
    leaves = _varlen_leaves(lens_q, lens_k, h, d, dtype, layout)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    max_q, max_k = max(lens_q), max(lens_k)
    mask = _varlen_mask(kind, len(lens_q), h, max_q, max_k)
    kw = dict(is_causal=causal, window_size=window)
    out = fastbert.varlen_attention(*leaves, cu_q, cu_k, max_q, max_k, attn_mask=mask, backend=backend, **kw)
    wrt = leaves + ([mask] if mask.requires_grad else [])
    dout = rand(out.shape, dtype)
    grads = torch.autograd.grad(out, wrt, dout)
    ref_wrt = [_clone_leaf(t, torch.float64) for t in wrt]
    ref_mask = ref_wrt[3] if mask.requires_grad else mask
    ref = reference.varlen_attention(*ref_wrt[:3], cu_q, cu_k, max_q, max_k, attn_mask=ref_mask, **kw)
    ref_grads = torch.autograd.grad(ref, ref_wrt, dout.double())
    low_wrt = [_clone_leaf(t) for t in wrt]
    low_mask = low_wrt[3] if mask.requires_grad else mask
    low = reference.varlen_attention(*low_wrt[:3], cu_q, cu_k, max_q, max_k, attn_mask=low_mask,
                                     compute_dtype=dtype, **kw)
    low_grads = torch.autograd.grad(low, low_wrt, dout)
    assert_close(out, ref, low, name="out")
    for name, g, r, lo in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads, low_grads):
        assert_close(g, r, lo, name=name)
    # the reference reads sequence i's mask at its own positions: as dense SDPA on each sequence
    cq, ck = cu_q.tolist(), cu_k.tolist()
    hk = ref_wrt[1].shape[1]
    for i in range(len(lens_q)):
        qi = ref_wrt[0][cq[i]:cq[i + 1]].transpose(0, 1)
        ki = ref_wrt[1][ck[i]:ck[i + 1]].transpose(0, 1).repeat_interleave(h // hk, 0)
        vi = ref_wrt[2][ck[i]:ck[i + 1]].transpose(0, 1).repeat_interleave(h // hk, 0)
        mi = ref_mask[i if ref_mask.shape[0] > 1 else 0] if ref_mask.dim() == 4 else ref_mask
        dense = reference.scaled_dot_product_attention(qi, ki, vi, mi[..., :qi.shape[1], :ki.shape[1]],
                                                       **kw)
        torch.testing.assert_close(ref[cq[i]:cq[i + 1]].transpose(0, 1), dense)
    if kind.startswith("per-seq-bool"):  # query 2 of sequence 0 sees no key: 0, zero gradient
        assert torch.all(out[2] == 0) and torch.all(grads[0][2] == 0)


def test_varlen_attn_mask_errors():
    q = rand((10, 2, 16), F32)
    cu = _cu([4, 6])
    with pytest.raises(ValueError, match="attn_mask"):
        fastbert.varlen_attention(q, q, q, cu, cu, 6, 6, attn_mask=torch.zeros(3, 2, 6, 6, device=DEVICE))
    with pytest.raises(TypeError, match="attn_mask"):
        fastbert.varlen_attention(q, q, q, cu, cu, 6, 6, attn_mask=torch.zeros(6, 6, dtype=torch.int32,
                                                                               device=DEVICE))


@pytest.mark.parametrize("causal", [False, True], ids=["N3-H2-D40-fp32-p0.3", "N3-H2-D40-fp32-causal-p0.3"])
def test_varlen_dropout_exact(causal, fresh_seed):
    lens_q, lens_k, h, d, p = [17, 0, 33], [20, 5, 9], 2, 40, 0.3
    leaves = _varlen_leaves(lens_q, lens_k, h, d, F32, "plain")
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    max_q, max_k = max(lens_q), max(lens_k)
    torch.manual_seed(fresh_seed)
    q, k, v = (t.detach() for t in leaves)
    _, _, seed = torch.ops.fastbert.varlen_attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, p,
                                                         causal, d ** -0.5)
    masks = kernels.varlen_attention_dropout_masks(seed, p, cu_q, cu_k, h, max_q, max_k)
    torch.manual_seed(fresh_seed)
    out = fastbert.varlen_attention(*leaves, cu_q, cu_k, max_q, max_k, dropout_p=p,
                                    is_causal=causal, backend="triton")
    dout = rand(out.shape)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [_clone_leaf(t, torch.float64) for t in leaves]
    ref = _varlen_reference(*ref_leaves, lens_q, lens_k, causal, masks, p)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    low_leaves = [_clone_leaf(t) for t in leaves]
    low = _varlen_reference(*low_leaves, lens_q, lens_k, causal, masks, p, compute_dtype=F32)
    low_grads = torch.autograd.grad(low, low_leaves, dout)
    assert_close(out, ref, low, name="out")
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert_close(g, r, lo, name=name)


def test_varlen_matches_padded_dense():
    """varlen over packed tokens == dense attention with a key-padding mask on the padded batch
    (both through the Triton kernels), on the real rows."""
    lens, h, d, L = [17, 5, 30], 2, 40, 30
    b = len(lens)
    x = rand((b, L, h, d), F16)
    keep = torch.arange(L, device=DEVICE)[None, :] < torch.tensor(lens, device=DEVICE)[:, None]
    packed, _, cu, max_len = fastbert.unpad_input(x, keep)
    out_v = fastbert.varlen_attention(packed, packed, packed, cu, cu, max_len, max_len,
                                      backend="triton")
    xt = x.transpose(1, 2)
    out_d = fastbert.scaled_dot_product_attention(xt, xt, xt, attn_mask=keep[:, None, None, :],
                                                  backend="triton")
    dense_rows = out_d.transpose(1, 2)[keep]
    assert_close(out_v, dense_rows, atol=1e-3, name="varlen vs padded dense")


# ----------------------------------------------------------------------------------------------
# GPU only: large shapes, bf16, head dim 256, long sequences, CUDA graphs, 64-bit offsets
# ----------------------------------------------------------------------------------------------
BF16 = torch.bfloat16
CUDA_SHAPES = [
    (2, 4, 1025, 1025, 64, BF16, True, "blhd", None),
    (1, 2, 2048, 512, 128, F16, False, "blhd", None),
    (2, 2, 300, 700, 256, BF16, True, "bhld", "bool"),
    (2, 3, 513, 257, 160, F16, True, "blhd", "float"),
    (1, 2, 4096, 4096, 128, F16, True, "blhd", None),
    (512, 2, 65, 65, 64, F16, False, "blhd", "bool"),
    (1, 2, 1000, 999, 128, F32, False, "bhld", "float"),
    (2, 2, 130, 97, 256, F32, True, "strided", None),
]


@pytest.mark.cuda
@pytest.mark.parametrize(
    "b,h,lq,lk,d,dtype,causal,layout,mask_kind",
    [pytest.param(*s, id=_case_id(*s[:5], s[5], s[6], s[7] + (f"-{s[8]}" if s[8] else "")))
     for s in CUDA_SHAPES])
def test_sdpa_cuda_large(b, h, lq, lk, d, dtype, causal, layout, mask_kind):
    leaves = _leaves(b, h, lq, lk, d, d, dtype, layout)
    mask = None
    if mask_kind == "bool":
        mask = _make_mask("bool", (b, 1, 1, lk), None, keep_fraction=0.9)
    elif mask_kind == "float":
        mask = _make_mask("float", (1, h, lq, lk), dtype).requires_grad_()
    _check_sdpa(leaves, layout, mask=mask, causal=causal)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_sdpa_cuda_dropout_exact(dtype, fresh_seed):
    b, h, lq, lk, d, p = 2, 4, 600, 1100, 128, 0.1
    leaves = _leaves(b, h, lq, lk, d, d, dtype, "blhd")
    seed = _seed_of_call(fresh_seed, leaves, None, p, True, layout="blhd")
    keep = kernels.attention_dropout_mask(seed, p, (b, h, lq, lk))
    torch.manual_seed(fresh_seed)
    _check_sdpa(leaves, "blhd", causal=True, dropout_p=p, dropout_mask=keep)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,d,causal", [(BF16, 128, True), (F16, 64, False), (BF16, 256, False)],
                         ids=["N32-H4-D128-bf16-causal", "N32-H4-D64-fp16", "N32-H4-D256-bf16"])
def test_varlen_cuda_large(dtype, d, causal):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(0, 1500, (32,), generator=g).tolist()
    lens[3] = 0
    leaves = _varlen_leaves(lens, lens, 4, d, dtype, "plain")
    cu = _cu(lens)
    out = fastbert.varlen_attention(*leaves, cu, cu, max(lens), max(lens), is_causal=causal,
                                    backend="triton")
    dout = rand(out.shape, dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [_clone_leaf(t, torch.float64) for t in leaves]
    ref = reference.varlen_attention(*ref_leaves, cu, cu, max(lens), max(lens), is_causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    low_leaves = [_clone_leaf(t) for t in leaves]
    low = reference.varlen_attention(*low_leaves, cu, cu, max(lens), max(lens), is_causal=causal,
                                     compute_dtype=dtype)
    low_grads = torch.autograd.grad(low, low_leaves, dout)
    assert_close(out, ref, low, name="out")
    for name, gr, r, lo in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert_close(gr, r, lo, name=name)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,d,causal", [(F16, 64, False), (BF16, 128, True)], ids=["D64-fp16", "D128-bf16-causal"])
def test_varlen_cuda_backend_inference(dtype, d, causal):
    """backend="cuda" for varlen_attention: the fused tensor-core kernel over packed sequences
    (inference), 48 sequences of 0 to 512 tokens, Lq != Lk, against fp64; the Python check of the
    device's shared memory agrees with the binding's."""
    from fastbert.ops.attention import _cuda_fused_device_problem

    g = torch.Generator().manual_seed(1)
    lq = torch.randint(0, 513, (48,), generator=g).tolist()
    lk = torch.randint(1, 513, (48,), generator=g).tolist()
    lq[5] = 0
    q, k, v = (rand((sum(n), 12, d), dtype, "cuda") for n in (lq, lk, lk))
    cu_q, cu_k = _cu(lq), _cu(lk)
    args = (cu_q, cu_k, max(lq), max(lk))
    ops = _cuda_ops()
    assert ops.fused_varlen_attention_unsupported(q, k, v, *args) == ""
    for keys in (64, 512):
        native = ops.fused_varlen_attention_unsupported(q, k, v, cu_q, cu_k, max(lq), keys)
        assert (native == "") == (_cuda_fused_device_problem(q.device.index or 0, d, keys) == "")
    with torch.no_grad():
        out = fastbert.varlen_attention(q, k, v, *args, is_causal=causal, backend="cuda")
    ref = reference.varlen_attention(q.double(), k.double(), v.double(), *args, is_causal=causal)
    low = reference.varlen_attention(q, k, v, *args, is_causal=causal, compute_dtype=dtype)
    assert_close(out, ref, low, name="varlen cuda")
    with pytest.raises(BackendError, match="inference"):
        fastbert.varlen_attention(q.clone().requires_grad_(), k, v, *args, backend="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape_code,d,causal", [("1HQK", 64, True), ("11QK", 128, False),
                                                  ("B11K", 64, False), ("QK", 256, True)])
def test_sdpa_cuda_broadcast_mask_grad(shape_code, d, causal, dtype):
    """Trainable biases broadcast over batch / heads (ALiBi, relative position) compiled on the
    GPU: the gradient kernel that sums over the broadcast dims, against fp64, with a second run
    bit-identical (deterministic: no atomics)."""
    b, h, lq, lk = 3, 4, 300, 257
    leaves = _leaves(b, h, lq, lk, d, d, dtype, "blhd")
    mask = (_make_mask("float", _mask_shape(shape_code, b, h, lq, lk), dtype) * 0.5).requires_grad_()
    out, grads = _check_sdpa(leaves, "blhd", mask=mask, causal=causal)
    assert grads[3].shape == mask.shape
    dout = rand(out.shape, dtype)
    runs = [_grads(_run_sdpa(leaves, "blhd", mask, causal, 0.0, None), leaves, mask, dout)
            for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_sdpa_cuda_gqa(dtype, backend):
    """Grouped-query attention at a larger shape, compiled: 8 query heads on 2 key / value heads,
    Lq != Lk, causal, a key-padding mask (the CUDA backend repeats K/V; Triton reads them in place)."""
    b, h, hkv, lq, lk, d = 2, 8, 2, 300, 1000, 128
    leaves = _leaves(b, h, lq, lk, d, d, dtype, "blhd", hkv=hkv)
    mask = _make_mask("bool", (b, 1, 1, lk), None, keep_fraction=0.9)
    _check_sdpa(leaves, "blhd", mask=mask, causal=True, gqa=True, backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_sdpa_cuda_alibi(backend):
    """ALiBi with key padding at a BERT-like shape, compiled (the CUDA backend adds the bias to
    the mask; Triton computes it in the kernels)."""
    b, h, l, d = 4, 12, 512, 64
    leaves = _leaves(b, h, l, l, d, d, BF16, "blhd")
    mask = _make_mask("bool", (b, 1, 1, l), None, keep_fraction=0.8)
    _check_sdpa(leaves, "blhd", mask=mask, alibi=_slopes((h,)), backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_sdpa_cuda_window(backend):
    """ModernBERT-style local attention (64 keys each side) at L 2048 with key padding, compiled."""
    b, h, l, d = 2, 12, 2048, 64
    leaves = _leaves(b, h, l, l, d, d, BF16, "blhd")
    mask = _make_mask("bool", (b, 1, 1, l), None, keep_fraction=0.9)
    _check_sdpa(leaves, "blhd", mask=mask, window=(64, 64), backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_sdpa_cuda_causal_bias(backend):
    """torch's ``causal_lower_right`` with Lq < Lk (a chunk of queries against a longer key
    prefix), compiled: the Triton kernels skip the blocks above the shifted diagonal."""
    b, h, lq, lk, d = 2, 8, 256, 1000, 64
    obj, keep = _causal_bias("lower_right", lq, lk)
    leaves = _leaves(b, h, lq, lk, d, d, BF16, "blhd")
    _check_sdpa(leaves, "blhd", mask=keep, fast_mask=obj, backend=backend)


@pytest.mark.cuda
def test_sdpa_cuda_graph_capture():
    b, h, lq, lk, d = 4, 4, 257, 300, 64
    q, k, v = _views(_leaves(b, h, lq, lk, d, d, F16, "blhd"), "blhd")
    q, k, v = q.detach(), k.detach(), v.detach()
    mask = _make_mask("bool", (b, 1, 1, lk), None)
    fn = lambda: fastbert.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True,  # noqa: E731
                                                       backend="triton")
    expected = fn()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm-up compiles the kernel outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn()
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, fn())
    assert not torch.equal(static_out, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_sdpa_cuda_graph_dropout_fresh_masks(backend):
    """A training step (forward + backward with dropout) captured in a CUDA graph draws a fresh
    seed on the device at every replay: two replays give different seeds, outputs and gradients,
    and each replay is the exact dropout attention of its own seed (forward and backward agree)."""
    b, h, l, d, p = 2, 3, 130, 64, 0.3
    scale = d ** -0.5
    q, k, v = (rand((b, h, l, d), F16, "cuda", requires_grad=True) for _ in range(3))
    dy = rand((b, h, l, d), F16, "cuda")
    if backend == "triton":
        fwd = torch.ops.fastbert.attention_fwd
        mask_of = lambda seed: kernels.attention_dropout_mask(seed, p, (b, h, l, l))  # noqa: E731
    else:
        fwd = _cuda_ops().attention_fwd
        mask_of = lambda seed: torch.ops.fastbert_cuda.dropout_mask(seed, [b, h, l, l], p)  # noqa: E731

    def step():
        out, _, seed = fwd(q, k, v, None, p, True, scale)
        return (out, seed) + torch.autograd.grad(out, (q, k, v), dy)

    replays = cuda_graph_replays(step)
    assert_fresh_replays(replays)
    for out, seed, *grads in replays:
        keep = mask_of(seed)
        refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = reference.scaled_dot_product_attention(*refs, None, p, True, scale, dropout_mask=keep)
        ref_grads = torch.autograd.grad(ref, refs, dy.double())
        lows = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        low = reference.scaled_dot_product_attention(*lows, None, p, True, scale, dropout_mask=keep,
                                                     compute_dtype=F16)
        low_grads = torch.autograd.grad(low, lows, dy)
        assert_close(out, ref, low, name=f"{backend} replay out")
        for name, g, r, lo in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
            assert_close(g, r, lo, name=f"{backend} replay {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_sdpa_compile_reduce_overhead_uses_cudagraphs(backend):
    """torch.compile(mode="reduce-overhead") of a training step with dropout: every output of our
    ops (the seed included) lives on the GPU and nothing syncs, so inductor keeps its CUDA graphs
    (no "cudagraph skip"), and the replays still draw fresh dropout masks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    q, k, v = (rand((2, 4, 130, 64), F16, "cuda", requires_grad=True) for _ in range(3))

    def step(q, k, v):
        out = fastbert.scaled_dot_product_attention(q, k, v, dropout_p=0.2, backend=backend)
        return out.float().square().mean()

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    losses = []
    for _ in range(4):
        loss = compiled(q, k, v)
        loss.backward()
        losses.append(loss.detach().clone())
    torch.cuda.synchronize()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert len({float(x) for x in losses}) == len(losses)  # a fresh mask at every step
    torch._dynamo.reset()


@pytest.mark.bigmem
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])  # cuda: the fused inference kernel
def test_sdpa_cuda_int64_offsets(backend):
    """q / k / v / out of 2^31 elements each: batch offsets overflow 32 bits (forward only)."""
    b, h, l, d = 4096, 16, 256, 128
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs 40 GiB of GPU memory")
    q = torch.randn((b, l, h, d), dtype=F16, device=DEVICE).transpose(1, 2)
    k = torch.randn_like(q)
    v = torch.randn_like(q)
    if backend == "cuda":
        assert _cuda_ops().fused_attention_unsupported(q, k, v, None) == ""
    out = fastbert.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    for bi in (0, 2047, b - 1):  # the last batch starts past 2^31 elements
        sl = slice(bi, bi + 1)
        ref = reference.scaled_dot_product_attention(q[sl].double(), k[sl].double(), v[sl].double(),
                                                     is_causal=True)
        low = reference.scaled_dot_product_attention(q[sl], k[sl], v[sl], is_causal=True,
                                                     compute_dtype=F16)
        assert_close(out[sl], ref, low, name=f"out[{bi}]")


# ----------------------------------------------------------------------------------------------
# backend="cuda" (csrc/attention, extension fastbert._C): GPU only. Output and every gradient
# against the fp64 reference with the same upstream gradient; the reference computed in the input's
# dtype sets the bound. C++ allocations bypass conftest's NaN poisoning, so the CUDA cache's free
# blocks are filled with NaN first: an output the kernel leaves unwritten then shows up as NaN.
# ----------------------------------------------------------------------------------------------
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda_compare(fn, inputs, dys, dtype, name, ref_kwargs=None):
    """Runs ``fn(*inputs, backend=...)`` on the CUDA backend, the fp64 reference and the reference
    computed in ``dtype``, with the same upstream gradients ``dys`` (one per output), and compares
    every output and every input gradient (fastbert.testing.compare_to_reference)."""
    poison_cuda_cache()
    compare_to_reference(fn, inputs, dys, dtype, name, backend="cuda", ref_kwargs=ref_kwargs)


def _cuda_with_seed(seed, fn):
    torch.manual_seed(seed)
    return fn()


def _cuda_sdpa(dropout_p=0.0, is_causal=False, scale=None, dropout_mask=None):
    def fn(q, k, v, m, backend, **kw):
        if backend == "cuda":
            return fastbert.scaled_dot_product_attention(q, k, v, m, dropout_p, is_causal, scale, backend="cuda")
        return reference.scaled_dot_product_attention(q, k, v, m, dropout_p, is_causal, scale,
                                                      dropout_mask=dropout_mask, **kw)
    return fn


CUDA_ATTN_SHAPES = [  # (B, H, Lq, Lk, D, Dv)
    (1, 1, 1, 1, 64, 64), (2, 3, 17, 17, 40, 40), (1, 2, 97, 130, 80, 80), (2, 2, 130, 97, 96, 96),
    (1, 2, 512, 512, 64, 64), (2, 1, 17, 512, 128, 128), (1, 3, 97, 97, 64, 40),
]


def _cuda_sid(s):
    b, h, lq, lk, d, dv = s
    return f"B{b}-H{h}-Lq{lq}-Lk{lk}-D{d}" + (f"-Dv{dv}" if dv != d else "")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=[DTYPE_NAMES[d] for d in CUDA_DTYPES])
@pytest.mark.parametrize("shape", CUDA_ATTN_SHAPES, ids=_cuda_sid)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cuda_sdpa(shape, dtype, causal):
    b, h, lq, lk, d, dv = shape
    q, k, v = rand((b, h, lq, d), dtype, "cuda"), rand((b, h, lk, d), dtype, "cuda"), rand((b, h, lk, dv), dtype, "cuda")
    dy = rand((b, h, lq, dv), dtype, "cuda")
    _cuda_compare(_cuda_sdpa(is_causal=causal), [q, k, v, None], [dy], dtype, f"sdpa {_cuda_sid(shape)}")


def _cuda_mask(kind, b, h, lq, lk, dtype):
    """Masks of every kind; some rows of the bool ones are fully masked."""
    if kind == "key-padding":  # (B, 1, 1, Lk), True = real token; the last batch entry fully padded
        lens = torch.randint(1, lk + 1, (b,))
        lens[-1] = 0
        return (torch.arange(lk)[None, :] < lens[:, None]).view(b, 1, 1, lk).to("cuda")
    if kind == "bool-full":
        m = torch.rand(b, h, lq, lk) > 0.3
        m[..., 0, :] = False  # a fully masked query row
        return m.to("cuda")
    if kind == "bool-2d-transposed":  # (Lq, Lk) as a non-contiguous view
        return (torch.rand(lk, lq) > 0.5).to("cuda").t()
    if kind == "bool-expanded":  # stride-0 broadcast view
        return (torch.rand(1, 1, 1, lk) > 0.2).to("cuda").expand(b, h, lq, lk)
    if kind == "float-same":
        m = torch.randn(b, 1, lq, lk)
        m[..., : lk // 3] = float("-inf")
        return m.to("cuda", dtype)
    if kind == "float32":
        return torch.randn(lq, lk, device="cuda")
    raise ValueError(kind)


CUDA_MASK_KINDS = ["key-padding", "bool-full", "bool-2d-transposed", "bool-expanded", "float-same", "float32"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=[DTYPE_NAMES[d] for d in CUDA_DTYPES])
@pytest.mark.parametrize("kind", CUDA_MASK_KINDS)
@pytest.mark.parametrize("shape", [(2, 2, 17, 97, 64, 64), (3, 2, 130, 130, 40, 40)], ids=_cuda_sid)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cuda_sdpa_masks(shape, kind, dtype, causal):
    b, h, lq, lk, d, dv = shape
    q, k, v = rand((b, h, lq, d), dtype, "cuda"), rand((b, h, lk, d), dtype, "cuda"), rand((b, h, lk, dv), dtype, "cuda")
    m = _cuda_mask(kind, b, h, lq, lk, dtype)
    dy = rand((b, h, lq, dv), dtype, "cuda")
    _cuda_compare(_cuda_sdpa(is_causal=causal), [q, k, v, m], [dy], dtype, f"sdpa {_cuda_sid(shape)} {kind}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_cuda_sdpa_float_mask_grad(dtype):
    b, h, lq, lk, d = 2, 3, 17, 33, 40
    q, k, v = rand((b, h, lq, d), dtype, "cuda"), rand((b, h, lk, d), dtype, "cuda"), rand((b, h, lk, d), dtype, "cuda")
    m = rand((b, 1, lq, lk), dtype, "cuda")  # broadcast over heads: its gradient sums them
    dy = rand((b, h, lq, d), dtype, "cuda")
    _cuda_compare(_cuda_sdpa(is_causal=True, scale=0.3), [q, k, v, m], [dy], dtype, "sdpa mask grad")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=[DTYPE_NAMES[d] for d in CUDA_DTYPES])
@pytest.mark.parametrize("grad", [True, False], ids=["unfused", "fused-inference"])
def test_cuda_sdpa_fully_masked_rows_are_zero(dtype, grad):
    poison_cuda_cache()
    b, h, lq, lk, d = 2, 2, 17, 40, 64
    q, k, v = rand((b, h, lq, d), dtype, "cuda"), rand((b, h, lk, d), dtype, "cuda"), rand((b, h, lk, d), dtype, "cuda")
    m = torch.ones(b, 1, lq, lk, dtype=torch.bool, device="cuda")
    m[0, :, 3] = False   # one dead row
    m[1] = False         # a whole dead batch entry
    leaves = [leaf_like(t) for t in (q, k, v)]
    with torch.set_grad_enabled(grad):
        out = fastbert.scaled_dot_product_attention(*(leaves if grad else (q, k, v)), m, backend="cuda")
    assert torch.isfinite(out).all()
    assert (out[0, :, 3] == 0).all() and (out[1] == 0).all()
    if grad:
        out.backward(rand(out.shape, dtype, "cuda"))
        for t in leaves:
            assert torch.isfinite(t.grad).all()
        assert (leaves[0].grad[0, :, 3] == 0).all() and (leaves[0].grad[1] == 0).all()
        assert (leaves[1].grad[1] == 0).all() and (leaves[2].grad[1] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=[DTYPE_NAMES[d] for d in CUDA_DTYPES])
@pytest.mark.parametrize("shape,with_mask,causal", [
    ((2, 3, 17, 97, 40, 40), False, False), ((1, 2, 130, 130, 64, 64), True, True),
    ((2, 1, 97, 512, 128, 128), True, False)], ids=["B2-H3-Lq17-Lk97-D40", "B1-H2-L130-D64-mask-causal",
                                                     "B2-H1-Lq97-Lk512-D128-mask"])
@pytest.mark.parametrize("p", [0.1, 0.5], ids=["p0.1", "p0.5"])
def test_cuda_sdpa_dropout_exact(shape, with_mask, causal, dtype, p):
    _cuda_ops()
    b, h, lq, lk, d, dv = shape
    q, k, v = rand((b, h, lq, d), dtype, "cuda"), rand((b, h, lk, d), dtype, "cuda"), rand((b, h, lk, dv), dtype, "cuda")
    m = _cuda_mask("key-padding", b, h, lq, lk, dtype) if with_mask else None
    scale = d ** -0.5
    outs = _cuda_with_seed(99, lambda: torch.ops.fastbert_cuda.attention_fwd(q, k, v, m, p, causal, scale))
    keep = torch.ops.fastbert_cuda.dropout_mask(outs[-1], [b, h, lq, lk], p)
    dy = rand((b, h, lq, dv), dtype, "cuda")

    def fn(*args, backend, **kw):
        if backend == "cuda":
            return _cuda_with_seed(99, lambda: _cuda_sdpa(p, causal)(*args, backend="cuda"))
        return _cuda_sdpa(p, causal, dropout_mask=keep)(*args, backend=backend, **kw)

    _cuda_compare(fn, [q, k, v, m], [dy], dtype, f"sdpa dropout {_cuda_sid(shape)}")


@pytest.mark.cuda
def test_cuda_sdpa_dropout_reproducible_and_fresh():
    q = rand((2, 2, 64, 64), F16, "cuda", requires_grad=True)
    run = lambda: fastbert.scaled_dot_product_attention(q, q, q, dropout_p=0.2, backend="cuda")  # noqa: E731
    a, b = _cuda_with_seed(5, run), _cuda_with_seed(5, run)
    assert torch.equal(a, b)
    assert not torch.equal(a, run())


@pytest.mark.cuda
def test_cuda_sdpa_deterministic():
    poison_cuda_cache()
    q, k, v = (rand((2, 4, 130, 64), F16, "cuda") for _ in range(3))
    dy = rand((2, 4, 130, 64), F16, "cuda")
    results = []
    for _ in range(2):
        leaves = [leaf_like(t) for t in (q, k, v)]
        out = fastbert.scaled_dot_product_attention(*leaves, is_causal=True, backend="cuda")
        out.backward(dy)
        results.append([out.detach()] + [t.grad for t in leaves])
    for a, c in zip(*results):
        assert torch.equal(a, c)


# Fused tensor-core forward (inference: no gradient, no dropout, fp16 / bf16, D 64 / 128, Lk <= 512)
CUDA_FUSED_SHAPES = [(1, 1, 1, 1, 64), (2, 3, 17, 17, 64), (1, 2, 97, 130, 128), (2, 2, 130, 97, 64),
                     (1, 2, 512, 512, 128), (2, 1, 300, 512, 64), (1, 1, 65, 64, 128)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", CUDA_FUSED_SHAPES, ids=lambda s: _cuda_sid(s + (s[-1],)))
@pytest.mark.parametrize("mask", [None, "key-padding", "bool-full", "bool-2d-transposed"],
                         ids=["nomask", "key-padding", "bool-full", "bool-2d"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_cuda_sdpa_fused_inference(shape, dtype, mask, causal, layout):
    poison_cuda_cache()
    b, h, lq, lk, d = shape

    def make(l):
        if layout == "blhd":  # (B, L, H, D) memory seen as (B, H, L, D)
            return rand((b, l, h, d), dtype, "cuda").transpose(1, 2)
        return rand((b, h, l, d), dtype, "cuda")

    q, k, v = make(lq), make(lk), make(lk)
    m = None if mask is None else _cuda_mask(mask, b, h, lq, lk, dtype)
    ops = _cuda_ops()
    assert ops.fused_attention_unsupported(q, k, v, m) == ""  # the fused kernel really runs
    with torch.no_grad():
        out = fastbert.scaled_dot_product_attention(q, k, v, m, is_causal=causal, backend="cuda")
        again = fastbert.scaled_dot_product_attention(q, k, v, m, is_causal=causal, backend="cuda")
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), m, is_causal=causal)
    low = reference.scaled_dot_product_attention(q, k, v, m, is_causal=causal, compute_dtype=dtype)
    assert out.dtype == dtype and out.shape == (b, h, lq, d)
    assert_close(out, ref, low, name=f"fused sdpa {_cuda_sid(shape + (d,))}")
    assert torch.equal(out, again)


@pytest.mark.cuda
@pytest.mark.parametrize("grad", [True, False], ids=["unfused", "fused-inference"])
def test_cuda_sdpa_fp16_unscaled_overflow_stays_finite(grad):
    """fp16 scores whose *unscaled* q.k exceeds 65504 (about 2% of them here) but whose scaled
    logits are ordinary: the scale must be applied before rounding to fp16, or rows turn NaN."""
    poison_cuda_cache()
    b, h, l, d, scale = 1, 2, 97, 64, 1 / 4000
    q, k = (rand((b, h, l, d), F16, "cuda", scale=60.0) for _ in range(2))
    v = rand((b, h, l, d), F16, "cuda")
    assert (q.double() @ k.double().transpose(-1, -2)).abs().max() > 65504
    leaves = [leaf_like(t) for t in (q, k, v)] if grad else [q, k, v]
    with torch.set_grad_enabled(grad):
        out = fastbert.scaled_dot_product_attention(*leaves, scale=scale, backend="cuda")
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    assert torch.isfinite(out).all()
    # logits of magnitude ~20 rounded to fp16 (ulp 2^-6) move the probabilities by ~1%
    assert (out.double() - ref).abs().max() < 5e-2
    if grad:
        out.backward(rand(out.shape, F16, "cuda"))
        assert all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.cuda
def test_cuda_sdpa_fused_graph_capture():
    """The fused inference kernel (shared-memory opt-in, current stream) inside a CUDA graph."""
    b, h, l, d = 2, 4, 130, 64
    q, k, v = (rand((b, l, h, d), F16, "cuda").transpose(1, 2) for _ in range(3))
    m = _cuda_mask("key-padding", b, h, l, l, F16)
    ops = _cuda_ops()
    assert ops.fused_attention_unsupported(q, k, v, m) == ""

    def fn():
        with torch.no_grad():
            return fastbert.scaled_dot_product_attention(q, k, v, m, backend="cuda")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    first = fn()
    q.copy_(rand(q.shape, F16, "cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, fn()) and not torch.equal(static, first)


@pytest.mark.cuda
def test_cuda_sdpa_fused_falls_back_when_unsupported():
    poison_cuda_cache()
    q = rand((1, 2, 17, 80), F16, "cuda")
    ops = _cuda_ops()
    assert "head dim" in ops.fused_attention_unsupported(q, q, q, None)
    out = ops.fused_attention_fwd(q, q, q, None, False, 0.125)  # served by the unfused path
    ref = reference.scaled_dot_product_attention(q.double(), q.double(), q.double(), scale=0.125)
    low = reference.scaled_dot_product_attention(q, q, q, scale=0.125, compute_dtype=F16)
    assert_close(out, ref, low)


@pytest.mark.cuda
def test_cuda_attention_opcheck():
    ops = _cuda_ops()
    q, k = rand((2, 2, 17, 64), F16, "cuda", requires_grad=True), rand((2, 2, 33, 64), F16, "cuda")
    m = torch.rand(2, 1, 1, 33, device="cuda") > 0.2
    torch.library.opcheck(ops.attention_fwd, (q, k, k, m, 0.0, True, 0.125))
    torch.library.opcheck(ops.attention_fwd, (q, k, k, rand((17, 33), F16, "cuda"), 0.0, False, 0.125))
    torch.library.opcheck(ops.fused_attention_fwd, (q.detach(), k, k, m, False, 0.125))


@pytest.mark.cuda
def test_cuda_attention_compile_fullgraph():
    q = rand((2, 2, 33, 64), F16, "cuda", requires_grad=True)

    def f(q):
        return fastbert.scaled_dot_product_attention(q, q, q, is_causal=True, backend="cuda")

    eager = f(q)  # loads the extension and registers its fakes before tracing
    compiled = torch.compile(f, fullgraph=True)(q)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    with torch.no_grad():  # the fused inference kernel
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(q), f(q), rtol=0, atol=0)


def test_varlen_torch_pads_only_when_padding_is_cheap(monkeypatch):
    """backend="torch" runs padded dense attention (one graph) unless the lengths are so uneven that
    the padded scores would take more than twice the memory of the per-sequence ones: then, in
    eager mode, the per-sequence loop of the reference. Both give the reference's numbers."""
    calls = []
    loop = reference.varlen_attention
    monkeypatch.setattr(reference, "varlen_attention", lambda *a, **kw: calls.append(1) or loop(*a, **kw))
    for lens, loops in (([40, 33, 1], False), ([200, 1, 1, 1], True)):
        cu = _cu(lens)
        q, k, v = (rand((sum(lens), 2, 8), torch.float64) for _ in range(3))
        calls.clear()
        out = fastbert.varlen_attention(q, k, v, cu, cu, 300, 300, is_causal=True, backend="torch")
        assert bool(calls) == loops
        torch.testing.assert_close(out, loop(q, k, v, cu, cu, 300, 300, is_causal=True))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_varlen_compile_fullgraph(backend):
    # Under torch.compile the cu_seqlens values are not read on the host, so the graph has no break
    # (backend="torch" pads to max_seqlen instead of looping over the sequences; its graph is
    # checked with aot_eager, which needs no C++ compiler run).
    lens = [5, 0, 17]
    cu = torch.tensor([0, 5, 5, 22], dtype=torch.int32, device=DEVICE)
    q, k, v = (rand((sum(lens), 2, 16), F32).requires_grad_() for _ in range(3))

    def fn(q, k, v):
        return fastbert.varlen_attention(q, k, v, cu, cu, 17, 17, is_causal=True, backend=backend)

    compiler = "aot_eager" if backend == "torch" and DEVICE == "cpu" else "inductor"
    out = torch.compile(fn, fullgraph=True, backend=compiler)(q, k, v)
    dout = rand(out.shape)
    grads = torch.autograd.grad(out, [q, k, v], dout)
    eager = fn(q, k, v)
    eager_grads = torch.autograd.grad(eager, [q, k, v], dout)
    assert torch.equal(out, eager)
    for g, e in zip(grads, eager_grads):
        assert torch.equal(g, e)


# ----------------------------------------------------------------------------------------------
# Opt-in autotuning (FASTBERT_AUTOTUNE=1): the choice logic here, the timing on a GPU
# ----------------------------------------------------------------------------------------------
def test_autotune_candidates_fit_shared_memory():
    for kind in ("fwd", "bwd_dkdv", "bwd_dq"):
        for elem, bd in ((2, 64), (2, 128), (4, 64), (2, 256)):
            default = (32, 16, 4, 1)
            budget = 100 * 1024
            cands = kernels.tune_candidates(kind, default, bd, bd, elem, budget)
            assert cands[0] == default and len(set(cands)) == len(cands)
            for bm, bn, warps, stages in cands[1:]:
                assert kernels._smem_estimate(kind, bm, bn, stages, bd, bd, elem) <= budget
                assert warps in (4, 8) and stages in (2, 3)
    assert kernels.tune_candidates("fwd", (1, 2, 3, 4), 256, 256, 4, 1) == [(1, 2, 3, 4)]


def test_autotune_pick_fastest():
    times = {(1, 1, 4, 2): 3.0, (2, 2, 4, 2): 1.0, (3, 3, 8, 3): 2.0}

    def timer(cfg):
        if cfg == (9, 9, 9, 9):
            raise RuntimeError("out of resources")
        return times[cfg]

    best, measured = kernels.pick_fastest([(1, 1, 4, 2), (9, 9, 9, 9), (2, 2, 4, 2), (3, 3, 8, 3)], timer)
    assert best == (2, 2, 4, 2) and set(measured) == set(times)
    assert kernels.pick_fastest([(9, 9, 9, 9)], timer) == ((9, 9, 9, 9), {})


def test_autotune_off_or_on_cpu_keeps_the_table(monkeypatch):
    def launch(cfg):
        raise AssertionError("nothing is timed")

    keyf = lambda: ("k",)  # noqa: E731
    monkeypatch.delenv(kernels.AUTOTUNE_ENV, raising=False)
    cfg = (32, 16, 4, 1)
    assert kernels._tuned_config("fwd", keyf, cfg, torch.device("cpu"), 64, 64, 2, launch) == cfg
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "1")
    assert kernels._tuned_config("fwd", keyf, cfg, torch.device("cpu"), 64, 64, 2, launch) == cfg


def test_autotune_cache_file_round_trip(tmp_path, monkeypatch):
    path = str(tmp_path / "sub" / "configs.json")
    monkeypatch.setattr(kernels, "_TUNED", {})
    monkeypatch.setattr(kernels, "_TUNED_FILE_LOADED", {})
    kernels._save_tuned(path, "fwd|x", (128, 64, 8, 3))
    kernels._save_tuned(path, "bwd_dq|x", (64, 32, 4, 2))
    kernels._load_tuned(path)
    assert kernels._TUNED == {"fwd|x": (128, 64, 8, 3), "bwd_dq|x": (64, 32, 4, 2)}
    (tmp_path / "bad.json").write_text("{not json")
    kernels._load_tuned(str(tmp_path / "bad.json"))  # ignored, not raised
    kernels._load_tuned(str(tmp_path / "missing.json"))


def test_autotune_key_tells_strided_head_dims_apart():
    q = torch.empty(2, 3, 17, 40)
    k_strided = torch.empty(2, 3, 40, 9).transpose(-1, -2)  # head dim not contiguous
    v = torch.empty(2, 9, 3, 40).transpose(1, 2)             # (B, L, H, D) view: head dim contiguous
    args = (40, 40, kernels.MASK_NONE, 0.0, False, False, 17, 9)
    plain = kernels._tune_key((q, q[:, :, :9], v), *args)
    strided = kernels._tune_key((q, k_strided, v), *args)
    assert plain[-1] == "strided000" and strided[-1] == "strided010" and plain[:-1] == strided[:-1]


@pytest.mark.cuda
def test_autotune_on_gpu(tmp_path, monkeypatch):
    """FASTBERT_AUTOTUNE=1: the first call times candidates and writes the cache file; results stay
    exact; a second call reuses the choice without timing anything."""
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "1")
    monkeypatch.setenv(kernels.AUTOTUNE_CACHE_ENV, str(tmp_path / "configs.json"))
    monkeypatch.setattr(kernels, "_TUNED", {})
    monkeypatch.setattr(kernels, "_TUNED_FILE_LOADED", {})
    q, k, v = (rand((2, 3, 257, 64), F16, "cuda", requires_grad=True) for _ in range(3))
    dy = rand((2, 3, 257, 64), F16, "cuda")

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fastbert.scaled_dot_product_attention(*leaves, is_causal=True, backend="triton")
        out.backward(dy)
        return [out] + [t.grad for t in leaves]

    first = run()
    saved = json.loads((tmp_path / "configs.json").read_text())
    assert {key.split("|")[0] for key in saved} == {"fwd", "bwd_dkdv", "bwd_dq"}
    monkeypatch.setattr(kernels, "pick_fastest", lambda *a: pytest.fail("tuned twice"))
    second = run()
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.scaled_dot_product_attention(*refs, is_causal=True)
    ref.backward(dy.double())
    lows = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low = reference.scaled_dot_product_attention(*lows, is_causal=True, compute_dtype=F16)
    low.backward(dy)
    for got in (first, second):
        assert_close(got[0], ref, low, name="out")
        for name, g, r, lo in zip(("dq", "dk", "dv"), got[1:], refs, lows):
            assert_close(g, r.grad, lo.grad, name=name)


def test_fp32_dot_precision_follows_torch_tf32_settings():
    """TF32 set through torch's new fp32_precision API (HuggingFace's enable_tf32 does so) made
    every fp32 Triton attention call raise: reading the legacy allow_tf32 flag then is an error."""
    from fastbert.kernels import attention as kern

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert kern._dot_precision(torch.float32) == "tf32"
        q = rand((1, 2, 17, 16), F32)
        out = fastbert.scaled_dot_product_attention(q, q, q, backend="triton")  # used to raise
        assert torch.isfinite(out).all()
        matmul.fp32_precision = "ieee"
        assert kern._dot_precision(torch.float32) == "ieee"
        assert kern._dot_precision(torch.float16) == "tf32"  # 16-bit inputs: not affected
    finally:
        matmul.fp32_precision = before


def test_triton_attention_refuses_gpus_before_sm80(monkeypatch):
    from fastbert.ops import attention as ops_attention

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    reasons = ops_attention._triton_attention_arch_reasons(torch.device("cuda", 0))
    assert reasons and "7.5" in reasons[0] and "8.0" in reasons[0]
    assert ops_attention._triton_attention_arch_reasons(torch.device("cpu")) == []


# ----------------------------------------------------------------------------------------------
# a trainable float mask with fully masked rows; only some inputs requiring grad; varlen dropout
# statistics and upstream-gradient layouts (helper 59's coverage audit: cases that only the fuzz
# tests drew)
# ----------------------------------------------------------------------------------------------
DEAD_ROW_MASKS = [
    # mask shape, q dtype, mask dtype, causal, dropout p, head dim, backend
    ("BHQK", F32, F32, False, 0.0, 40, "triton"),
    ("B1QK", F16, F16, True, 0.0, 80, "triton"),
    ("11QK", F16, F32, False, 0.0, 40, "triton"),   # an fp32 bias with fp16 inputs
    ("B1QK", F32, F16, False, 0.0, 96, "triton"),   # an fp16 bias with fp32 inputs
    ("B1QK", F32, F32, True, 0.3, 40, "triton"),
    ("BHQK", F16, F32, False, 0.3, 40, "triton"),
    ("B1QK", F16, F32, True, 0.0, 40, "torch"),
]


@pytest.mark.parametrize(
    "shape_code,dtype,mask_dtype,causal,p,d,backend",
    [pytest.param(*c, id=_case_id(2, 2, 17, 33, c[5], c[1], c[3],
                                  f"dmask{c[0]}-{DTYPE_NAMES[c[2]]}-p{c[4]}-{c[6]}"))
     for c in DEAD_ROW_MASKS])
def test_sdpa_trainable_mask_with_dead_rows(shape_code, dtype, mask_dtype, causal, p, d, backend,
                                            fresh_seed):
    """A float mask that requires grad, with a query row that is -inf everywhere (in every batch
    entry and head the mask spans) and, when the mask has a batch dim, a batch entry that is -inf
    everywhere: those rows give 0, dq and dmask 0 there (and dk / dv 0 for the dead batch entry),
    no NaN anywhere; every gradient against fp64 (with dropout, on the kernel's exact keep-mask)."""
    b, h, lq, lk = 2, 2, 17, 33
    leaves = _leaves(b, h, lq, lk, d, d, dtype, "bhld")
    shape = _mask_shape(shape_code, b, h, lq, lk)
    mask = torch.randn(shape, device=DEVICE)
    mask[..., 3, :] = float("-inf")
    dead_batch = shape[0] == b
    if dead_batch:
        mask[1] = float("-inf")
    mask = mask.to(mask_dtype).requires_grad_()
    keep = None
    if p:
        seed = _seed_of_call(fresh_seed, leaves, mask, p, causal)
        keep = kernels.attention_dropout_mask(seed, p, (b, h, lq, lk))
        torch.manual_seed(fresh_seed)
    out, grads = _check_sdpa(leaves, "bhld", mask=mask, causal=causal, dropout_p=p,
                             dropout_mask=keep, backend=backend)
    dq, dk, dv, dmask = grads
    assert dmask.shape == mask.shape
    for t in (out, dq, dk, dv, dmask):
        assert torch.isfinite(t).all()
    assert (out[:, :, 3] == 0).all() and (dq[:, :, 3] == 0).all() and (dmask[..., 3, :] == 0).all()
    if dead_batch:
        for t in (out, dq, dk, dv, dmask):
            assert (t[1] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape_code,dtype,causal", [
    pytest.param("1HQK", F32, True, id=_case_id(2, 2, 17, 33, 40, F32, True, "dmask1HQK")),
    pytest.param("BHQK", F16, False, id=_case_id(2, 2, 17, 33, 40, F16, False, "dmaskBHQK")),
])
def test_sdpa_grad_of_the_mask_alone(shape_code, dtype, causal, backend):
    """A trainable bias in front of frozen q, k, v (only the mask requires grad): the output
    requires grad and the mask's gradient is right (against fp64, same upstream gradient)."""
    b, h, lq, lk, d = 2, 2, 17, 33, 40
    q, k, v = (rand((b, h, n, d), dtype) for n in (lq, lk, lk))
    mask = _make_mask("float", _mask_shape(shape_code, b, h, lq, lk), dtype).requires_grad_()
    out = fastbert.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                backend=backend)
    assert out.requires_grad
    dout = rand(out.shape, dtype)
    dmask, = torch.autograd.grad(out, mask, dout)
    ref_mask = _clone_leaf(mask, torch.float64)
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), ref_mask,
                                                 is_causal=causal)
    ref_dmask, = torch.autograd.grad(ref, ref_mask, dout.double())
    low_mask = _clone_leaf(mask)
    low = reference.scaled_dot_product_attention(q, k, v, low_mask, is_causal=causal,
                                                 compute_dtype=dtype)
    low_dmask, = torch.autograd.grad(low, low_mask, dout)
    assert_close(out, ref, low, name="out")
    assert dmask.dtype == dtype and dmask.shape == mask.shape
    assert_close(dmask, ref_dmask, low_dmask, name="dmask")


def _check_varlen(leaves, lens_q, lens_k, mask=None, backend="triton", dout=None, **kw):
    """varlen_attention on ``leaves`` (q, k, v) against the fp64 reference and the reference in
    the inputs' dtype, one upstream gradient for all three (``dout``: given, any layout; else
    drawn): the output and the gradient of each of q, k, v and ``mask`` that requires grad."""
    dtype = leaves[0].dtype
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    max_q, max_k = max(lens_q), max(lens_k)
    inputs = list(leaves) + [mask]
    wrt = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]

    def run(ts, fn, **extra):
        out = fn(*ts[:3], cu_q, cu_k, max_q, max_k, attn_mask=ts[3], **kw, **extra)
        return out, torch.autograd.grad(out, [ts[i] for i in wrt], up.to(out.dtype))

    out = fastbert.varlen_attention(*leaves, cu_q, cu_k, max_q, max_k, attn_mask=mask,
                                    backend=backend, **kw)
    up = rand(out.shape, dtype) if dout is None else dout
    grads = torch.autograd.grad(out, [inputs[i] for i in wrt], up)
    ref, ref_grads = run([_clone_leaf(t, torch.float64 if t is not None and t.is_floating_point()
                                      else None) for t in inputs], reference.varlen_attention)
    low, low_grads = run([_clone_leaf(t) for t in inputs], reference.varlen_attention,
                         compute_dtype=dtype)
    assert_close(out, ref, low, name="out")
    names = ("dq", "dk", "dv", "dmask")
    for i, g, r, lo in zip(wrt, grads, ref_grads, low_grads):
        assert g.dtype == inputs[i].dtype and torch.isfinite(g).all(), names[i]
        assert_close(g, r, lo, name=names[i])
    return out, dict(zip((names[i] for i in wrt), grads))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_varlen_trainable_mask_with_dead_rows(dtype, backend):
    """A per-sequence float mask that requires grad, with a query row that is -inf everywhere and a
    sequence with no key: those rows give 0, dq and dmask 0 there, no NaN; all against fp64."""
    lens_q, lens_k, h, d = [17, 5, 30], [20, 0, 9], 2, 40
    leaves = _varlen_leaves(lens_q, lens_k, h, d, dtype, "plain")
    mask = torch.randn((3, h, max(lens_q), max(lens_k)), device=DEVICE)
    mask[0, :, 4] = float("-inf")
    mask.requires_grad_()
    out, g = _check_varlen(leaves, lens_q, lens_k, mask, backend)
    assert (out[4] == 0).all() and (out[17:22] == 0).all() and torch.isfinite(out).all()
    assert (g["dq"][4] == 0).all() and (g["dq"][17:22] == 0).all()
    assert (g["dmask"][0, :, 4] == 0).all() and (g["dmask"][1] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_varlen_grad_of_the_mask_alone(dtype, backend):
    """A shared trainable bias in front of frozen packed q, k, v: the mask's gradient (summed over
    the sequences) against fp64."""
    lens, h, d = [17, 5, 30], 2, 40
    q, k, v = (rand((sum(lens), h, d), dtype) for _ in range(3))
    mask = rand((1, h, 30, 30), dtype, requires_grad=True)
    out, g = _check_varlen([q, k, v], lens, lens, mask, backend, is_causal=True)
    assert out.requires_grad and list(g) == ["dmask"] and g["dmask"].shape == mask.shape


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout,dtype", [("expanded", F32), ("permuted", F16)],
                         ids=["expanded-fp32", "permuted-fp16"])
def test_varlen_upstream_gradient_layouts(layout, dtype, backend):
    """An upstream gradient with stride 0 (what out.sum() or a broadcast hands back) or a permuted,
    non-contiguous one: dq, dk and dv against fp64 with that same gradient."""
    lens_q, lens_k, h, d = [17, 1, 30], [20, 1, 30], 2, 40
    leaves = _varlen_leaves(lens_q, lens_k, h, d, dtype, "plain")
    total = sum(lens_q)
    if layout == "expanded":
        dout = rand((1, 1, d), dtype).expand(total, h, d)
    else:
        dout = rand((d, h, total), dtype).permute(2, 1, 0)
    assert not dout.is_contiguous()
    _check_varlen(leaves, lens_q, lens_k, None, backend, dout=dout, is_causal=True)


def test_varlen_dropout_statistics(fresh_seed):
    """The keep-mask the varlen kernel applies, read off its output (uniform scores, one-hot value
    rows: out[i, h, j] = keep[h, i, j] / (Lk (1 - p))): it is the documented one, keeps 1 - p of
    the entries, and differs between identical sequences and between heads (agreement of two
    independent masks: p^2 + (1 - p)^2); the same torch seed reproduces output and gradients,
    another seed changes them."""
    n, h, length, d, p = 3, 2, 61, 64, 0.3
    lens = [length] * n
    cu = _cu(lens)
    q = torch.zeros((n * length, h, d), device=DEVICE)
    k = rand((length, h, d)).repeat(n, 1, 1)  # identical sequences
    v = torch.eye(length, d, device=DEVICE)[:, None, :].expand(length, h, d).repeat(n, 1, 1)
    torch.manual_seed(fresh_seed)
    _, _, seed = torch.ops.fastbert.varlen_attention_fwd(q, k, v, cu, cu, length, length, p, False,
                                                         d ** -0.5)
    documented = kernels.varlen_attention_dropout_masks(seed, p, cu, cu, h, length, length)
    torch.manual_seed(fresh_seed)
    out = fastbert.varlen_attention(q, k, v, cu, cu, length, length, dropout_p=p, backend="triton")
    scaled = (out * (length * (1 - p))).view(n, length, h, d)[..., :length].permute(0, 2, 1, 3)
    keep = scaled > 0.5  # (N, H, Lq, Lk): 1 where kept, 0 where dropped
    torch.testing.assert_close(scaled, keep.float(), atol=1e-4, rtol=0)
    for i in range(n):
        assert torch.equal(keep[i], documented[i])
    kept = keep.float().mean().item()
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / keep.numel()) ** 0.5, kept
    agree = p * p + (1 - p) ** 2
    for a, b in ((keep[0], keep[1]), (keep[1], keep[2]), (keep[0, 0], keep[0, 1]), (keep[2, 0], keep[2, 1])):
        assert abs((a == b).float().mean().item() - agree) < 0.05

    leaves = _varlen_leaves([17, 0, 30], [20, 5, 30], 2, 40, F32, "plain")
    cq, ck = _cu([17, 0, 30]), _cu([20, 5, 30])
    runs = []
    for s in (fresh_seed, fresh_seed, fresh_seed + 1):
        torch.manual_seed(s)
        o = fastbert.varlen_attention(*leaves, cq, ck, 30, 30, dropout_p=p, backend="triton")
        runs.append((o,) + torch.autograd.grad(o, leaves, torch.ones_like(o)))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0]) and not torch.equal(runs[0][1], runs[2][1])
