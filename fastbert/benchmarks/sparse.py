"""Block-sparse and Linformer attention cases.

Block-sparse: fastbert's block-sparse kernel against fastbert's own dense kernel and torch SDPA
(both computing full attention: the cost sparsity should cut in proportion to density) and
FlexAttention with the equivalent BlockMask, at L 4k to 16k (B * L = 16k tokens), densities 5-50%,
D 64 and 128. The layouts are reproducible random per-head block patterns with the diagonal always
on (no query block without keys), with exactly round(density * nb^2) blocks per head.

Linformer: fastbert's Linformer attention against the plain PyTorch formula (two projection
matmuls, then SDPA) and dense SDPA over all n keys, with the peak memory recorded.

Block-sparse results count the flops of the visited blocks only; the dense baselines are credited
with dense flops, and speedups compare times.
"""
from __future__ import annotations

import functools
import math
from typing import List

import torch
import torch.nn.functional as F

from .attention import (_check_heads, _qkv_blhd, _slice_grads, attention_check,
                        bhld, block_mask_from_layout, flex_impl)
from .common import (PASS_FLOP_FACTOR, Case, Impl, Prepared, attention_flops, block_sparse_flops, dtype_name,
                     fastbert_impl, linformer_flops, ns)

__all__ = ["cases", "random_layout", "sparse_case", "linformer_case"]

FAMILY = "sparse"
TOKENS = 16384


def layout_blocks(nq: int, nk: int, density: float) -> int:
    """Blocks on per head in :func:`random_layout`."""
    return max(min(nq, nk), int(round(density * nq * nk)))


@functools.lru_cache(maxsize=8)
def random_layout(h: int, nq: int, nk: int, density: float, seed: int = 0) -> torch.Tensor:
    """Bool (h, nq, nk): the diagonal plus random blocks, exactly max(diag, round(density * nq * nk))
    blocks on per head, reproducible from ``seed``."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    g = torch.Generator().manual_seed(seed)
    diag = torch.arange(min(nq, nk))
    target = layout_blocks(nq, nk, density)
    scores = torch.rand(h, nq, nk, generator=g)
    scores[:, diag, diag] = -1.0                       # the diagonal sorts first: always on
    pick = torch.argsort(scores.view(h, -1), dim=1)[:, :target]
    layout = torch.zeros(h, nq * nk, dtype=torch.bool)
    layout.scatter_(1, pick, True)
    layout = layout.view(h, nq, nk)
    return layout


def sparse_case(b: int, h: int, l: int, d: int, density: float, *, block: int = 128,
                dtype: torch.dtype = torch.float16, pass_: str = "fwd", quick: bool = False) -> Case:
    nb = -(-l // block)
    seed = 1000 * l + int(density * 100) + d
    blocks = layout_blocks(nb, nb, density)
    actual = blocks / (nb * nb)
    dt = dtype_name(dtype)
    name = f"{pass_}-B{b}-H{h}-L{l}-D{d}-blk{block}-random{round(100 * density)}-{dt}"
    params = {"B": b, "H": h, "L": l, "D": d, "block": block, "density": actual,
              "target_density": density, "layout": "random per head + diagonal"}
    req_grad = pass_ != "fwd"
    dense_flops = attention_flops(b, h, l, l, d, pass_=pass_)
    if l % block == 0:   # every block is block x block: 4 * D flops per attended pair
        work = 4.0 * b * h * d * blocks * block * block * PASS_FLOP_FACTOR[pass_]
    else:
        work = block_sparse_flops(random_layout(h, nb, nb, density, seed), block, b, h, l, l, d,
                                  pass_=pass_)

    def setup(device):
        q, k, v = _qkv_blhd(b, l, l, h, d, dtype, device, req_grad)
        do = torch.randn(b, l, h, d, device=device, dtype=dtype).transpose(1, 2)
        return ns(device=torch.device(device), q=q, k=k, v=v, do=do, mask=None, causal=False,
                  layout=random_layout(h, nb, nb, density, seed).to(device), cache={})

    def check(s, out, grads, variant):
        from .. import reference
        nh = _check_heads(h, l, l)
        sl = (slice(0, 1), slice(0, nh))
        lay = s.layout[:nh]
        if variant == "dense":
            def ref(q, k, v, cdt):
                return reference.scaled_dot_product_attention(q, k, v, compute_dtype=cdt)
        else:
            def ref(q, k, v, cdt):
                return reference.block_sparse_attention(q, k, v, lay, block, compute_dtype=cdt)
        q, k, v = bhld(s)
        g = _slice_grads(grads, lambda t: t.transpose(1, 2)[sl])
        return attention_check(ref, (q[sl], k[sl], v[sl]), out[sl], g, s.do[sl], dtype,
                               cache=s.cache, key=variant)

    def fb_sparse(s, backend):
        import fastbert
        return fastbert.block_sparse_attention(*bhld(s), s.layout, block, backend=backend)

    def fb_dense(s, backend):
        import fastbert
        return fastbert.scaled_dot_product_attention(*bhld(s), backend=backend)

    def sdpa_dense(case, s):
        return Prepared(lambda st: F.scaled_dot_product_attention(*bhld(st)))

    impls = [
        fastbert_impl("triton", "block_sparse_attention", fb_sparse),
        fastbert_impl("cuda", "block_sparse_attention", fb_sparse),
        fastbert_impl("triton", "scaled_dot_product_attention", fb_dense,
                      name="fastbert-triton-dense", variant="dense", work=dense_flops),
        Impl("sdpa-dense", sdpa_dense, variant="dense", work=dense_flops),
        flex_impl(lambda flex, s, bm: flex(*bhld(s), block_mask=bm),
                  lambda s: block_mask_from_layout(s.layout, block, l, l)),
    ]
    itemsize = torch.empty((), dtype=dtype).element_size()
    return Case(FAMILY, "block_sparse_attention", name, pass_, dtype, params, "TFLOP/s",
                work, "density",
                f"block-sparse {pass_} L{l} D{d} blk{block} {dt}", setup, impls,
                leaves=lambda s: [s.q, s.k, s.v], check=check,
                footprint=4 * itemsize * b * h * l * d, quick=quick)


def linformer_case(b: int, h: int, n: int, k: int, d: int, *, dtype: torch.dtype = torch.float16,
                   pass_: str = "fwd", quick: bool = False) -> Case:
    """Linformer with shared (k, n) projections E, F (entries N(0, 1/n)) over n tokens."""
    dt = dtype_name(dtype)
    name = f"linformer-{pass_}-B{b}-H{h}-n{n}-k{k}-D{d}-{dt}"
    params = {"B": b, "H": h, "n": n, "k": k, "D": d, "proj": "shared (k, n)"}
    req_grad = pass_ != "fwd"
    dense_flops = attention_flops(b, h, n, n, d, pass_=pass_)

    def setup(device):
        q, kk, v = _qkv_blhd(b, n, n, h, d, dtype, device, req_grad)
        e = (torch.randn(k, n, device=device, dtype=dtype) / math.sqrt(n)).requires_grad_(req_grad)
        f = (torch.randn(k, n, device=device, dtype=dtype) / math.sqrt(n)).requires_grad_(req_grad)
        do = torch.randn(b, n, h, d, device=device, dtype=dtype).transpose(1, 2)
        return ns(device=torch.device(device), q=q, k=kk, v=v, e=e, f=f, do=do, mask=None,
                  causal=False, cache={})

    def check(s, out, grads, variant):
        from .. import reference
        nh = _check_heads(h, n, n) if variant == "dense" else h
        sl = (slice(0, 1), slice(0, nh))
        q, kk, v = bhld(s)
        g = _slice_grads(grads[:3], lambda t: t.transpose(1, 2)[sl])
        if variant == "dense":
            def ref(q_, k_, v_, cdt):
                return reference.scaled_dot_product_attention(q_, k_, v_, compute_dtype=cdt)
            return attention_check(ref, (q[sl], kk[sl], v[sl]), out[sl], g, s.do[sl], dtype,
                                   cache=s.cache, key="dense")

        def ref(q_, k_, v_, e_, f_, cdt):
            return reference.linformer_attention(q_, k_, v_, e_, f_, compute_dtype=cdt)
        # the projections' gradients sum over the whole batch: check them only when B == 1
        g_ef = list(grads[3:]) if (grads and b == 1) else []
        inputs = (q[sl], kk[sl], v[sl]) + ((s.e, s.f) if g_ef else ())
        if not g_ef:
            return attention_check(lambda q_, k_, v_, cdt: ref(q_, k_, v_, s.e.detach(), s.f.detach(), cdt),
                                   inputs, out[sl], g, s.do[sl], dtype, cache=s.cache, key="qkv")
        return attention_check(ref, inputs, out[sl], g + g_ef, s.do[sl], dtype,
                               names=("q", "k", "v", "proj_k", "proj_v"), cache=s.cache, key="all")

    def fb(s, backend):
        import fastbert
        return fastbert.linformer_attention(*bhld(s), s.e, s.f, backend=backend)

    def torch_linformer(case, s):
        def fwd(st):
            q, kk, v = bhld(st)
            return F.scaled_dot_product_attention(q, torch.matmul(st.e, kk), torch.matmul(st.f, v))
        return Prepared(fwd)

    def sdpa_dense(case, s):
        return Prepared(lambda st: F.scaled_dot_product_attention(*bhld(st)),
                        leaves=lambda st: [st.q, st.k, st.v])

    impls = [
        fastbert_impl("triton", "linformer_attention", fb),
        fastbert_impl("cuda", "linformer_attention", fb),
        Impl("torch-linformer", torch_linformer),
        Impl("sdpa-dense", sdpa_dense, variant="dense", work=dense_flops),
    ]
    itemsize = torch.empty((), dtype=dtype).element_size()
    return Case(FAMILY, "linformer_attention", name, pass_, dtype, params, "TFLOP/s",
                linformer_flops(b, h, n, n, k, d, pass_=pass_), "n",
                f"linformer {pass_} k{k} D{d} {dt}", setup, impls,
                leaves=lambda s: [s.q, s.k, s.v, s.e, s.f], check=check,
                footprint=4 * itemsize * b * h * n * d, quick=quick)


def cases(quick: bool = False) -> List[Case]:
    out: List[Case] = []
    for d in (64, 128):
        for l in (4096, 8192, 16384):
            for density in (0.05, 0.1, 0.25, 0.5):
                out.append(sparse_case(TOKENS // l, 16, l, d, density,
                                       quick=(d == 64 and l == 8192)))
    for density in (0.1, 0.25, 0.5):
        out.append(sparse_case(2, 16, 8192, 64, density, block=64))
        out.append(sparse_case(2, 16, 8192, 64, density, pass_="bwd"))
    for n in (4096, 16384):
        for k in (128, 256):
            for pass_ in ("fwd", "fwd+bwd"):
                out.append(linformer_case(1, 12, n, k, 64, pass_=pass_,
                                          quick=(n == 16384 and k == 256 and pass_ == "fwd")))
    return [c for c in out if c.quick] if quick else out
