"""fastbert.block_sparse_attention: the reference against an explicit per-row loop, and the Triton
kernel against the reference in float64 (values and dq/dk/dv with the same upstream gradient) for
every preset, several block sizes, awkward lengths, per-head layouts, masks, dropout and strides.

On CPU the Triton kernel runs under the interpreter (TRITON_INTERPRET=1, set by conftest)."""
import math

import pytest
import torch

import fastbert
from fastbert import reference
from fastbert import sparsity as S
from fastbert.backends import BackendError
from fastbert.testing import DEVICE, assert_close, assert_fresh_replays, cuda_graph_replays, rand

TRITON = dict(backend="triton")


def nb(n, bs):
    return -(-n // bs)


# ----------------------------------------------------------------------------------------------
# The reference, checked independently
# ----------------------------------------------------------------------------------------------
def loop_block_sparse(q, k, v, layout, bs, attn_mask=None, scale=None, dropout_p=0.0,
                      dropout_mask=None):
    """Row by row in float64: query i of head h sees key j iff layout[h or 0, i // bs, j // bs]
    and the mask lets it; softmax over those keys only; no key -> 0."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mask = None if attn_mask is None else attn_mask.expand(b, h, lq, lk)
    out = torch.zeros(b, h, lq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            lay = layout[hi if layout.shape[0] > 1 else 0]
            for i in range(lq):
                cols = [j for j in range(lk) if lay[i // bs, j // bs]]
                if mask is not None and mask.dtype == torch.bool:
                    cols = [j for j in cols if mask[bi, hi, i, j]]
                if not cols:
                    continue
                idx = torch.tensor(cols)
                s = (k[bi, hi, idx] @ q[bi, hi, i]) * scale
                if mask is not None and mask.dtype != torch.bool:
                    s = s + mask[bi, hi, i, idx].double()
                if not torch.isfinite(s).any():
                    continue
                p = torch.exp(s - s.max())
                p = p / p.sum()
                if dropout_mask is not None:
                    p = p * dropout_mask[bi, hi, i, idx].double() / (1.0 - dropout_p)
                out[bi, hi, i] = p @ v[bi, hi, idx]
    return out


@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "float_bias", "dropout"])
def test_reference_matches_loop(mask_kind):
    b, h, lq, lk, d, bs = 2, 2, 37, 29, 8, 8
    q, k, v = (rand((b, h, n, d), torch.float64, "cpu") for n in (lq, lk, lk))
    layout = S.bigbird(lq, bs, key_len=lk, random_blocks=1, num_heads=h, seed=2)
    layout[0, 1, :] = False  # a query block with no key block
    mask, p, keep = None, 0.0, None
    if mask_kind == "key_padding":
        mask = torch.rand(b, 1, 1, lk) > 0.3
        mask[1] = False  # batch 1 sees no key at all
    elif mask_kind == "float_bias":
        mask = torch.randn(b, h, lq, lk, dtype=torch.float64)
        mask[0, 0, 5, :] = float("-inf")  # a row removed by -inf
    elif mask_kind == "dropout":
        p = 0.3
        keep = torch.rand(b, h, lq, lk) >= p
    want = loop_block_sparse(q, k, v, layout, bs, mask, 0.3, p, keep)
    got = reference.block_sparse_attention(q, k, v, layout, bs, mask, p, 0.3, dropout_mask=keep)
    assert_close(got, want, atol=1e-12)
    # and the row-level claim directly: block 1 of head 0 returns 0
    assert torch.equal(got[:, 0, bs:2 * bs], torch.zeros_like(got[:, 0, bs:2 * bs]))


# ----------------------------------------------------------------------------------------------
# Triton vs reference
# ----------------------------------------------------------------------------------------------
def make_layout(preset, lq, lk, bs, h):
    kw = dict(key_len=lk)
    if preset == "dense":
        return S.dense(lq, bs, **kw)
    if preset == "sliding":
        return S.sliding_window(lq, bs, window=1, **kw)
    if preset == "longformer":
        return S.global_tokens(lq, bs, window=1, global_blocks=1, **kw)
    if preset == "bigbird":  # per-head random blocks
        return S.bigbird(lq, bs, window=1, global_blocks=1, random_blocks=1, num_heads=h,
                         seed=int(torch.randint(0, 1000, ())), **kw)
    if preset == "fixed":
        return S.fixed(lq, bs, stride=2, summary=1, **kw)
    if preset == "strided":
        return S.strided(lq, bs, stride=2, causal=True, **kw)
    if preset == "perhead":  # a different preset per head
        lays = [S.sliding_window(lq, bs, window=0, **kw), S.strided(lq, bs, stride=3, **kw),
                S.fixed(lq, bs, stride=2, summary=1, causal=True, **kw)]
        return torch.cat([lays[i % 3] for i in range(h)])
    raise ValueError(preset)


def run_case(q, k, v, layout, bs, attn_mask=None, scale=None, check_grads=True):
    """Triton vs the float64 reference, with a PyTorch low-precision computation as the yardstick
    (fastbert.testing rule); outputs and dq/dk/dv with the same upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fastbert.block_sparse_attention(*leaves, layout, bs, attn_mask, 0.0, scale, **TRITON)
    ref64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = reference.block_sparse_attention(*ref64, layout, bs, attn_mask, 0.0, scale)
    lowp = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    low = reference.block_sparse_attention(*lowp, layout, bs, attn_mask, 0.0, scale,
                                           compute_dtype=q.dtype)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert_close(out, ref, low, name="out")
    if not check_grads:
        return out
    g = torch.randn(out.shape, device=q.device).to(q.dtype)  # the same upstream gradient for all
    grads = torch.autograd.grad(out, leaves, g)
    grads_ref = torch.autograd.grad(ref, ref64, g.double())
    grads_low = torch.autograd.grad(low, lowp, g)
    for name, a, r, lo in zip(("dq", "dk", "dv"), grads, grads_ref, grads_low):
        assert torch.isfinite(a).all(), name
        assert_close(a, r, lo, name=name)
    return out


DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (preset, B, H, Lq, Lk, D, block_size, dtype)
CASES = [
    ("dense", 1, 2, 97, 97, 40, 16, "fp32"),
    ("sliding", 2, 2, 130, 130, 80, 32, "fp16"),
    ("longformer", 1, 3, 130, 97, 40, 64, "fp32"),
    ("bigbird", 2, 3, 97, 97, 96, 32, "fp16"),
    ("fixed", 1, 2, 97, 130, 64, 16, "fp32"),
    ("strided", 1, 2, 130, 130, 40, 32, "fp16"),
    ("perhead", 1, 3, 130, 130, 80, 64, "fp32"),
    ("bigbird", 1, 2, 130, 17, 48, 16, "fp32"),
    ("dense", 2, 1, 1, 17, 8, 64, "fp16"),
    ("sliding", 1, 1, 33, 33, 256, 16, "fp32"),
]


def case_id(c):
    preset, b, h, lq, lk, d, bs, dt = c
    return f"B{b}-H{h}-Lq{lq}-Lk{lk}-D{d}-bs{bs}-{dt}-{preset}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_triton_presets(case):
    preset, b, h, lq, lk, d, bs, dt = case
    dtype = DT[dt]
    q, k, v = (rand((b, h, n, d), dtype) for n in (lq, lk, lk))
    run_case(q, k, v, make_layout(preset, lq, lk, bs, h).to(DEVICE), bs)


@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_triton_from_token_mask_exact(dt):
    """A token-level pattern: its covering layout plus the token mask itself as attn_mask."""
    b, h, lq, lk, d, bs = 1, 2, 97, 130, 40, 16
    tok = torch.rand(h, lq, lk) < 0.05
    tok |= torch.eye(lq, lk, dtype=torch.bool)
    layout = S.from_token_mask(tok, bs).to(DEVICE)
    q, k, v = (rand((b, h, n, d), DT[dt]) for n in (lq, lk, lk))
    run_case(q, k, v, layout, bs, attn_mask=tok.unsqueeze(0).to(DEVICE))


MASKS = ["key_padding", "float_bias", "bool_2d"]


@pytest.mark.parametrize("kind", MASKS)
def test_triton_attn_mask(kind):
    b, h, lq, lk, d, bs = 2, 2, 97, 130, 40, 32
    dtype = torch.float16 if kind == "key_padding" else torch.float32
    q, k, v = (rand((b, h, n, d), dtype) for n in (lq, lk, lk))
    layout = make_layout("bigbird", lq, lk, bs, h).to(DEVICE)
    if kind == "key_padding":  # (B, 1, 1, Lk), True = real token
        lengths = torch.tensor([lk, 71])
        mask = (torch.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]
    elif kind == "float_bias":  # (B, H, Lq, Lk) additive, with -inf entries
        mask = torch.randn(b, h, lq, lk)
        mask[torch.rand(b, h, lq, lk) < 0.2] = float("-inf")
    else:  # (Lq, Lk) bool, broadcast over batch and heads
        mask = torch.rand(lq, lk) > 0.5
    run_case(q, k, v, layout, bs, attn_mask=mask.to(DEVICE), scale=0.17)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter warns on NaN, as it should
def test_triton_float_mask_large_negative_and_nan():
    """A float mask read as the dense kernels read it: a row padded everywhere with HuggingFace's
    finfo(float32).min stays "alive" and averages its listed keys (as the reference does; scaling
    finfo.min by log2(e) must not overflow it to -inf and zero the row), and a NaN entry makes its
    row NaN, as in torch, gradients included for the rest."""
    b, h, lq, lk, d, bs = 1, 2, 40, 40, 16, 16
    q, k, v = (rand((b, h, n, d), torch.float32) for n in (lq, lk, lk))
    layout = torch.ones((1, 3, 3), dtype=torch.bool, device=DEVICE)
    layout[0, 2, 0] = False
    mask = torch.zeros((b, 1, lq, lk), device=DEVICE)
    mask[0, 0, 5, :] = torch.finfo(torch.float32).min
    mask[0, 0, 30:, 20:] = torch.finfo(torch.float32).min
    out = run_case(q, k, v, layout, bs, attn_mask=mask)
    assert torch.all(out[0, :, 5] != 0)
    mask[0, 0, 7, 3] = float("nan")
    out = fastbert.block_sparse_attention(q, k, v, layout, bs, mask, **TRITON)
    ref = reference.block_sparse_attention(q.double(), k.double(), v.double(), layout, bs, mask.double())
    assert torch.equal(out.isnan(), ref.isnan()) and out[0, :, 7].isnan().all()
    assert not out[0, :, 6].isnan().any()


def test_triton_float_mask_large_positive():
    """Finite mask values beyond +2e38 are clamped before the base-2 scaling, as large negative
    ones are: a key at +3e38 takes all the weight of its row, and a row at +3e38 everywhere
    averages its listed keys, as in the reference (scaled by log2(e) unclamped they would overflow
    to +inf and make the row NaN); gradients included."""
    b, h, lq, lk, d, bs = 1, 2, 40, 40, 16, 16
    q, k, v = (rand((b, h, n, d), torch.float32) for n in (lq, lk, lk))
    layout = torch.ones((1, 3, 3), dtype=torch.bool, device=DEVICE)
    layout[0, 2, 0] = False
    mask = torch.randn((b, 1, lq, lk), device=DEVICE)
    mask[0, 0, 9, 12] = 3e38
    mask[0, 0, 20, :] = 3e38
    mask[0, 0, 35, 38] = torch.finfo(torch.float32).max
    out = run_case(q, k, v, layout, bs, attn_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :, 9], v[0, :, 12])
    torch.testing.assert_close(out[0, :, 35], v[0, :, 38])


def test_triton_rows_without_keys():
    """Query blocks with no key block, a batch whose keys are all padding, and a row removed by
    -inf: output exactly 0, gradients finite, dq of those rows exactly 0."""
    b, h, lq, lk, d, bs = 2, 2, 70, 50, 40, 16
    q, k, v = (rand((b, h, n, d), torch.float32) for n in (lq, lk, lk))
    layout = make_layout("sliding", lq, lk, bs, h).to(DEVICE)
    layout[0, 2, :] = False  # rows 32..47 see no block
    mask = torch.zeros(b, 1, lq, lk)
    mask[1] = float("-inf")  # batch 1: every key removed
    mask[0, 0, 5, :] = float("-inf")  # one row of batch 0
    out = run_case(q, k, v, layout, bs, attn_mask=mask.to(DEVICE))
    assert (out[0, :, 32:48] == 0).all() and (out[1] == 0).all() and (out[0, :, 5] == 0).all()
    qq = q.detach().clone().requires_grad_(True)
    o = fastbert.block_sparse_attention(qq, k, v, layout, bs, mask.to(DEVICE), **TRITON)
    (dq,) = torch.autograd.grad(o, qq, torch.randn_like(o))
    assert (dq[0, :, 32:48] == 0).all() and (dq[1] == 0).all() and (dq[0, :, 5] == 0).all()


def test_triton_unvisited_blocks_never_read():
    """Key blocks that no query block sees are filled with NaN: the kernel must never load them
    (output finite and equal to the reference on zeros), and their dk/dv are exactly 0."""
    b, h, lq, lk, d, bs = 1, 2, 97, 97, 40, 16
    layout = make_layout("sliding", lq, lk, bs, 1).to(DEVICE)
    layout[:, :, 2] = False  # key block 2 (tokens 32..47)
    k, v = rand((b, h, lk, d)), rand((b, h, lk, d))
    q = rand((b, h, lq, d))
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, 32:48] = float("nan")
    v_nan[:, :, 32:48] = float("nan")
    leaves = [t.requires_grad_(True) for t in (q.clone(), k_nan, v_nan)]
    out = fastbert.block_sparse_attention(*leaves, layout, bs, **TRITON)
    ref = reference.block_sparse_attention(q.double(), k.double(), v.double(), layout, bs)
    assert_close(out, ref)
    _, dk, dv = torch.autograd.grad(out, leaves, torch.randn_like(out))
    assert (dk[:, :, 32:48] == 0).all() and (dv[:, :, 32:48] == 0).all()
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_triton_noncontiguous_and_int_layout():
    b, h, lq, lk, d, bs = 2, 2, 97, 130, 40, 32
    # (B, L, H, D) memory seen as (B, H, L, D), a strided last dim, and a sliced value
    q = rand((b, lq, h, d)).transpose(1, 2)
    k = rand((b, h, lk, d), noncontiguous=True)
    v = rand((b, h, lk, 2 * d))[..., d:]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    layout = make_layout("longformer", lq, lk, bs, h).to(DEVICE)
    run_case(q, k, v, layout.to(torch.int8), bs)


def test_triton_value_head_dim_differs():
    b, h, lq, lk, d, dv, bs = 1, 2, 40, 33, 24, 72, 16
    q, k = rand((b, h, lq, d)), rand((b, h, lk, d))
    v = rand((b, h, lk, dv))
    run_case(q, k, v, make_layout("strided", lq, lk, bs, h).to(DEVICE), bs)


def test_kernel_tiles_smaller_than_block():
    """The launcher with tiles that divide the layout block (the GPU configuration for big blocks
    or head dims): same result as the reference, forward and backward."""
    from fastbert.kernels import block_sparse_attention as K

    b, h, lq, lk, d, bs = 1, 2, 130, 97, 40, 64
    q, k, v = (rand((b, h, n, d), torch.float32) for n in (lq, lk, lk))
    layout = make_layout("bigbird", lq, lk, bs, h).to(DEVICE)
    prep = S.prepare_layout(layout)
    out, stats = K.block_sparse_attention_fwd(q, k, v, prep.q_count, prep.q_index, bs,
                                            block_m=16, block_n=32)
    ref64 = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref = reference.block_sparse_attention(*ref64, layout, bs)
    assert_close(out, ref, name="out")
    do = torch.randn_like(out)
    *grads, dmask = K.block_sparse_attention_bwd(do, q, k, v, out, stats, prep.q_count, prep.q_index,
                                                 prep.k_count, prep.k_index, bs, block_m=32,
                                                 block_n=16)
    assert dmask is None
    for name, a, r in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, ref64, do.double())):
        assert_close(a, r, name=name)
    with pytest.raises(ValueError, match="block_m"):
        K.block_sparse_attention_fwd(q, k, v, prep.q_count, prep.q_index, bs, block_m=48)


def test_gpu_tiles_valid_for_every_config():
    """The GPU tile table (no GPU needed: _tiles only looks at device.type): for every dtype, head
    dim, layout block and kernel, tiles are powers of two >= 16 dividing the block, with 4 or 8
    warps and 1 or 2 stages; an unknown kernel name is refused."""
    from fastbert.kernels import block_sparse_attention as K

    cuda = torch.device("cuda")
    for dtype in DT.values():
        for d in (8, 40, 64, 96, 128, 200, 256):
            for bs in K.BLOCK_SIZES:
                for kernel in ("fwd", "bwd_dq", "bwd_dkdv"):
                    bm, bn, warps, stages = K._tiles(bs, d, d, dtype, cuda, kernel, None, None)
                    for t in (bm, bn):
                        assert t >= 16 and bs % t == 0 and t & (t - 1) == 0, (dtype, d, bs, kernel)
                    assert warps in (4, 8) and stages in (1, 2), (dtype, d, bs, kernel)
    with pytest.raises(ValueError, match="kernel"):
        K._tiles(64, 64, 64, torch.float16, cuda, "bwd", None, None)


# ----------------------------------------------------------------------------------------------
# Gradient of a float attn_mask
# ----------------------------------------------------------------------------------------------
def run_mask_grad_case(q, k, v, layout, bs, mask, scale=None, dropout_p=0.0):
    """Triton vs the float64 reference for a float attn_mask that requires grad: out, dq, dk, dv
    and d(attn_mask) with the same upstream gradient (with dropout: through the kernel's exact
    keep-mask). Returns (dmask, its float64 reference)."""
    from fastbert.kernels.block_sparse_attention import block_sparse_attention_dropout_mask

    b, h, lq, d = q.shape
    lk = k.shape[2]
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, mask)]
    keep = None
    if dropout_p:
        sc = 1.0 / math.sqrt(d) if scale is None else scale
        out, _, seed = torch.ops.fastbert.block_sparse_attention_fwd(*leaves[:3], layout, bs,
                                                                     leaves[3], dropout_p, sc)
        keep = block_sparse_attention_dropout_mask(seed, (b, h, lq, lk), dropout_p)
    else:
        out = fastbert.block_sparse_attention(*leaves[:3], layout, bs, leaves[3], 0.0, scale,
                                              **TRITON)
    ref64 = [t.detach().double().requires_grad_(True) for t in (q, k, v, mask)]
    lowp = [t.detach().clone().requires_grad_(True) for t in (q, k, v, mask)]
    ref = reference.block_sparse_attention(*ref64[:3], layout, bs, ref64[3], dropout_p, scale,
                                           dropout_mask=keep)
    low = reference.block_sparse_attention(*lowp[:3], layout, bs, lowp[3], dropout_p, scale,
                                           dropout_mask=keep, compute_dtype=q.dtype)
    assert_close(out, ref, low, name="out")
    g = torch.randn(out.shape, device=q.device).to(q.dtype)  # the same upstream gradient for all
    grads = torch.autograd.grad(out, leaves, g)
    grads_ref = torch.autograd.grad(ref, ref64, g.double())
    grads_low = torch.autograd.grad(low, lowp, g)
    assert grads[3].shape == mask.shape and grads[3].dtype == mask.dtype
    for name, a, r, lo in zip(("dq", "dk", "dv", "dmask"), grads, grads_ref, grads_low):
        assert torch.isfinite(a).all(), name
        assert_close(a, r, lo, name=name)
    return grads[3], grads_ref[3]


# (mask shape, B, H, Lq, Lk, D, block_size, dtype, mask dtype, preset, dropout_p)
MASK_GRAD_CASES = [
    ("B11L", 2, 2, 97, 70, 40, 32, "fp32", "fp32", "bigbird", 0.0),
    ("11LL", 1, 3, 70, 97, 24, 16, "fp32", "fp32", "perhead", 0.0),
    ("BHLL", 2, 2, 50, 45, 40, 16, "fp16", "fp32", "sliding", 0.0),
    ("BHLL", 2, 2, 97, 70, 40, 32, "fp32", "fp16", "bigbird", 0.3),
    ("11LL", 2, 3, 70, 97, 24, 16, "fp16", "fp32", "perhead", 0.3),
]


def mask_grad_id(c):
    shape, b, h, lq, lk, d, bs, dt, mdt, preset, p = c
    return (f"B{b}-H{h}-Lq{lq}-Lk{lk}-D{d}-bs{bs}-{dt}-mask{shape}-{mdt}-{preset}"
            + (f"-dropout{p}" if p else ""))


@pytest.mark.parametrize("case", MASK_GRAD_CASES, ids=[mask_grad_id(c) for c in MASK_GRAD_CASES])
def test_triton_float_mask_grad(case):
    """d(attn_mask) = dS (the softmax-input gradient) summed over the mask's broadcast dims, 0 in
    the blocks the layout skips and in rows that see no key; -inf entries included."""
    shape, b, h, lq, lk, d, bs, dt, mdt, preset, p = case
    q, k, v = (rand((b, h, n, d), DT[dt]) for n in (lq, lk, lk))
    layout = make_layout(preset, lq, lk, bs, h).to(DEVICE)
    mshape = {"B11L": (b, 1, 1, lk), "11LL": (1, 1, lq, lk), "BHLL": (b, h, lq, lk)}[shape]
    mask = torch.randn(mshape, dtype=DT[mdt])
    if shape == "B11L":
        mask[1, ..., 50:] = float("-inf")  # key padding of batch 1
    else:
        mask[..., 3, :] = float("-inf")  # a fully masked row
        mask[torch.rand(mshape) < 0.1] = float("-inf")
    if shape == "BHLL" and preset == "sliding":
        layout[:, 1, :] = False  # query block 1 sees no key block
    dmask, dmask_ref = run_mask_grad_case(q, k, v, layout, bs, mask.to(DEVICE), scale=0.3,
                                          dropout_p=p)
    if shape != "B11L":
        assert (dmask[..., 3, :] == 0).all()  # the fully masked row
    seen = reference.layout_to_mask(layout.bool(), bs, lq, lk)  # (HL, Lq, Lk)
    if shape == "BHLL":
        # positions in blocks the layout skips: exactly 0, as in the reference
        seen = seen.unsqueeze(0).expand(mshape)
    elif shape == "11LL":
        # summed over heads (in the broadcast-mask kernel): 0 where no head attends
        seen = seen.any(0).expand(mshape)
    if shape != "B11L":
        assert (dmask[~seen] == 0).all() and (dmask_ref[~seen] == 0).all()
        assert (dmask[seen] != 0).any()


@pytest.mark.parametrize("mshape", ["BHLL", "11LL"])
def test_triton_mask_grad_when_only_the_mask_requires_grad(mshape):
    """A float attn_mask that requires grad gets its gradient when it alone does (a trainable
    bias in front of frozen q, k, v), as from the reference's autograd: the backward must look at
    the mask's own needs_input_grad, not the query's."""
    b, h, lq, lk, d, bs = 2, 2, 40, 33, 16, 16
    q, k, v = (rand((b, h, n, d), torch.float32) for n in (lq, lk, lk))
    layout = make_layout("bigbird", lq, lk, bs, h).to(DEVICE)
    shape = (b, h, lq, lk) if mshape == "BHLL" else (1, 1, lq, lk)
    mask = rand(shape, torch.float32)
    m = mask.clone().requires_grad_(True)
    out = fastbert.block_sparse_attention(q, k, v, layout, bs, m, **TRITON)
    assert out.requires_grad
    g = torch.randn(out.shape, dtype=torch.float64, device=DEVICE)
    out.backward(g.float())
    assert m.grad is not None and m.grad.shape == mask.shape
    m64 = mask.double().requires_grad_(True)
    ref = reference.block_sparse_attention(q.double(), k.double(), v.double(), layout, bs, m64)
    ref.backward(g)
    mlow = mask.clone().requires_grad_(True)
    low = reference.block_sparse_attention(q, k, v, layout, bs, mlow, compute_dtype=torch.float32)
    low.backward(g.float())
    assert_close(m.grad, m64.grad, mlow.grad, name="dmask")
    assert (m.grad != 0).any()


def test_triton_broadcast_mask_grad_kernel_matches_full_scratch(monkeypatch):
    """The broadcast-mask gradient two ways: summed over batch and heads by its own kernel (given
    the layout) and the (B, H, Lq, Lk) dS of the dq kernel summed by torch; with dropout."""
    from fastbert.kernels import block_sparse_attention as K

    class Spy:  # counts launches of the broadcast-mask kernel
        def __init__(self, kernel):
            self.kernel, self.launches = kernel, 0

        def __getitem__(self, grid):
            self.launches += 1
            return self.kernel[grid]

    spy = Spy(K._block_sparse_attention_bwd_dmask_kernel)
    monkeypatch.setattr(K, "_block_sparse_attention_bwd_dmask_kernel", spy)

    b, h, lq, lk, d, bs, p = 2, 3, 70, 50, 16, 16, 0.2
    q, k, v = (rand((b, h, n, d)) for n in (lq, lk, lk))
    layout = make_layout("perhead", lq, lk, bs, h).to(DEVICE)
    prep = S.prepare_layout(layout)
    mask = torch.randn(1, h, lq, lk, device=DEVICE)  # broadcast over batch only
    out, stats, seed = torch.ops.fastbert.block_sparse_attention_fwd(q, k, v, layout, bs, mask, p, 0.25)
    do = rand(out.shape)
    args = (do, q, k, v, out, stats, prep.q_count, prep.q_index, prep.k_count, prep.k_index, bs,
            mask, p, 0.25, seed, True)
    own = K.block_sparse_attention_bwd(*args, layout=layout)
    assert spy.launches == 1
    full = K.block_sparse_attention_bwd(*args)
    assert spy.launches == 1
    for a, c in zip(own[:3], full[:3]):
        assert torch.equal(a, c)
    assert own[3].shape == mask.shape
    torch.testing.assert_close(own[3], full[3], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------
def test_triton_dropout_exact():
    """The kernel's keep-mask, materialised by the launcher, reproduces output and gradients
    exactly through the reference."""
    from fastbert.kernels.block_sparse_attention import block_sparse_attention_dropout_mask

    b, h, lq, lk, d, bs, p = 2, 2, 97, 70, 40, 32, 0.3
    leaves = [rand((b, h, n, d), requires_grad=True) for n in (lq, lk, lk)]
    layout = make_layout("bigbird", lq, lk, bs, h).to(DEVICE)
    pad = (torch.rand(b, 1, 1, lk) > 0.2).to(DEVICE)
    out, _, seed = torch.ops.fastbert.block_sparse_attention_fwd(*leaves, layout, bs, pad, p, 0.2)
    keep = block_sparse_attention_dropout_mask(seed, (b, h, lq, lk), p)
    ref64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = reference.block_sparse_attention(*ref64, layout, bs, pad, p, 0.2, dropout_mask=keep)
    assert_close(out, ref, name="out")
    g = torch.randn_like(out)
    for name, a, r in zip(("dq", "dk", "dv"), torch.autograd.grad(out, leaves, g),
                          torch.autograd.grad(ref, ref64, g.double())):
        assert_close(a, r, name=name)


def test_triton_dropout_statistics_and_seed():
    from fastbert.kernels.block_sparse_attention import block_sparse_attention_dropout_mask

    b, h, lq, lk, p = 2, 3, 97, 130, 0.25
    s1234, s1235 = (torch.tensor([s], dtype=torch.int64, device=DEVICE) for s in (1234, 1235))
    keep = block_sparse_attention_dropout_mask(s1234, (b, h, lq, lk), p)
    n = keep.numel()
    frac = keep.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), frac
    planes = keep.view(b * h, -1).double().mean(dim=1)
    assert (planes - (1 - p)).abs().max() < 6 * math.sqrt(p * (1 - p) / (lq * lk))
    flat = keep.view(b * h, lq * lk)
    assert not any(torch.equal(flat[0], flat[i]) for i in range(1, b * h)), "heads share a mask"
    assert torch.equal(keep, block_sparse_attention_dropout_mask(s1234, (b, h, lq, lk), p))
    assert not torch.equal(keep, block_sparse_attention_dropout_mask(s1235, (b, h, lq, lk), p))
    # the public op draws its seed from torch's generator: manual_seed reproduces it
    q, k, v = (rand((1, 2, 40, 16)) for _ in range(3))
    layout = S.dense(40, 16).to(DEVICE)
    torch.manual_seed(7)
    a = fastbert.block_sparse_attention(q, k, v, layout, 16, dropout_p=0.5, **TRITON)
    torch.manual_seed(7)
    a2 = fastbert.block_sparse_attention(q, k, v, layout, 16, dropout_p=0.5, **TRITON)
    torch.manual_seed(8)
    a3 = fastbert.block_sparse_attention(q, k, v, layout, 16, dropout_p=0.5, **TRITON)
    assert torch.equal(a, a2) and not torch.equal(a, a3)


def test_triton_dropout_seed_tensor():
    """The forward op's third output is the dropout seed: int64 on the inputs' device, (1,) with
    dropout and (0,) without; drawn from that device's generator, so torch.manual_seed reproduces
    it; the launchers refuse dropout without a seed tensor."""
    from fastbert.kernels import block_sparse_attention as K

    q, k, v = (rand((1, 2, 40, 16)) for _ in range(3))
    layout = S.dense(40, 16).to(DEVICE)
    op = torch.ops.fastbert.block_sparse_attention_fwd
    torch.manual_seed(3)
    out, _, seed = op(q, k, v, layout, 16, None, 0.5, 0.25)
    assert seed.dtype == torch.int64 and seed.shape == (1,) and seed.device == q.device
    assert 0 <= int(seed[0]) < 2 ** 63 - 1
    torch.manual_seed(3)
    out2, _, seed2 = op(q, k, v, layout, 16, None, 0.5, 0.25)
    assert torch.equal(seed, seed2) and torch.equal(out, out2)
    out3, _, seed3 = op(q, k, v, layout, 16, None, 0.5, 0.25)  # the generator moved on
    assert not torch.equal(seed, seed3) and not torch.equal(out, out3)
    _, _, no_seed = op(q, k, v, layout, 16, None, 0.0, 0.25)
    assert no_seed.shape == (0,) and no_seed.dtype == torch.int64 and no_seed.device == q.device
    prep = S.prepare_layout(layout)
    with pytest.raises(TypeError, match="int64 \\(1,\\) dropout seed tensor"):
        K.block_sparse_attention_fwd(q, k, v, prep.q_count, prep.q_index, 16, dropout_p=0.5)


# ----------------------------------------------------------------------------------------------
# Dispatch, caching, torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("what,words", [
    ("float64", "float64"), ("block_size", "block_size 8"), ("head_dim", "head dim 12"),
    ("value_dim", "value head dim 264"),
])
def test_triton_reasons(what, words):
    b, h, lq, lk, d, dv, bs, dtype = 1, 2, 20, 20, 16, 16, 16, torch.float32
    mask = None
    if what == "float64":
        dtype = torch.float64
    elif what == "block_size":
        bs = 8
    elif what == "head_dim":
        d = 12
    elif what == "value_dim":
        dv = 264
    q, k = rand((b, h, lq, d), dtype), rand((b, h, lk, d), dtype)
    v = rand((b, h, lk, dv), dtype)
    layout = S.dense(lq, bs, key_len=lk).to(DEVICE)
    with pytest.raises(BackendError, match=words):
        fastbert.block_sparse_attention(q, k, v, layout, bs, mask, **TRITON)
    # "auto" falls back to a backend that can serve it
    out = fastbert.block_sparse_attention(q, k, v, layout, bs, mask)
    assert out.shape == (b, h, lq, dv)


@pytest.mark.skipif(DEVICE != "cpu", reason="bfloat16 is refused only under the interpreter")
def test_triton_refuses_bf16_under_interpreter():
    q = rand((1, 2, 20, 16), torch.bfloat16)
    with pytest.raises(BackendError, match="bfloat16"):
        fastbert.block_sparse_attention(q, q, q, S.dense(20, 16), 16, **TRITON)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64], ids=str)
def test_layout_preparation_cached_across_calls(dtype):
    """Forward and backward each hit the cache on every call after the first, for a bool layout
    and for a 0/1 integer one (not converted to a new tensor per call); same numbers for both."""
    q, k, v = (rand((1, 2, 40, 16), requires_grad=True) for _ in range(3))
    layout = S.sliding_window(40, 16).to(DEVICE)
    ref = fastbert.block_sparse_attention(q, k, v, layout, 16, **TRITON)
    layout = layout.to(dtype)
    out = fastbert.block_sparse_attention(q, k, v, layout, 16, **TRITON)
    out.sum().backward()
    before = S.cache_info()
    out2 = fastbert.block_sparse_attention(q, k, v, layout, 16, **TRITON)
    out2.sum().backward()
    after = S.cache_info()
    assert after["hits"] == before["hits"] + 2 and after["misses"] == before["misses"]
    assert torch.equal(out, ref) and torch.equal(out2, ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layout_made_under_inference_mode_trains(backend):
    """A layout and a mask built under torch.inference_mode (inference tensors) serve a training
    call on both backends (the Triton op used to fail saving them for the backward)."""
    with torch.inference_mode():
        layout = S.sliding_window(40, 16, window=0).to(DEVICE)
        keep = torch.ones(1, 1, 1, 40, dtype=torch.bool, device=DEVICE)  # and a mask (padding)
        keep[..., 33:] = False
    normal = S.sliding_window(40, 16, window=0).to(DEVICE)
    q, k, v = (rand((1, 2, 40, 16), requires_grad=True) for _ in range(3))
    out = fastbert.block_sparse_attention(q, k, v, layout, 16, attn_mask=keep, backend=backend)
    ref = reference.block_sparse_attention(*(t.detach().double() for t in (q, k, v)), normal, 16,
                                           attn_mask=keep.clone())
    assert_close(out, ref, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_block_size_beyond_int64_indices_is_refused():
    q = rand((1, 1, 8, 16))
    layout = S.dense(8, 8).to(DEVICE)
    with pytest.raises(ValueError, match="block_size must be <="):
        fastbert.block_sparse_attention(q, q, q, layout, 2 ** 64, backend="torch")
    big = fastbert.block_sparse_attention(q, q, q, layout, 2 ** 31 - 1, backend="torch")  # one block
    assert_close(big, reference.scaled_dot_product_attention(*(t.double() for t in (q, q, q))), atol=1e-5)


def test_triton_torch_compile_fullgraph():
    """One opaque op per pass under torch.compile(fullgraph=True), with a float key-padding bias
    that requires grad (the backward op's fake returns its gradient)."""
    b, h, lq, lk, d, bs = 1, 2, 40, 33, 16, 16
    layout = make_layout("longformer", lq, lk, bs, h).to(DEVICE)
    bias = torch.randn(1, 1, 1, lk)
    bias[..., 30:] = float("-inf")

    def f(q, k, v, m):
        return fastbert.block_sparse_attention(q, k, v, layout, bs, m, **TRITON)

    leaves = [rand((b, h, n, d), requires_grad=True) for n in (lq, lk, lk)]
    leaves.append(bias.to(DEVICE).requires_grad_(True))
    out = torch.compile(f, fullgraph=True)(*leaves)
    ref64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = reference.block_sparse_attention(*ref64[:3], layout, bs, ref64[3])
    assert_close(out, ref)
    g = torch.randn_like(out)
    for name, a, r in zip(("dq", "dk", "dv", "dmask"), torch.autograd.grad(out, leaves, g),
                          torch.autograd.grad(ref, ref64, g.double())):
        assert_close(a, r, name=name)


# ----------------------------------------------------------------------------------------------
# GPU only: compiled kernels, bf16 (tl.dot on bf16 is unreliable under the interpreter), block 128,
# long sequences, big head dims
# ----------------------------------------------------------------------------------------------
CUDA_CASES = [
    ("bigbird", 2, 4, 1025, 1025, 64, 128, "fp16"),
    ("longformer", 1, 4, 1025, 777, 128, 128, "bf16"),
    ("perhead", 2, 3, 513, 513, 96, 64, "bf16"),
    ("strided", 1, 2, 300, 300, 256, 32, "fp16"),
    ("fixed", 1, 2, 2048, 2048, 80, 16, "fp32"),
    ("sliding", 2, 2, 1000, 1000, 256, 128, "bf16"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=[case_id(c) for c in CUDA_CASES])
def test_triton_cuda(case):
    preset, b, h, lq, lk, d, bs, dt = case
    q, k, v = (rand((b, h, n, d), DT[dt]) for n in (lq, lk, lk))
    lengths = torch.randint(lk // 2, lk + 1, (b,))
    pad = (torch.arange(lk)[None, :] < lengths[:, None])[:, None, None, :].to(DEVICE)
    run_case(q, k, v, make_layout(preset, lq, lk, bs, h).to(DEVICE), bs, attn_mask=pad)


@pytest.mark.cuda
def test_triton_cuda_dropout_block128():
    from fastbert.kernels.block_sparse_attention import block_sparse_attention_dropout_mask

    b, h, lq, lk, d, bs, p = 2, 2, 300, 260, 64, 128, 0.1
    leaves = [rand((b, h, n, d), torch.float16, requires_grad=True) for n in (lq, lk, lk)]
    layout = make_layout("bigbird", lq, lk, bs, h).to(DEVICE)
    out, _, seed = torch.ops.fastbert.block_sparse_attention_fwd(*leaves, layout, bs, None, p, 0.125)
    keep = block_sparse_attention_dropout_mask(seed, (b, h, lq, lk), p)
    lowp = [t.detach().clone().requires_grad_(True) for t in leaves]
    ref64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = reference.block_sparse_attention(*ref64, layout, bs, None, p, 0.125, dropout_mask=keep)
    low = reference.block_sparse_attention(*lowp, layout, bs, None, p, 0.125, dropout_mask=keep,
                                           compute_dtype=torch.float16)
    assert_close(out, ref, low, name="out")
    g = torch.randn_like(out)
    for name, a, r, lo in zip(("dq", "dk", "dv"), torch.autograd.grad(out, leaves, g),
                              torch.autograd.grad(ref, ref64, g.double()),
                              torch.autograd.grad(low, lowp, g)):
        assert_close(a, r, lo, name=name)


@pytest.mark.bigmem
@pytest.mark.cuda
def test_triton_cuda_int64_offsets():
    """More than 2^31 elements in q (B * H * L * D): the kernels' offsets must be 64-bit. The last
    head's last blocks (past element 2^31) are checked against the reference."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs >= 40 GiB of GPU memory")
    b, h, lq, d, bs = 1, 520, 65536, 64, 128  # 2.18e9 elements
    q = torch.randn(b, h, lq, d, device="cuda", dtype=torch.float16)
    layout = S.sliding_window(lq, bs, window=0, device="cuda")  # block diagonal
    out = fastbert.block_sparse_attention(q, q, q, layout, bs, **TRITON)
    start = lq - 2 * bs
    tail = q[:, -1:, start:].double()
    ref = reference.block_sparse_attention(tail, tail, tail,
                                           S.sliding_window(2 * bs, bs, window=0, device="cuda"), bs)
    assert_close(out[:, -1:, start:], ref, atol=5e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dt,d,bs,mshape", [("fp16", 64, 64, "1HLL"), ("bf16", 128, 128, "11LL"),
                                            ("fp16", 64, 32, "B11L")])
def test_triton_cuda_broadcast_mask_grad(dt, d, bs, mshape):
    """The broadcast-mask gradient kernel compiled: a trainable bias shared by the batch (and the
    heads) with per-head layouts, against fp64."""
    b, h, l = 3, 4, 300
    q, k, v = (rand((b, h, l, d), DT[dt]) for _ in range(3))
    layout = make_layout("perhead", l, l, bs, h).to(DEVICE)
    shape = {"1HLL": (1, h, l, l), "11LL": (1, 1, l, l), "B11L": (b, 1, 1, l)}[mshape]
    mask = torch.randn(shape, device=DEVICE, dtype=DT[dt]) * 0.5
    run_mask_grad_case(q, k, v, layout, bs, mask, scale=0.2, dropout_p=0.0)


@pytest.mark.cuda
def test_triton_cuda_many_heads():
    """batch * heads = 80000 > 65535 (CUDA's limit on grid dims y / z): the grid is flat. A few
    (batch, head) slices, the last included, are checked, forward and backward."""
    b, h, l, d, bs = 5000, 16, 32, 64, 16
    q, k, v = (rand((b, h, l, d), torch.float16, requires_grad=True) for _ in range(3))
    layout = S.sliding_window(l, bs, window=1, device=DEVICE)
    out = fastbert.block_sparse_attention(q, k, v, layout, bs, **TRITON)
    g = torch.randn_like(out)
    out.backward(g)
    for bi, hi in ((0, 0), (2500, 7), (b - 1, h - 1)):
        sl = (slice(bi, bi + 1), slice(hi, hi + 1))
        leaves = [t.detach()[sl].double().requires_grad_(True) for t in (q, k, v)]
        ref = reference.block_sparse_attention(*leaves, layout, bs)
        ref.backward(g[sl].double())
        lows = [t.detach()[sl].clone().requires_grad_(True) for t in (q, k, v)]
        low = reference.block_sparse_attention(*lows, layout, bs, compute_dtype=torch.float16)
        low.backward(g[sl])
        assert_close(out[sl], ref, low, name=f"out[{bi}, {hi}]")
        for name, t, r, lo in zip(("dq", "dk", "dv"), (q, k, v), leaves, lows):
            assert_close(t.grad[sl], r.grad, lo.grad, name=f"{name}[{bi}, {hi}]")


@pytest.mark.cuda
def test_triton_cuda_graph_dropout_fresh_mask_per_replay():
    """A training step (forward with dropout + backward) captured in a CUDA graph: the seed is
    drawn on the GPU inside the graph and read only by the kernels, so every replay draws a new
    seed and mask (outputs and gradients differ between replays), and each replay is exact for
    the keep-mask of the seed it drew."""
    from fastbert.kernels.block_sparse_attention import block_sparse_attention_dropout_mask

    b, h, l, d, bs, p, scale = 2, 4, 320, 64, 64, 0.2, 0.125
    layout = make_layout("bigbird", l, l, bs, h).to(DEVICE)
    leaves = [rand((b, h, l, d), torch.float16, requires_grad=True) for _ in range(3)]
    g_out = torch.randn(b, h, l, d, device=DEVICE, dtype=torch.float16)
    op = torch.ops.fastbert.block_sparse_attention_fwd

    def step():
        for t in leaves:
            t.grad = None
        out, _, seed = op(*leaves, layout, bs, None, p, scale)
        out.backward(g_out)
        return [out, seed] + [t.grad for t in leaves]

    replays = cuda_graph_replays(step)
    assert_fresh_replays(replays)  # seed, output and every gradient differ between replays
    for o, sd, *grads in replays:
        keep = block_sparse_attention_dropout_mask(sd, (b, h, l, l), p)
        ref64 = [t.detach().double().requires_grad_(True) for t in leaves]
        lowp = [t.detach().clone().requires_grad_(True) for t in leaves]
        ref = reference.block_sparse_attention(*ref64, layout, bs, None, p, scale,
                                               dropout_mask=keep)
        low = reference.block_sparse_attention(*lowp, layout, bs, None, p, scale,
                                               dropout_mask=keep, compute_dtype=torch.float16)
        assert_close(o, ref, low, name="out")
        for name, a, r, lo in zip(("dq", "dk", "dv"), grads,
                                  torch.autograd.grad(ref, ref64, g_out.double()),
                                  torch.autograd.grad(low, lowp, g_out)):
            assert_close(a, r, lo, name=name)


@pytest.mark.cuda
def test_triton_cuda_graph_owns_its_layout_lists():
    """Lists prepared while a CUDA graph is captured belong to the graph: evicting the cache and
    reusing the freed memory between replays changes nothing (a cached entry made before the
    capture used to be referenced by address, and freed when evicted)."""
    lay = S.bigbird(256, 64, num_heads=2, seed=1).to(DEVICE)
    q, k, v = (rand((1, 2, 256, 64), torch.float16) for _ in range(3))
    ref = reference.block_sparse_attention(q.double(), k.double(), v.double(), lay, 64)
    fastbert.block_sparse_attention(q, k, v, lay, 64, **TRITON)  # warm-up: cached outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fastbert.block_sparse_attention(q, k, v, lay, 64, **TRITON)
    S.clear_cache()
    junk = [torch.full((1 << 16,), -7, dtype=torch.int32, device=DEVICE) for _ in range(64)]
    graph.replay()
    torch.cuda.synchronize()
    del junk
    assert_close(out, ref, ref.half(), atol=2e-3)
