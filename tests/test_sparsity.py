"""fastbert.sparsity: every preset against an explicit loop construction, the docstring pictures
against the builders, seeded randomness, combinators, the density report, argument validation and
the cached preparation used by the block-sparse kernel."""
import gc
import math
import re

import pytest
import torch

import fastbert
from fastbert import reference
from fastbert import sparsity as S


def nb(n, bs):
    return -(-n // bs)


def loop_layout(nbq, nbk, rule):
    """An explicit (1, nbq, nbk) layout: block (i, j) is on iff rule(i, j)."""
    out = torch.zeros(1, nbq, nbk, dtype=torch.bool)
    for i in range(nbq):
        for j in range(nbk):
            out[0, i, j] = bool(rule(i, j))
    return out


# (seq_len, key_len, block_size): square, awkward, Lq != Lk both ways
SIZES = [(97, None, 16), (130, None, 32), (64 * 9, None, 64), (97, 130, 16), (130, 33, 16)]
SIZE_IDS = [f"Lq{lq}-Lk{lk or lq}-bs{bs}" for lq, lk, bs in SIZES]


@pytest.mark.parametrize("lq,lk,bs", SIZES, ids=SIZE_IDS)
def test_presets_match_loops(lq, lk, bs):
    nbq, nbk = nb(lq, bs), nb(lk or lq, bs)
    kw = dict(key_len=lk)
    assert torch.equal(S.dense(lq, bs, **kw), loop_layout(nbq, nbk, lambda i, j: True))
    for w in (0, 1, 3):
        assert torch.equal(S.sliding_window(lq, bs, window=w, **kw),
                           loop_layout(nbq, nbk, lambda i, j: abs(i - j) <= w))
        assert torch.equal(S.sliding_window(lq, bs, window=w, causal=True, **kw),
                           loop_layout(nbq, nbk, lambda i, j: i - w <= j <= i))
    for w, g in ((1, 1), (0, 2), (2, [0, 3])):
        gl = list(range(g)) if isinstance(g, int) else g
        want = loop_layout(nbq, nbk, lambda i, j: abs(i - j) <= w or i in gl or j in gl)
        assert torch.equal(S.global_tokens(lq, bs, window=w, global_blocks=g, **kw), want)
        assert torch.equal(S.longformer(lq, bs, window=w, global_blocks=g, **kw), want)
    for stride, summary in ((2, 1), (3, 2), (4, 4)):
        rule = lambda i, j: j // stride == i // stride or j % stride >= stride - summary  # noqa: E731
        assert torch.equal(S.fixed(lq, bs, stride=stride, summary=summary, **kw),
                           loop_layout(nbq, nbk, rule))
        assert torch.equal(S.fixed(lq, bs, stride=stride, summary=summary, causal=True, **kw),
                           loop_layout(nbq, nbk, lambda i, j: rule(i, j) and j <= i))
    for stride in (1, 2, 3):
        rule = lambda i, j: abs(i - j) < stride or (i - j) % stride == 0  # noqa: E731
        assert torch.equal(S.strided(lq, bs, stride=stride, **kw), loop_layout(nbq, nbk, rule))
        assert torch.equal(S.strided(lq, bs, stride=stride, causal=True, **kw),
                           loop_layout(nbq, nbk, lambda i, j: rule(i, j) and j <= i))


@pytest.mark.parametrize("big", [2 ** 62, 2 ** 63, 2 ** 64 + 1, 10 ** 30])
def test_sizes_beyond_every_block_are_everything(big):
    """A window or stride past every block gives the full band, whatever the int's size (one
    beyond int64 used to wrap: sliding_window(window=2**63) was all off)."""
    on = torch.ones(1, 4, 5, dtype=torch.bool)
    assert torch.equal(S.sliding_window(64, 16, window=big, key_len=80), on)
    assert torch.equal(S.global_tokens(64, 16, window=big, key_len=80), on)
    assert torch.equal(S.strided(64, 16, stride=big, key_len=80), on)
    assert torch.equal(S.fixed(64, 16, stride=big, summary=big, key_len=80), on)
    assert torch.equal(S.fixed(64, 16, stride=big, key_len=80), on)
    causal = S.sliding_window(64, 16, window=big, causal=True)
    assert torch.equal(causal[0], torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("lq,lk,bs", SIZES, ids=SIZE_IDS)
def test_bigbird_structure(lq, lk, bs):
    nbq, nbk = nb(lq, bs), nb(lk or lq, bs)
    r, heads = 2, 3
    lay = S.bigbird(lq, bs, window=1, global_blocks=1, random_blocks=r, seed=7, num_heads=heads,
                    key_len=lk)
    base = S.global_tokens(lq, bs, window=1, global_blocks=1, key_len=lk)[0]
    assert lay.shape == (heads, nbq, nbk) and lay.dtype == torch.bool
    for h in range(heads):
        assert torch.equal(lay[h] & base, base)  # window and global blocks are all there
        extra = lay[h] & ~base
        for i in range(nbq):
            free = int((~base[i]).sum())
            want = 0 if bool(base[i].all()) else min(r, free)
            assert int(extra[i].sum()) == want, (h, i)


def test_bigbird_seeded():
    before = torch.get_rng_state()
    a = S.bigbird(64 * 16, 64, random_blocks=3, seed=11, num_heads=4)
    assert torch.equal(torch.get_rng_state(), before), "bigbird must not touch torch's global RNG"
    torch.manual_seed(12345)  # global seed is irrelevant
    b = S.bigbird(64 * 16, 64, random_blocks=3, seed=11, num_heads=4)
    c = S.bigbird(64 * 16, 64, random_blocks=3, seed=12, num_heads=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not all(torch.equal(a[0], a[h]) for h in range(1, 4)), "heads should differ"
    # random blocks are spread over the row, not only next to the band
    extra = a & ~S.global_tokens(64 * 16, 64, window=1, global_blocks=1)
    assert extra.any(dim=(0, 1)).sum() > 6


def test_bigbird_device_and_zero_random():
    lay = S.bigbird(130, 16, random_blocks=0, device="cpu")
    assert torch.equal(lay, S.global_tokens(130, 16))
    lay = S.bigbird(4 * 16, 16, window=0, global_blocks=0, random_blocks=100)
    assert lay.all(), "more random blocks than free ones: every free block is taken"


def _pictures(fn):
    """(call expression, picture) pairs from a builder's docstring."""
    doc = fn.__doc__
    out = []
    for m in re.finditer(r"Picture \((?:``(.*?)``)?.*?::\n\n((?:[ ]+[#. ]+\n)+)", doc,
                         flags=re.S):
        call = m.group(1)
        pic = "\n".join(line.strip() for line in m.group(2).strip("\n").splitlines())
        out.append((call, pic))
    return out


@pytest.mark.parametrize("fn", [S.dense, S.sliding_window, S.global_tokens, S.bigbird, S.fixed,
                                S.strided], ids=lambda f: f.__name__)
def test_docstring_pictures(fn):
    pics = _pictures(fn)
    assert pics, f"{fn.__name__} has no picture"
    for call, pic in pics:
        env = {name: getattr(S, name) for name in S.__all__}
        assert S.render(eval(call, env)) == pic, call


def test_from_token_mask_picture():
    (_, pic), = _pictures(S.from_token_mask)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    assert S.render(S.from_token_mask(causal, 2)) == pic


@pytest.mark.parametrize("lq,lk,bs,heads", [(97, 130, 16, None), (17, 17, 32, 3), (130, 97, 64, 2)],
                         ids=["Lq97-Lk130-bs16-shared", "Lq17-Lk17-bs32-H3", "Lq130-Lk97-bs64-H2"])
def test_from_token_mask(lq, lk, bs, heads):
    shape = (lq, lk) if heads is None else (heads, lq, lk)
    mask = torch.rand(shape) < 0.02
    lay = S.from_token_mask(mask, bs)
    m3 = mask if heads is not None else mask.unsqueeze(0)
    assert lay.shape == (m3.shape[0], nb(lq, bs), nb(lk, bs))
    for h in range(m3.shape[0]):
        for i in range(nb(lq, bs)):
            for j in range(nb(lk, bs)):
                want = bool(m3[h, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].any())
                assert bool(lay[h, i, j]) == want
    # covering: the expanded layout admits every pair the token mask admits
    cover = reference.layout_to_mask(lay, bs, lq, lk)
    assert bool((cover | ~m3).all())


def test_union_intersection():
    a = S.sliding_window(130, 16, window=1)
    b = S.bigbird(130, 16, num_heads=3, seed=1)
    c = S.strided(130, 16, stride=3)
    u, x = S.union(a, b, c), S.intersection(a, b, c)
    assert u.shape == x.shape == (3, 9, 9)
    for h in range(3):
        for i in range(9):
            for j in range(9):
                vals = (bool(a[0, i, j]), bool(b[h, i, j]), bool(c[0, i, j]))
                assert bool(u[h, i, j]) == any(vals) and bool(x[h, i, j]) == all(vals)
    assert torch.equal(S.union([a, c]), a | c)
    one = S.union(a)
    assert torch.equal(one, a) and one.data_ptr() != a.data_ptr()


def test_density_report():
    lay = S.bigbird(130, 16, num_heads=2, seed=3)
    rep = S.density(lay, 16, 130)
    n = int(lay.sum())
    assert rep.heads == 2 and rep.blocks == (9, 9) and rep.nonzero_blocks == n
    assert math.isclose(rep.block_density, n / (2 * 81))
    assert rep.per_head == tuple(float(lay[h].sum()) / 81 for h in range(2))
    assert math.isclose(rep.mean_blocks_per_row, n / (2 * 9))
    tok = reference.layout_to_mask(lay, 16, 130, 130).double().mean()
    assert math.isclose(rep.token_density, float(tok), rel_tol=1e-12)
    assert "block density" in str(rep) and "token density" in str(rep)
    rep2 = S.density(S.dense(97, 32, key_len=33), 32, 97, key_len=33)
    assert rep2.block_density == 1.0 and math.isclose(rep2.token_density, 1.0)
    assert S.density(lay).token_density is None


def test_integer_layouts_count_nonzero_as_on():
    # the op takes integer layouts (nonzero = attend), so the helpers that inspect or combine
    # layouts take them too, and agree with the bool layout they stand for
    lay = S.bigbird(130, 16, num_heads=2, seed=5)
    ints = lay.to(torch.int64) * torch.randint(1, 9, lay.shape)  # nonzero values other than 1
    other = S.strided(130, 16, stride=3)
    assert torch.equal(S.union(ints, other), S.union(lay, other))
    assert torch.equal(S.intersection(other.to(torch.uint8), ints), S.intersection(other, lay))
    assert S.union(ints).dtype == torch.bool
    assert S.density(ints, 16, 130) == S.density(lay, 16, 130)
    assert S.render(ints, head=1) == S.render(lay, head=1)


@pytest.mark.parametrize("lq,lk", [(0, 0), (0, 17), (17, 0)])
def test_presets_of_empty_sequences(lq, lk):
    # the op takes empty sequences, so the presets build their (empty) layouts
    nbq, nbk = -(-lq // 16), -(-lk // 16)
    for fn in (S.dense, S.sliding_window, S.fixed, S.strided):
        assert fn(lq, 16, key_len=lk).shape == (1, nbq, nbk)
    lay = S.dense(lq, 16, key_len=lk)
    rep = S.density(lay, 16, lq, key_len=lk)
    assert rep.nonzero_blocks == 0 and rep.block_density == 0.0 and rep.token_density == 0.0
    q, k = torch.randn(1, 2, lq, 8), torch.randn(1, 2, lk, 8)
    out = fastbert.block_sparse_attention(q, k, k, lay, 16, backend="torch")
    assert out.shape == (1, 2, lq, 8) and not out.isnan().any()


VALIDATION = [
    (lambda: S.dense(-1, 16), ValueError, "seq_len"),
    (lambda: S.dense(97.0, 16), TypeError, "seq_len"),
    (lambda: S.dense(97, 0), ValueError, "block_size"),
    (lambda: S.dense(97, 16, key_len=-1), ValueError, "key_len"),
    (lambda: S.sliding_window(97, 16, window=-1), ValueError, "window"),
    (lambda: S.sliding_window(97, 16, window=True), TypeError, "window"),
    (lambda: S.sliding_window(97, 16, causal=1), TypeError, "causal"),
    (lambda: S.global_tokens(97, 16, global_blocks=[0, 7]), ValueError, "global block index 7"),
    (lambda: S.global_tokens(97, 16, global_blocks=9), ValueError, "global_blocks"),
    (lambda: S.global_tokens(97, 16, global_blocks="0"), TypeError, "global_blocks"),
    (lambda: S.global_tokens(97, 16, global_blocks=[1.5]), TypeError, "global_blocks"),
    (lambda: S.bigbird(97, 16, random_blocks=-1), ValueError, "random_blocks"),
    (lambda: S.bigbird(97, 16, seed=-3), ValueError, "seed"),
    (lambda: S.bigbird(97, 16, num_heads=0), ValueError, "num_heads"),
    (lambda: S.fixed(97, 16, stride=2, summary=3), ValueError, "summary"),
    (lambda: S.fixed(97, 16, stride=0), ValueError, "stride"),
    (lambda: S.strided(97, 16, stride=0), ValueError, "stride"),
    (lambda: S.from_token_mask(torch.ones(4, 4), 2), TypeError, "bool"),
    (lambda: S.from_token_mask(torch.ones(4, dtype=torch.bool), 2), ValueError, "(Lq, Lk)"),
    (lambda: S.from_token_mask([[True]], 2), TypeError, "mask"),
    (lambda: S.union(), ValueError, "at least one"),
    (lambda: S.union(S.dense(97, 16), S.dense(98 + 16, 16)), ValueError, "same grid"),
    (lambda: S.union(S.bigbird(97, 16, num_heads=2), S.bigbird(97, 16, num_heads=3)), ValueError,
     "head dims"),
    (lambda: S.intersection(S.dense(97, 16), S.dense(97, 16).float()), TypeError, "bool"),
    (lambda: S.global_tokens(0, 16), ValueError, "global_blocks"),
    (lambda: S.density(S.dense(97, 16), 16, 200), ValueError, "blocks"),
    (lambda: S.density(S.dense(97, 16), 16), ValueError, "both"),
    (lambda: S.density(S.dense(97, 16), key_len=33), ValueError, "both"),
    (lambda: S.render(S.dense(97, 16), head=1), ValueError, "head"),
    (lambda: S.prepare_layout(torch.ones(2, 2)), TypeError, "bool"),
]


@pytest.mark.parametrize("call,exc,words", VALIDATION,
                         ids=[f"{n}-{e.__name__}-{w}" for n, (_, e, w) in enumerate(VALIDATION)])
def test_validation(call, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        call()


def _explicit_lists(lay):
    """Per (h, i): key blocks of query block i; per (h, j): query blocks of key block j."""
    hl, nbq, nbk = lay.shape
    rows = [[[j for j in range(nbk) if lay[h, i, j]] for i in range(nbq)] for h in range(hl)]
    cols = [[[i for i in range(nbq) if lay[h, i, j]] for j in range(nbk)] for h in range(hl)]
    return rows, cols


def _check_prepared(prep, lay):
    rows, cols = _explicit_lists(lay)
    hl, nbq, nbk = lay.shape
    assert prep.q_count.dtype == prep.q_index.dtype == torch.int32
    assert prep.q_index.shape == (hl, nbq, nbk) and prep.k_index.shape == (hl, nbk, nbq)
    assert prep.blocks.dtype == torch.uint8 and prep.blocks.is_contiguous()
    assert torch.equal(prep.blocks.bool(), lay.bool())
    for h in range(hl):
        for i in range(nbq):
            n = int(prep.q_count[h, i])
            assert prep.q_index[h, i, :n].tolist() == rows[h][i]
        for j in range(nbk):
            n = int(prep.k_count[h, j])
            assert prep.k_index[h, j, :n].tolist() == cols[h][j]


def test_prepare_layout_lists_and_cache():
    S.clear_cache()
    lay = S.bigbird(130, 16, key_len=97, num_heads=2, seed=5)
    lay[1, 3, :] = False  # a query block with no key block
    lay[0, :, 2] = False  # a key block no query block sees
    p1 = S.prepare_layout(lay)
    _check_prepared(p1, lay)
    assert S.cache_info()["misses"] == 1
    assert S.prepare_layout(lay) is p1, "the same layout tensor must hit the cache"
    assert S.cache_info()["hits"] == 1
    # an in-place change invalidates the entry
    lay[0, 0, :] = True
    p2 = S.prepare_layout(lay)
    assert p2 is not p1
    _check_prepared(p2, lay)
    # a different tensor with equal contents is prepared on its own (and correctly)
    same = lay.clone()
    p3 = S.prepare_layout(same)
    assert p3 is not p2
    _check_prepared(p3, same)
    # a freed layout leaves the cache
    size = S.cache_info()["size"]
    del same, p3
    gc.collect()
    assert S.cache_info()["size"] == size - 1
    # a view is its own tensor object: correct lists for the view
    view = lay[1:]
    _check_prepared(S.prepare_layout(view), view)


def test_prepare_layout_lru_bound():
    S.clear_cache()
    keep = [S.dense(16 * (n + 1), 16) for n in range(S.cache_info()["maxsize"] + 5)]
    for lay in keep:
        S.prepare_layout(lay)
    assert S.cache_info()["size"] == S.cache_info()["maxsize"]
    with torch.inference_mode():
        inf = S.dense(97, 16)
        _check_prepared(S.prepare_layout(inf), inf)  # never cached, still correct


@pytest.mark.parametrize("nbq,nbk", [(8, 3), (3, 8)], ids=["tall", "wide"])
def test_density_report_non_square(nbq, nbk):
    """density() of a layout with more query blocks than key blocks, and the other way round:
    per-head and block density over nbq x nbk blocks, blocks per row over the nbq query blocks,
    token density with partial last blocks both ways."""
    h, bs = 2, 16
    lay = torch.rand(h, nbq, nbk) < 0.5
    lay[:, 0, 0] = True
    lq, lk = nbq * bs - 5, nbk * bs - 11
    rep = S.density(lay, bs, lq, key_len=lk)
    n = int(lay.sum())
    assert rep.blocks == (nbq, nbk) and rep.nonzero_blocks == n
    assert math.isclose(rep.block_density, n / (h * nbq * nbk))
    assert rep.per_head == tuple(float(lay[i].sum()) / (nbq * nbk) for i in range(h))
    assert math.isclose(rep.mean_blocks_per_row, n / (h * nbq))
    tok = reference.layout_to_mask(lay, bs, lq, lk).double().mean()
    assert math.isclose(rep.token_density, float(tok), rel_tol=1e-12)
    # a preset: on an 8 x 2 grid, the window of query blocks 0, 1, 2 holds 2, 2, 1 key blocks
    rep = S.density(S.sliding_window(8 * 64, 64, window=1, key_len=2 * 64))
    assert rep.nonzero_blocks == 5 and rep.per_head == (5 / 16,)
    assert math.isclose(rep.mean_blocks_per_row, 5 / 8)


def test_prepare_layout_long_rows_stay_in_order():
    """Rows and columns with many blocks (a 64 x 70 grid: sorting more than a handful of entries,
    where an unstable sort would shuffle them) still list their blocks in increasing order, as
    PreparedLayout promises."""
    S.clear_cache()
    lay = torch.rand(2, 64, 70) < 0.6
    lay[0, 5] = True  # a full row
    lay[1, :, 9] = True  # a full column
    _check_prepared(S.prepare_layout(lay), lay)
    big = S.bigbird(64 * 16, 16, window=2, global_blocks=1, random_blocks=3, seed=1)
    _check_prepared(S.prepare_layout(big), big)
