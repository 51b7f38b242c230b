"""Attention cases: dense SDPA at BERT shapes (with and without key padding), long sequences
(causal and not), local attention (a sliding window), grouped-query attention (32 query heads
sharing 8 K/V heads), and variable-length batches against padded SDPA.

Implementations: fastbert on each backend; torch SDPA pinned to each of its backends
(``torch.nn.attention.sdpa_kernel``: flash, cuDNN, memory-efficient, math); FlexAttention
(compiled) with the equivalent BlockMask; xformers and flash-attn when installed. Inputs are stored
(B, L, H, D) and viewed as (B, H, L, D) with ``transpose(1, 2)``, as a model's projections produce
them. Each result is checked against ``fastbert.reference`` (fp32, or fp64 for fp32 inputs) with
the project's rule (error <= 2x that of PyTorch in the same precision) before it is timed; big
shapes are checked on the first batch element and as many heads as fit a 512 MB score matrix.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import (Case, CheckResult, Impl, Prepared, Unavailable, attention_flops, compare,
                     dtype_name, fastbert_impl, ns, configure_compile, reason_text,
                     varlen_attention_flops)

__all__ = ["cases", "dense_case", "varlen_case", "seqlens", "sdpa_impl", "flex_impl",
           "compiled_flex", "block_mask_from_token_mask", "block_mask_from_layout",
           "attention_check", "SDPA_BACKENDS"]

FAMILY = "attention"
SDPA_BACKENDS = (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION"),
                 ("sdpa-efficient", "EFFICIENT_ATTENTION"), ("sdpa-math", "MATH"))
FLEX_BLOCK = 128               # FlexAttention's default block size
CHECK_SCORE_ELEMS = 1 << 27    # 512 MB of fp32 scores per reference check
MATH_LIMIT_BYTES = 16 << 30    # the math backend materialises the scores; skip beyond this


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def seqlens(batch: int, max_len: int, seed: int = 0) -> List[int]:
    """Reproducible lengths uniform in [1, max_len], the first one max_len: mean about max_len / 2
    (the "half fill" batches of the varlen and key-padding cases)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (batch,), generator=g)
    lens[0] = max_len
    return [int(x) for x in lens]


def bhld(s):
    """(B, H, L, D) views of the (B, L, H, D) leaves."""
    return s.q.transpose(1, 2), s.k.transpose(1, 2), s.v.transpose(1, 2)


def _qkv_blhd(b, lq, lk, h, d, dtype, device, requires_grad, hkv=None):
    hkv = h if hkv is None else hkv
    q = torch.randn(b, lq, h, d, device=device, dtype=dtype).requires_grad_(requires_grad)
    k = torch.randn(b, lk, hkv, d, device=device, dtype=dtype).requires_grad_(requires_grad)
    v = torch.randn(b, lk, hkv, d, device=device, dtype=dtype).requires_grad_(requires_grad)
    return q, k, v


def _check_heads(h: int, lq: int, lk: int) -> int:
    return max(1, min(h, CHECK_SCORE_ELEMS // max(1, lq * lk)))


# ----------------------------------------------------------------------------------------------
# The check shared by the attention families
# ----------------------------------------------------------------------------------------------
def attention_check(fn: Callable, inputs: Sequence[Tensor], out: Tensor, grads: Sequence,
                    do: Optional[Tensor], dtype: torch.dtype, names=("q", "k", "v"),
                    cache: Optional[dict] = None, key=None) -> CheckResult:
    """Compare ``out`` and ``grads`` with ``fn(*inputs, compute_dtype)`` from fastbert.reference.

    ``inputs``, ``out``, ``grads`` and ``do`` are already restricted to the checked slice; ``fn``
    gets inputs upcast to fp32 (fp64 for fp32 data) for the reference, and the inputs as they are
    with ``compute_dtype=dtype`` for PyTorch's low-precision error (the tolerance's yardstick).
    The references are kept in ``cache[key]`` so that every implementation of a case reuses them.
    """
    hi = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    need_grad = len(grads) > 0
    if cache is not None:
        key = (key, need_grad)
        if key in cache:
            ref_o, ref_g, low_o, low_g = cache[key]
            return _compare_attention(out, grads, names, ref_o, ref_g, low_o, low_g)

    def run(high: bool):
        xs = [x.detach().to(hi) if high else x.detach().clone() for x in inputs]
        for x in xs:
            x.requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad):
            o = fn(*xs, hi if high else dtype)
            if need_grad:
                o.backward(do.to(o.dtype))
        return o.detach(), [x.grad for x in xs]

    ref_o, ref_g = run(True)
    low_o, low_g = run(False)
    if cache is not None:
        cache[key] = (ref_o, ref_g, low_o, low_g)
    return _compare_attention(out, grads, names, ref_o, ref_g, low_o, low_g)


def _compare_attention(out, grads, names, ref_o, ref_g, low_o, low_g) -> CheckResult:
    items = [("output", out, ref_o, low_o)]
    for name, g, rg, lg in zip(names, grads, ref_g, low_g):
        items.append((f"grad {name}", g, rg, lg))
    return compare(items)


def _slice_grads(grads, fn):
    return [None if g is None else fn(g) for g in grads]


# ----------------------------------------------------------------------------------------------
# Peers
# ----------------------------------------------------------------------------------------------
def _probe(forward, state) -> None:
    """Run ``forward`` once; torch's "no kernel for these inputs" becomes Unavailable with the
    reasons torch printed as warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                forward(state)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            why = []
            for w in caught:
                line = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
                line = line.split(" (Triggered internally")[0]
                if line and line not in why:
                    why.append(line)
            msg = reason_text(e, 160)
            if why:
                msg += " — " + "; ".join(why[:4])
            raise Unavailable(msg) from None


def sdpa_impl(name: str, backend: str, forward: Callable[[object], Tensor], *,
              footprint: Callable[[object], float] = lambda s: 0.0, **prepared_kw) -> Impl:
    """torch SDPA pinned to one backend; ``forward(state)`` calls F.scaled_dot_product_attention."""
    def prepare(case, state):
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError as e:
            raise Unavailable(f"torch.nn.attention.sdpa_kernel is not importable ({e})") from None
        be = getattr(SDPBackend, backend, None)
        if be is None:
            raise Unavailable(f"this torch ({torch.__version__}) has no SDPBackend.{backend}")
        if backend == "MATH" and footprint(state) > MATH_LIMIT_BYTES:
            raise Unavailable(f"skipped: the math backend would materialise "
                              f"{footprint(state) / 2**30:.0f} GiB of scores")

        def fwd(s):
            with sdpa_kernel(be):
                return forward(s)

        _probe(fwd, state)
        return Prepared(fwd, **prepared_kw)

    return Impl(name, prepare)


_FLEX = None


def compiled_flex():
    """torch.compile(flex_attention), made once; raises Unavailable where FlexAttention is missing."""
    global _FLEX
    if _FLEX is None:
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError as e:
            raise Unavailable(f"FlexAttention is not in this torch ({torch.__version__}): {e}") from None
        configure_compile()
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _blocks_to_block_mask(active: Tensor, full: Tensor, mask_mod, lq: int, lk: int,
                          block: int = FLEX_BLOCK):
    """A flex BlockMask from block maps (B|1, H|1, nq, nk): ``full`` blocks need no mask_mod,
    ``active & ~full`` blocks are partial (mask_mod applies), the rest are skipped."""
    from torch.nn.attention.flex_attention import BlockMask

    partial = active & ~full

    def indices(m: Tensor):
        num = m.sum(-1).to(torch.int32)
        # active block indices first, in ascending order
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num.contiguous(), order.contiguous()

    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(full)
    kwargs = {"BLOCK_SIZE": block, "mask_mod": mask_mod}
    if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["seq_lengths"] = (lq, lk)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, **kwargs)


def block_mask_from_token_mask(token_mask: Tensor, mask_mod, block: int = FLEX_BLOCK):
    """BlockMask from a bool token mask (B|1, H|1, Lq, Lk), True = attend, and the mask_mod that
    computes the same predicate."""
    b, h, lq, lk = token_mask.shape
    nq, nk = -(-lq // block), -(-lk // block)
    padded = torch.zeros(b, h, nq * block, nk * block, dtype=torch.bool, device=token_mask.device)
    padded[..., :lq, :lk] = token_mask
    tiles = padded.view(b, h, nq, block, nk, block)
    active = tiles.any(dim=5).any(dim=3)
    # a tile that the sequence end cuts is still "full" when every in-range element is True
    in_range = torch.zeros_like(padded)
    in_range[..., :lq, :lk] = True
    full = (tiles | ~in_range.view(b, h, nq, block, nk, block)).all(dim=5).all(dim=3) & active
    return _blocks_to_block_mask(active, full, mask_mod, lq, lk, block)


def block_mask_from_layout(layout: Tensor, layout_block: int, lq: int, lk: int,
                           block: int = FLEX_BLOCK):
    """The BlockMask equivalent to a fastbert block layout (H|1, nbq, nbk) of ``layout_block``.

    A layout block size that tiles 128 (16, 32, 64) maps to flex blocks that are full when all
    their sub-blocks are on and partial (mask_mod reads the layout) when some are; multiples of 128
    map exactly."""
    lay = layout.bool()
    if layout_block % block == 0:
        r = layout_block // block
        blocks = lay.repeat_interleave(r, dim=-2).repeat_interleave(r, dim=-1)
        nq, nk = -(-lq // block), -(-lk // block)
        blocks = blocks[..., :nq, :nk]
        active, full = blocks, blocks
    elif block % layout_block == 0:
        r = block // layout_block
        hh, nbq, nbk = lay.shape
        nq, nk = -(-nbq // r), -(-nbk // r)
        pad = torch.zeros(hh, nq * r, nk * r, dtype=torch.bool, device=lay.device)
        pad[:, :nbq, :nbk] = lay
        # sub-blocks beyond the sequence do not exist: count them as "on" for fullness
        exists = torch.zeros_like(pad)
        exists[:, :nbq, :nbk] = True
        tiles = pad.view(hh, nq, r, nk, r)
        active = tiles.any(dim=4).any(dim=2)
        full = (tiles | ~exists.view(hh, nq, r, nk, r)).all(dim=4).all(dim=2) & active
    else:
        raise Unavailable(f"layout block size {layout_block} does not tile FlexAttention's "
                          f"{block}-token blocks")
    active, full = active.unsqueeze(0), full.unsqueeze(0)

    if lay.shape[0] == 1:
        def mask_mod(b, h, q_idx, kv_idx):
            return lay[0, q_idx // layout_block, kv_idx // layout_block]
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return lay[h, q_idx // layout_block, kv_idx // layout_block]
    return _blocks_to_block_mask(active, full, mask_mod, lq, lk, block)


def flex_impl(forward_with_mask: Callable, make_block_mask: Callable, name: str = "flex",
              **prepared_kw) -> Impl:
    """FlexAttention (compiled) with the BlockMask ``make_block_mask(state)`` (None: dense)."""
    def prepare(case, state):
        flex = compiled_flex()
        bm = make_block_mask(state)
        return Prepared(lambda s: forward_with_mask(flex, s, bm), **prepared_kw)

    return Impl(name, prepare)


def _xformers_impl() -> Impl:
    def prepare(case, s):
        try:
            import xformers.ops as xops
        except ImportError as e:
            raise Unavailable(f"xformers is not installed ({e})") from None
        if s.mask is not None or getattr(s, "window", None) is not None:
            raise Unavailable("this benchmark wires xformers for unmasked and causal cases only")
        if s.k.shape[2] != s.q.shape[2]:
            raise Unavailable("this benchmark does not wire xformers' grouped-query layout "
                              "(5-D BMGHK inputs)")
        bias = xops.LowerTriangularMask() if s.causal else None
        return Prepared(lambda st: xops.memory_efficient_attention(st.q, st.k, st.v,
                                                                   attn_bias=bias).transpose(1, 2))

    return Impl("xformers", prepare)


def _flash_attn_impl() -> Impl:
    def prepare(case, s):
        try:
            from flash_attn import flash_attn_func
        except ImportError as e:
            raise Unavailable(f"flash-attn is not installed ({e})") from None
        if s.mask is not None:
            raise Unavailable("flash_attn_func takes no key-padding mask (see the varlen cases)")
        window = getattr(s, "window", None) or (-1, -1)  # its own sliding window, where given
        return Prepared(lambda st: flash_attn_func(st.q, st.k, st.v, causal=st.causal,
                                                   window_size=window).transpose(1, 2))

    return Impl("flash-attn", prepare)


# ----------------------------------------------------------------------------------------------
# Dense cases
# ----------------------------------------------------------------------------------------------
def _dense_token_mask(s):
    """(token mask, mask_mod) of a dense state, or (None, None) when nothing is masked."""
    b, lq, lk = s.q.shape[0], s.q.shape[1], s.k.shape[1]
    dev = s.q.device
    if getattr(s, "window", None) is not None:
        left, right = s.window

        def sliding_window(b, h, q_idx, kv_idx):
            return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)
        return s.window_mask, sliding_window
    if s.causal:
        tm = torch.ones(lq, lk, dtype=torch.bool, device=dev).tril_()[None, None]

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
        return tm, causal
    if s.mask is not None:
        lens = s.lens
        tm = (torch.arange(lk, device=dev)[None, :] < lens[:, None])[:, None, None, :].expand(b, 1, lq, lk)

        def key_padding(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]
        return tm, key_padding
    return None, None


def _dense_block_mask(s):
    tm, mm = _dense_token_mask(s)
    return None if tm is None else block_mask_from_token_mask(tm, mm)


def window_pairs(lq: int, lk: int, window: Tuple[int, int]) -> int:
    """Query-key pairs inside a sliding window (left, right) (-1: unbounded)."""
    left, right = (lk if w < 0 else w for w in window)
    i = torch.arange(lq, dtype=torch.int64)
    lo = torch.clamp(i - left, min=0)
    hi = torch.clamp(i + right, max=lk - 1)
    return int(torch.clamp(hi - lo + 1, min=0).sum())


def dense_case(b: int, h: int, lq: int, d: int, dtype: torch.dtype = torch.float16, *,
               lk: Optional[int] = None, causal: bool = False, key_padding: bool = False,
               window: Optional[Tuple[int, int]] = None, kv_heads: Optional[int] = None,
               pass_: str = "fwd", kind: str = "bert", quick: bool = False) -> Case:
    """Dense attention (B, H, Lq, D) x (B, H, Lk, D); ``key_padding`` masks keys beyond per-sequence
    lengths drawn by :func:`seqlens` (mean about L / 2); the flops count the useful work only, the
    sum over the batch of 4 * H * Lq * len_b * D (x the pass factor), as the varlen and BERT cases
    count the real tokens. fastbert's Triton kernels skip the padded keys, so its TFLOP/s and %
    of ceiling are the rate of the work it has to do; an implementation that computes some of the
    padding (SDPA's backends all of it, FlexAttention the rest of each sequence's last block)
    shows a lower useful rate. Implementations are compared by time either way (the speedups).
    ``window`` = (left, right): local attention (fastbert's ``window_size``; SDPA gets the window
    as a bool mask, FlexAttention as a mask_mod, flash-attn its own ``window_size``); its flops
    count the pairs inside the window only. ``kv_heads`` (a divisor of ``h``): grouped-query
    attention, key / value with ``kv_heads`` heads (``enable_gqa=True`` for fastbert, SDPA and
    FlexAttention; flash-attn takes fewer K/V heads as they are); the flops count the ``h``
    query heads."""
    lk = lq if lk is None else lk
    hkv = h if kv_heads is None else kv_heads
    gqa = hkv != h
    if hkv < 1 or h % hkv:
        raise ValueError(f"dense_case: kv_heads={kv_heads} must divide the {h} query heads")
    group = h // hkv
    if causal and key_padding:
        raise ValueError("dense_case: causal and key_padding are not combined")
    if causal and lk != lq:
        raise ValueError(f"dense_case: causal cases need Lk == Lq (the flops count a square causal "
                         f"mask), got Lq={lq}, Lk={lk}")
    if window is not None and (causal or key_padding):
        raise ValueError("dense_case: a window is not combined with causal or key_padding")
    lens = seqlens(b, lk, seed=lk) if key_padding else None
    dt = dtype_name(dtype)
    name = (f"{pass_}-B{b}-H{h}" + (f"-Hkv{hkv}" if gqa else "") + f"-L{lq}"
            + ("" if lk == lq else f"-Lk{lk}") + f"-D{d}-{dt}"
            + ("-causal" if causal else "") + ("-pad" if key_padding else "")
            + (f"-window{window[0]}_{window[1]}" if window else ""))
    params = {"B": b, "H": h, "Lq": lq, "Lk": lk, "D": d, "causal": causal,
              "mask": "key_padding" if key_padding else "none", "layout": "BLHD", "kind": kind}
    if lens is not None:
        params["mean_len"] = sum(lens) / len(lens)
    if window is not None:
        params["window"] = list(window)
    if gqa:
        params["Hkv"] = hkv
    series = (f"{kind} {pass_} D{d} {dt}" + (" causal" if causal else "")
              + (" key-padding" if key_padding else "")
              + (f" window {window[0]}/{window[1]}" if window else "")
              + (f" Hq{h}/Hkv{hkv}" if gqa else ""))
    gqa_kw = {"enable_gqa": True} if gqa else {}  # peers that predate enable_gqa still run MHA
    req_grad = pass_ != "fwd"

    def setup(device):
        q, k, v = _qkv_blhd(b, lq, lk, h, d, dtype, device, req_grad, hkv)
        do = torch.randn(b, lq, h, d, device=device, dtype=dtype).transpose(1, 2)
        lens_t = mask = window_mask = None
        if lens is not None:
            lens_t = torch.tensor(lens, device=device)
            mask = (torch.arange(lk, device=device)[None, :] < lens_t[:, None])[:, None, None, :]
        if window is not None:
            from .. import reference
            window_mask = reference.window_mask(window, lq, lk, torch.device(device))[None, None]
        return ns(device=torch.device(device), q=q, k=k, v=v, do=do, mask=mask, lens=lens_t,
                  causal=causal, window=window, window_mask=window_mask, cache={})

    def check(s, out, grads, variant):
        # whole groups of query heads, so that the checked K/V heads get all their gradient
        nkv = max(1, _check_heads(h, lq, lk) // group)
        sl, sl_kv = (slice(0, 1), slice(0, nkv * group)), (slice(0, 1), slice(0, nkv))
        mask = None if s.mask is None else s.mask[:1]

        def ref(q, k, v, cdt):
            from .. import reference
            return reference.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                          is_causal=s.causal, enable_gqa=gqa,
                                                          window_size=s.window, compute_dtype=cdt)
        q, k, v = bhld(s)
        g = [None if t is None else t.transpose(1, 2)[sl if i == 0 else sl_kv]
             for i, t in enumerate(grads)]
        return attention_check(ref, (q[sl], k[sl_kv], v[sl_kv]), out[sl], g, s.do[sl], dtype,
                               cache=s.cache, key=variant)

    def fb(s, backend):
        import fastbert
        return fastbert.scaled_dot_product_attention(*bhld(s), attn_mask=s.mask, is_causal=s.causal,
                                                     enable_gqa=gqa, window_size=s.window,
                                                     backend=backend)

    def sdpa(s):
        mask = s.mask if s.window_mask is None else s.window_mask
        return F.scaled_dot_product_attention(*bhld(s), attn_mask=mask, is_causal=s.causal,
                                              **gqa_kw)

    score_bytes = float(b * h * lq * lk * torch.empty((), dtype=dtype).element_size() * 3)
    impls = [fastbert_impl("triton", "scaled_dot_product_attention", fb),
             fastbert_impl("cuda", "scaled_dot_product_attention", fb)]
    impls += [sdpa_impl(n, be, sdpa, footprint=lambda s: score_bytes) for n, be in SDPA_BACKENDS]
    impls += [flex_impl(lambda flex, s, bm: flex(*bhld(s), block_mask=bm, **gqa_kw),
                        _dense_block_mask),
              _xformers_impl(), _flash_attn_impl()]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if lens is not None:  # useful work: each sequence's real keys only
        flops = sum(attention_flops(1, h, lq, n, d, pass_=pass_) for n in lens)
    else:
        flops = attention_flops(b, h, lq, lk, d, causal=causal, pass_=pass_)
    if window is not None:
        flops *= window_pairs(lq, lk, window) / (lq * lk)
    return Case(FAMILY, "scaled_dot_product_attention", name, pass_, dtype, params, "TFLOP/s",
                flops, "Lq", series, setup,
                impls, leaves=lambda s: [s.q, s.k, s.v], check=check,
                footprint=itemsize * b * d * (2 * h * lq + 2 * hkv * lk), quick=quick)


# ----------------------------------------------------------------------------------------------
# Varlen cases
# ----------------------------------------------------------------------------------------------
def varlen_case(b: int, max_len: int, h: int, d: int, dtype: torch.dtype = torch.float16, *,
                causal: bool = False, pass_: str = "fwd", quick: bool = False) -> Case:
    """A batch of ``b`` sequences of lengths from :func:`seqlens` (mean about max_len / 2): fastbert's
    varlen attention on the packed tokens against padded (B, H, max_len, D) attention with a
    key-padding mask (SDPA backends, FlexAttention, fastbert's own dense kernel), FlexAttention
    over the packed tokens with a document mask, and flash-attn's varlen function when installed.
    Every implementation is credited with the useful flops of the real tokens."""
    lens = seqlens(b, max_len, seed=max_len + 1)
    total = sum(lens)
    cap = -(-total // FLEX_BLOCK) * FLEX_BLOCK
    dt = dtype_name(dtype)
    name = f"varlen-{pass_}-B{b}-H{h}-Lmax{max_len}-D{d}-{dt}" + ("-causal" if causal else "")
    params = {"B": b, "H": h, "Lmax": max_len, "D": d, "causal": causal, "total": total,
              "mean_len": total / b, "seqlens": lens}
    req_grad = pass_ != "fwd"
    op = "varlen_attention"

    def setup(device):
        q, k, v = (torch.randn(cap, h, d, device=device, dtype=dtype).requires_grad_(req_grad)
                   for _ in range(3))
        lens_t = torch.tensor(lens, device=device, dtype=torch.int32)
        cu = F.pad(torch.cumsum(lens_t, 0, dtype=torch.int32), (1, 0))
        keep = torch.arange(max_len, device=device)[None, :] < lens_t[:, None]   # [B, L]
        idx = torch.nonzero(keep.flatten()).flatten()

        def padded(x):
            p = torch.zeros(b * max_len, *x.shape[1:], device=device, dtype=dtype)
            p[idx] = x[:total].detach()
            return p.view(b, max_len, *x.shape[1:])

        do = torch.randn(cap, h, d, device=device, dtype=dtype)
        doc = torch.full((cap,), b, device=device, dtype=torch.int32)  # tail: a pseudo-document
        doc[:total] = torch.repeat_interleave(torch.arange(b, device=device, dtype=torch.int32),
                                              lens_t.long())
        mask = keep[:, None, None, :]                  # key padding, (B, 1, 1, L)
        if causal:  # SDPA takes a mask or is_causal, not both: fold causality into the mask
            mask = mask & torch.ones(max_len, max_len, dtype=torch.bool, device=device).tril()
        return ns(device=torch.device(device), q=q, k=k, v=v, do=do, cu=cu, total=total,
                  idx=idx, lens=lens_t, keep=keep, doc=doc,
                  qp=padded(q).requires_grad_(req_grad), kp=padded(k).requires_grad_(req_grad),
                  vp=padded(v).requires_grad_(req_grad),
                  dop=padded(do).transpose(1, 2), mask=mask, causal=causal, cache={})

    def to_packed(s, t):           # (B, L, H, D) -> (total, H, D)
        return t.reshape(b * max_len, *t.shape[2:])[s.idx]

    def adapt_padded(s, out, grads):
        return to_packed(s, out.transpose(1, 2)), _slice_grads(grads, lambda g: to_packed(s, g))

    padded_kw = dict(leaves=lambda s: [s.qp, s.kp, s.vp], upstream=lambda s: s.dop,
                     adapt=adapt_padded)

    def check(s, out, grads, variant):
        def ref(q, k, v, cdt):
            from .. import reference
            return reference.varlen_attention(q, k, v, s.cu, s.cu, max_len, max_len,
                                              is_causal=causal, compute_dtype=cdt)
        g = _slice_grads(grads, lambda t: t[:total])
        return attention_check(ref, (s.q[:total], s.k[:total], s.v[:total]), out[:total], g,
                               s.do[:total], dtype, cache=s.cache, key=variant)

    def fb_varlen(s, backend):
        import fastbert
        return fastbert.varlen_attention(s.q[:total], s.k[:total], s.v[:total], s.cu, s.cu,
                                         max_len, max_len, is_causal=causal, backend=backend)

    def fb_padded(s, backend):
        import fastbert
        return fastbert.scaled_dot_product_attention(s.qp.transpose(1, 2), s.kp.transpose(1, 2),
                                                     s.vp.transpose(1, 2), attn_mask=s.mask,
                                                     backend=backend)

    def sdpa_padded(s):
        return F.scaled_dot_product_attention(s.qp.transpose(1, 2), s.kp.transpose(1, 2),
                                              s.vp.transpose(1, 2), attn_mask=s.mask)

    def padded_block_mask(s):
        tm = (torch.arange(max_len, device=s.q.device)[None, :] < s.lens[:, None])
        tm = tm[:, None, None, :].expand(b, 1, max_len, max_len)
        if causal:
            tm = tm & torch.ones(max_len, max_len, dtype=torch.bool, device=s.q.device).tril()
        lens_t = s.lens

        def key_padding(bi, hi, q_idx, kv_idx):
            keep = kv_idx < lens_t[bi]
            return (keep & (q_idx >= kv_idx)) if causal else keep
        return block_mask_from_token_mask(tm, key_padding)

    def packed_block_mask(s):
        doc = s.doc
        tm = doc[:, None] == doc[None, :]
        if causal:
            tm = tm.tril()

        def document(bi, hi, q_idx, kv_idx):
            same = doc[q_idx] == doc[kv_idx]
            return (same & (q_idx >= kv_idx)) if causal else same
        return block_mask_from_token_mask(tm[None, None], document)

    def flex_packed(flex, s, bm):
        out = flex(s.q.unsqueeze(0).transpose(1, 2), s.k.unsqueeze(0).transpose(1, 2),
                   s.v.unsqueeze(0).transpose(1, 2), block_mask=bm)
        return out[0].transpose(0, 1)  # (cap, H, D)

    def flash_attn_varlen(case, s):
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError as e:
            raise Unavailable(f"flash-attn is not installed ({e})") from None
        return Prepared(lambda st: flash_attn_varlen_func(st.q[:total], st.k[:total], st.v[:total],
                                                          st.cu, st.cu, max_len, max_len,
                                                          causal=causal),
                        upstream=lambda st: st.do[:total])

    score_bytes = float(b * h * max_len * max_len * torch.empty((), dtype=dtype).element_size() * 3)
    impls = [
        # the public varlen API reads cu_seqlens on the host once per tensor (remembered; skipped
        # during CUDA-graph capture), so these are timed as graphs like the peers where small
        fastbert_impl("triton", op, fb_varlen, upstream=lambda s: s.do[:total]),
        fastbert_impl("cuda", op, fb_varlen, upstream=lambda s: s.do[:total]),
        fastbert_impl("triton", "scaled_dot_product_attention", fb_padded,
                      name="fastbert-triton-padded", **padded_kw),
        fastbert_impl("cuda", "scaled_dot_product_attention", fb_padded,
                      name="fastbert-cuda-padded", **padded_kw),
    ]
    impls += [sdpa_impl(n + "-padded", be, sdpa_padded, footprint=lambda s: score_bytes, **padded_kw)
              for n, be in SDPA_BACKENDS]
    impls += [
        flex_impl(lambda flex, s, bm: flex(s.qp.transpose(1, 2), s.kp.transpose(1, 2),
                                           s.vp.transpose(1, 2), block_mask=bm),
                  padded_block_mask, name="flex-padded", **padded_kw),
        flex_impl(flex_packed, packed_block_mask, name="flex-packed"),
        Impl("flash-attn-varlen", flash_attn_varlen),
    ]
    itemsize = torch.empty((), dtype=dtype).element_size()
    return Case(FAMILY, op, name, pass_, dtype, params, "TFLOP/s",
                varlen_attention_flops(lens, h, d, causal=causal, pass_=pass_), "Lmax",
                f"varlen {pass_} D{d} {dtype_name(dtype)}" + (" causal" if causal else ""),
                setup, impls, leaves=lambda s: [s.q, s.k, s.v], check=check,
                footprint=itemsize * h * d * (4 * cap + 4 * b * max_len), quick=quick)


# ----------------------------------------------------------------------------------------------
# The case lists
# ----------------------------------------------------------------------------------------------
BERT_SHAPE = dict(b=32, h=12, d=64)
LONG_TOKENS = 16384          # B * L, as in the FlashAttention papers
LONG_HIDDEN = 2048           # H * D
GQA_HEADS = (32, 8)          # (query heads, key / value heads), Llama-style


def _long(l: int, d: int, **kw) -> Case:
    return dense_case(LONG_TOKENS // l, LONG_HIDDEN // d, l, d, kind="long", **kw)


def cases(quick: bool = False) -> List[Case]:
    """Every attention case; those marked quick form the ``--quick`` selection (a few minutes on an
    H100 for all families together)."""
    out: List[Case] = []
    for l in (128, 512):
        for pad in (False, True):
            for pass_ in ("fwd", "bwd", "fwd+bwd"):
                q = pass_ == "fwd" or (pass_ == "fwd+bwd" and l == 512 and pad)
                out.append(dense_case(BERT_SHAPE["b"], BERT_SHAPE["h"], l, BERT_SHAPE["d"],
                                      key_padding=pad, pass_=pass_, quick=q))
    for d in (64, 128):
        for causal in (False, True):
            for pass_ in ("fwd", "bwd", "fwd+bwd"):
                if pass_ == "fwd+bwd" and d != 128:
                    continue
                for l in (512, 1024, 2048, 4096, 8192, 16384):
                    q = d == 128 and (
                        (pass_ == "fwd" and not causal and l in (1024, 4096, 16384))
                        or (pass_ == "fwd" and causal and l == 4096)
                        or (pass_ == "bwd" and not causal and l == 4096))
                    out.append(_long(l, d, causal=causal, pass_=pass_, quick=q))
    for l in (128, 512):
        for pass_ in ("fwd", "fwd+bwd"):
            out.append(varlen_case(32, l, 12, 64, pass_=pass_, quick=(l == 512 and pass_ == "fwd")))
    # ModernBERT's local layers: a 128-token window (64 keys each side), 16k tokens, BERT heads
    for l in (2048, 8192):
        for pass_ in ("fwd", "fwd+bwd"):
            out.append(dense_case(LONG_TOKENS // l, 12, l, 64, window=(64, 64), kind="local",
                                  pass_=pass_, quick=(l == 8192 and pass_ == "fwd")))
    # grouped-query attention (Llama-style heads): 16k tokens, 32 query heads share 8 K/V heads
    for l in (2048, 8192):
        for pass_ in ("fwd", "fwd+bwd"):
            out.append(dense_case(LONG_TOKENS // l, GQA_HEADS[0], l, 128, kv_heads=GQA_HEADS[1],
                                  kind="gqa", pass_=pass_, quick=(l == 8192 and pass_ == "fwd")))
    return [c for c in out if c.quick] if quick else out
