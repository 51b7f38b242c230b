"""fastbert.reference against independent computations in float64 (to 1e-10).

Independent means: torch's own SDPA math backend, F.layer_norm, F.gelu, explicit per-sequence and
per-element loops. These tests are what makes the reference a ground truth for every kernel.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastbert import reference

TOL = 1e-10
f64 = torch.float64


def r(*shape, grad=True):
    return torch.randn(*shape, dtype=f64, requires_grad=grad)


def grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


def assert_all_close(a, b, tol=TOL):
    for x, y in zip(a, b):
        if x is None and y is None:
            continue
        assert (x - y).abs().max().item() <= tol


def _torch_sdpa_math(q, k, v, attn_mask=None, is_causal=False, scale=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale)


MASKS = ["none", "bool-keypad", "float-bias", "bool-full-2d", "causal"]


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("lq,lk,d", [(1, 1, 8), (17, 97, 40), (130, 17, 80), (33, 33, 96)],
                         ids=lambda v: str(v))
def test_sdpa_matches_torch_math(mask_kind, lq, lk, d):
    b, h = 2, 3
    q, k, v = r(b, h, lq, d), r(b, h, lk, d), r(b, h, lk, d)
    mask, causal = None, False
    if mask_kind == "bool-keypad":
        mask = torch.rand(b, 1, 1, lk) > 0.3
        mask[..., 0] = True  # torch gives NaN on fully-masked rows; keep every row alive here
    elif mask_kind == "float-bias":
        mask = r(1, h, lq, lk)
    elif mask_kind == "bool-full-2d":
        mask = torch.rand(lq, lk) > 0.5
        mask[:, 0] = True
    elif mask_kind == "causal":
        causal = True
    scale = 0.3 if mask_kind == "float-bias" else None
    out = reference.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=scale)
    want = _torch_sdpa_math(q, k, v, mask, causal, scale)
    assert out.dtype == f64
    assert (out - want).abs().max() <= TOL
    g = torch.randn_like(out)
    inputs = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    assert_all_close(grads(out, inputs, g), grads(want, inputs, g))


@pytest.mark.parametrize("hkv", [1, 2, 6], ids=["MQA", "GQA", "MHA"])
def test_sdpa_gqa_matches_torch(hkv):
    """enable_gqa maps query head h to key / value head h // (H / Hkv), as torch does; gradients
    of the shared heads sum over their group."""
    q, k, v = r(2, 6, 7, 8), r(2, hkv, 9, 8), r(2, hkv, 9, 8)
    g = torch.randn(2, 6, 7, 8, dtype=f64)
    ours = reference.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert_all_close([ours], [theirs])
    assert_all_close(grads(ours, [q, k, v], g), grads(theirs, [q, k, v], g))


def test_alibi_bias_and_sdpa_with_alibi():
    """alibi_bias[h, i, j] = -slope[h] * |i - j|; with_alibi adds it to any mask kind; sdpa's
    alibi_slopes equals passing that bias as a float mask."""
    slopes = torch.tensor([0.5, 0.25], dtype=f64)
    bias = reference.alibi_bias(slopes, 3, 4)
    for h in range(2):
        for i in range(3):
            for j in range(4):
                assert bias[h, i, j].item() == -slopes[h].item() * abs(i - j)
    assert reference.alibi_bias(slopes.expand(5, 2), 3, 4).shape == (5, 2, 3, 4)
    keep = torch.tensor([True, True, False, True])
    merged = reference.with_alibi(keep, slopes, 3, 4, f64)
    assert torch.isinf(merged[..., 2]).all() and torch.equal(merged[..., [0, 1, 3]], bias[..., [0, 1, 3]])
    q, k, v = r(2, 2, 3, 8), r(2, 2, 4, 8), r(2, 2, 4, 8)
    a = reference.scaled_dot_product_attention(q, k, v, keep, alibi_slopes=slopes)
    b = reference.scaled_dot_product_attention(q, k, v, merged)
    assert_all_close([a], [b])


def test_window_mask():
    keep = reference.window_mask((1, 2), 4, 6)
    for i in range(4):
        for j in range(6):
            assert bool(keep[i, j]) == (i - 1 <= j <= i + 2)
    assert torch.equal(reference.window_mask((-1, 0), 5, 5), torch.ones(5, 5).tril().bool())
    assert reference.window_mask((-1, -1), 3, 4).all()
    float_mask = torch.zeros(4, 6, dtype=f64)
    merged = reference.with_window(float_mask, (1, 2), 4, 6)
    assert torch.equal(torch.isinf(merged), ~keep)


def test_sdpa_causal_is_top_left_aligned():
    # With Lq < Lk, top-left alignment means query i sees keys 0..i (not the bottom-right diagonal).
    q, k, v = r(1, 1, 3, 8), r(1, 1, 5, 8), r(1, 1, 5, 8)
    out = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.ones(3, 5, dtype=torch.bool).tril()
    want = _torch_sdpa_math(q, k, v, attn_mask=mask)
    assert (out - want).abs().max() <= TOL


def test_sdpa_fully_masked_rows_are_zero_without_nan():
    b, h, lq, lk, d = 2, 2, 5, 7, 8
    q, k, v = r(b, h, lq, d), r(b, h, lk, d), r(b, h, lk, d)
    mask = torch.rand(b, h, lq, lk) > 0.5
    mask[0, 1, 2] = False          # one fully-masked row
    mask[1] = False                # a whole batch entry masked
    fmask = torch.where(mask, 0.0, float("-inf")).to(f64).requires_grad_()
    for m in (mask, fmask):
        out = reference.scaled_dot_product_attention(q, k, v, m)
        assert not torch.isnan(out).any()
        assert (out[0, 1, 2] == 0).all() and (out[1] == 0).all()
        inputs = [q, k, v] + ([m] if m.requires_grad else [])
        gs = grads(out, inputs, torch.randn_like(out))
        for gr in gs:
            assert not torch.isnan(gr).any()
        assert (gs[0][0, 1, 2] == 0).all() and (gs[0][1] == 0).all()
        # Rows that are alive agree with torch.
        alive = mask.any(-1)
        want = _torch_sdpa_math(q, k, v, attn_mask=mask)
        assert (out[alive] - want[alive]).abs().max() <= TOL


@pytest.mark.parametrize("lq,lk", [(7, 0), (0, 5)])
def test_sdpa_without_keys_or_queries(lq, lk):
    """No key at all: every row is fully masked, output 0 (torch's SDPA agrees); no query: empty."""
    q = torch.randn(2, 3, lq, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, lk, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, lk, 8, dtype=torch.float64, requires_grad=True)
    out = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == (2, 3, lq, 8) and torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    out.sum().backward()
    assert (q.grad == 0).all() and k.grad.shape == k.shape


def test_sdpa_dropout_mask_explicit():
    b, h, l, d, p = 1, 2, 9, 8, 0.4
    q, k, v = r(b, h, l, d), r(b, h, l, d), r(b, h, l, d)
    keep = torch.rand(b, h, l, l) >= p
    out = reference.scaled_dot_product_attention(q, k, v, dropout_p=p, dropout_mask=keep)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    probs = torch.softmax(s, -1) * keep / (1 - p)
    assert (out - probs @ v).abs().max() <= TOL


def test_sdpa_dropout_statistics():
    q, k = torch.zeros(1, 1, 64, 8, dtype=f64), torch.zeros(1, 1, 512, 8, dtype=f64)
    v = torch.ones(1, 1, 512, 8, dtype=f64)
    out = reference.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    # Uniform weights 1/512, kept with prob 0.75 and scaled by 1/0.75: mean output stays 1.
    assert abs(out.mean().item() - 1.0) < 0.03


def test_sdpa_compute_dtype_and_output_dtype():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float16)
    out = reference.scaled_dot_product_attention(q, q, q)
    assert out.dtype == torch.float16
    out64 = reference.scaled_dot_product_attention(q, q, q, compute_dtype=f64)
    # two fp16 ulps of the largest output (a fixed 2e-3 is less than one ulp once |out| >= 4:
    # about 1 draw in 2e6 failed on a one-ulp difference)
    bound = 2.0 ** -9 * max(1.0, float(out64.abs().max()))
    assert (out.double() - out64.double()).abs().max() <= bound


def test_varlen_matches_padded_sdpa_loop():
    lens_q, lens_k = [3, 17, 1, 0, 9], [5, 17, 4, 2, 9]
    h, d = 2, 16
    cq = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    ck = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q, k, v = r(sum(lens_q), h, d), r(sum(lens_k), h, d), r(sum(lens_k), h, d)
    for causal in (False, True):
        out = reference.varlen_attention(q, k, v, cq, ck, max(lens_q), max(lens_k), is_causal=causal)
        assert out.shape == (sum(lens_q), h, d)
        # Independent: each sequence padded into one batch, padding masked out, via torch SDPA.
        n, lq_max, lk_max = len(lens_q), max(lens_q), max(lens_k)
        qp = torch.zeros(n, h, lq_max, d, dtype=f64)
        kp = torch.zeros(n, h, lk_max, d, dtype=f64)
        vp = torch.zeros(n, h, lk_max, d, dtype=f64)
        mask = torch.zeros(n, 1, lq_max, lk_max, dtype=torch.bool)
        for i in range(n):
            qp[i, :, :lens_q[i]] = q[cq[i]:cq[i + 1]].transpose(0, 1)
            kp[i, :, :lens_k[i]] = k[ck[i]:ck[i + 1]].transpose(0, 1)
            vp[i, :, :lens_k[i]] = v[ck[i]:ck[i + 1]].transpose(0, 1)
            m = torch.ones(lens_q[i], lens_k[i], dtype=torch.bool)
            mask[i, 0, :lens_q[i], :lens_k[i]] = m.tril() if causal else m
        mask[..., 0] |= ~mask.any(-1)  # keep torch away from NaN on padding rows (not compared)
        want = _torch_sdpa_math(qp, kp, vp, attn_mask=mask)
        for i in range(n):
            got_i = out[cq[i]:cq[i + 1]].transpose(0, 1)
            if lens_k[i] == 0:
                assert (got_i == 0).all()
            elif lens_q[i] > 0:
                assert (got_i - want[i, :, :lens_q[i]]).abs().max() <= TOL


def test_block_sparse_matches_explicit_loop():
    b, h, lq, lk, d, bs = 2, 2, 37, 21, 8, 8
    q, k, v = r(b, h, lq, d), r(b, h, lk, d), r(b, h, lk, d)
    nbq, nbk = math.ceil(lq / bs), math.ceil(lk / bs)
    layout = torch.rand(h, nbq, nbk) > 0.5
    layout[1, 2] = False  # a query block with no key block
    keypad = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    keypad[1, ..., -5:] = False
    out = reference.block_sparse_attention(q, k, v, layout, bs, attn_mask=keypad)
    want = torch.zeros_like(out)
    scale = 1 / math.sqrt(d)
    for bi in range(b):
        for hi in range(h):
            for i in range(lq):
                keys = [j for j in range(lk) if layout[hi, i // bs, j // bs] and keypad[bi, 0, 0, j]]
                if not keys:
                    continue
                s = torch.stack([q[bi, hi, i] @ k[bi, hi, j] * scale for j in keys])
                p = torch.softmax(s, 0)
                want[bi, hi, i] = sum(p[n] * v[bi, hi, j] for n, j in enumerate(keys))
    assert (out - want).abs().max() <= TOL


def test_linformer_matches_explicit_formula():
    b, h, lq, lk, d, kp = 2, 3, 11, 13, 8, 4
    q, k, v = r(b, h, lq, d), r(b, h, lk, d), r(b, h, lk, d)
    e, f = r(h, kp, lk), r(kp, lk)
    pad = torch.zeros(b, lk, dtype=torch.bool)
    pad[0, -3:] = True
    out = reference.linformer_attention(q, k, v, e, f, key_padding_mask=pad)
    want = torch.zeros_like(out)
    for bi in range(b):
        real = (~pad[bi]).nonzero().flatten()
        for hi in range(h):
            kproj = e[hi][:, real] @ k[bi, hi][real]  # (kp, d): padded columns dropped
            vproj = f[:, real] @ v[bi, hi][real]
            p = torch.softmax(q[bi, hi] @ kproj.T / math.sqrt(d), -1)
            want[bi, hi] = p @ vproj
    assert (out - want).abs().max() <= TOL
    g = torch.randn_like(out)
    assert_all_close(grads(out, [q, k, v, e, f], g), grads(want, [q, k, v, e, f], g))


@pytest.mark.parametrize("shape,nshape", [((17, 97), (97,)), ((3, 5, 7), (5, 7)), ((4, 1), (1,))],
                         ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_torch(shape, nshape, affine):
    x = r(*shape) * 10 + 3
    w, bias = (r(*nshape), r(*nshape)) if affine else (None, None)
    out = reference.layer_norm(x, nshape, w, bias, 1e-5)
    want = F.layer_norm(x, nshape, w, bias, 1e-5)
    assert (out - want).abs().max() <= TOL
    g = torch.randn_like(out)
    inputs = [x] + ([w, bias] if affine else [])
    assert_all_close(grads(out, inputs, g), grads(want, inputs, g), 1e-9)


def test_add_layer_norm_matches_composition():
    n = 97
    x, res, w, bias, ib = r(17, n), r(17, n), r(n), r(n), r(n)
    keep = torch.rand(17, n) >= 0.1
    out, s = reference.add_layer_norm(x, res, w, bias, 1e-6, input_bias=ib, dropout_p=0.1,
                                      dropout_mask=keep, return_residual=True)
    want_s = (x + ib) * keep / 0.9 + res
    want = F.layer_norm(want_s, (n,), w, bias, 1e-6)
    assert (s - want_s).abs().max() <= TOL
    assert (out - want).abs().max() <= TOL
    g = torch.randn_like(out)
    assert_all_close(grads(out, [x, res, w, bias, ib], g), grads(want, [x, res, w, bias, ib], g), 1e-9)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_bias_gelu_match_torch(approximate):
    x, bias = r(17, 97) * 4, r(97)
    assert (reference.gelu(x, approximate) - F.gelu(x, approximate=approximate)).abs().max() <= TOL
    out = reference.bias_gelu(x, bias, approximate)
    want = F.gelu(x + bias, approximate=approximate)
    assert (out - want).abs().max() <= TOL
    g = torch.randn_like(out)
    assert_all_close(grads(out, [x, bias], g), grads(want, [x, bias], g))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_geglu_matches_torch(approximate):
    x, gate = r(17, 2 * 97) * 4, r(17, 97)
    packed = reference.geglu(x, None, approximate)
    want = F.gelu(x[:, :97], approximate=approximate) * x[:, 97:]
    assert packed.shape == (17, 97) and (packed - want).abs().max() <= TOL
    g = torch.randn_like(want)
    assert_all_close(grads(packed, [x], g), grads(want, [x], g))
    two = reference.geglu(x[:, :97], gate, approximate)
    want = F.gelu(x[:, :97], approximate=approximate) * gate
    assert_all_close(grads(two, [x, gate], g), grads(want, [x, gate], g))


def test_layout_to_mask_crops_partial_blocks():
    layout = torch.tensor([[[True, False], [False, True]]])
    m = reference.layout_to_mask(layout, 4, 6, 5)
    assert m.shape == (1, 6, 5)
    assert m[0, :4, :4].all() and not m[0, :4, 4:].any() and m[0, 4:, 4:].all() and not m[0, 4:, :4].any()


def test_layout_to_mask_matches_block_expansion_and_takes_huge_blocks():
    """Token (i, j) takes block (i // bs, j // bs): the same as repeating every block bs times,
    without materialising the (nb * bs)^2 expansion (a huge block size costs nothing)."""
    layout = torch.rand(3, 4, 5) > 0.5
    want = layout.repeat_interleave(16, dim=-2).repeat_interleave(16, dim=-1)[..., :50, :70]
    assert torch.equal(reference.layout_to_mask(layout, 16, 50, 70), want)
    one = torch.tensor([[[True]], [[False]]])
    m = reference.layout_to_mask(one, 2 ** 40, 5, 7)
    assert m.shape == (2, 5, 7) and m[0].all() and not m[1].any()
