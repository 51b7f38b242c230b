"""Dense and variable-length multi-head attention: public functions, checks and dispatch.

Backend implementations register themselves with :func:`fastbert.backends.register` under the op
names ``"scaled_dot_product_attention"`` and ``"varlen_attention"``; the torch (reference) one is
registered here.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .._rng import dropout_seed, seed_like
from .._validation import (check_attn_mask, check_bool, check_cu_seqlens, check_dropout, check_int,
                           check_same, check_scale, check_tensor, host_checks_allowed,
                           triton_scale_reasons, unless_known_false)
from .._library import custom_op, first_order_only
from .._autocast import autocast_dtype, cast, disabled
from ..backends import constant_result, cuda_ops, register, register_cuda_family, select

__all__ = ["scaled_dot_product_attention", "varlen_attention"]


def _check_qkv(query, key, value, ndim: int, layout: str, names=("query", "key", "value")):
    nq, nk, nv = names
    check_tensor(nq, query, ndim=(ndim,))
    check_tensor(nk, key, ndim=(ndim,))
    check_tensor(nv, value, ndim=(ndim,))
    check_same(nq, query, nk, key)
    check_same(nq, query, nv, value)
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"{nk} head dim {key.shape[-1]} must equal {nq} head dim {query.shape[-1]} "
                         f"(shapes {layout}: {nq} {tuple(query.shape)}, {nk} {tuple(key.shape)})")
    if query.shape[-1] == 0:
        raise ValueError(f"{nq} and {nk} head dim D must be >= 1, got shapes {layout}: "
                         f"{nq} {tuple(query.shape)}, {nk} {tuple(key.shape)}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"{nk} {tuple(key.shape)} and {nv} {tuple(value.shape)} must agree in all "
                         f"but the last dim ({layout})")


def _window(left: int, right: int) -> Optional[Tuple[int, int]]:
    """The kernels' window argument: None when both sides are unbounded (-1)."""
    return None if left < 0 and right < 0 else (left, right)


def check_window_size(window_size) -> Optional[Tuple[int, int]]:
    """None, or (left, right) ints >= -1 (-1: unbounded on that side); (-1, -1) gives None."""
    if window_size is None:
        return None
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) for w in window_size)):
        raise TypeError(f"window_size must be None or a pair of ints (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size values must be >= 0, or -1 for unbounded; got {window_size!r}")
    return None if left == -1 and right == -1 else (left, right)


def _causal_bias_variant(attn_mask) -> Optional[str]:
    """"upper_left" / "lower_right" when ``attn_mask`` is one of torch's causal-bias objects
    (``torch.nn.attention.bias.causal_upper_left`` / ``causal_lower_right``), else None."""
    if type(attn_mask).__name__ != "CausalBias":  # no import (it loads torch._dynamo) otherwise
        return None
    from torch.nn.attention.bias import CausalBias, CausalVariant
    if not isinstance(attn_mask, CausalBias):
        return None
    return "lower_right" if attn_mask.variant == CausalVariant.LOWER_RIGHT else "upper_left"


def _from_causal_bias(variant: str, attn_mask, is_causal: bool, window_size, lq: int, lk: int,
                      device: torch.device):
    """(attn_mask, is_causal, window_size) with torch's causal-bias object ``attn_mask`` expressed
    in fastbert's own terms. Upper-left is ``is_causal``. Lower-right (query i sees keys
    j <= i + Lk - Lq) is a window bounded Lk - Lq keys after the query when Lk >= Lq, so the kernels
    still skip the blocks above the diagonal; when Lq > Lk it is an (Lq, Lk) bool mask whose first
    Lq - Lk rows see no key (they return 0, where torch warns of NaN)."""
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (lq, lk):
        raise ValueError(f"attn_mask is a causal bias for (Lq, Lk) = ({attn_mask.seq_len_q}, "
                         f"{attn_mask.seq_len_kv}) but query and key give ({lq}, {lk})")
    if is_causal:
        raise ValueError("attn_mask is already a causal bias; pass is_causal=False with it")
    if variant == "upper_left" or lq == lk:
        return None, True, window_size
    if lk > lq:
        left, right = window_size if window_size is not None else (-1, -1)
        shift = lk - lq
        return None, False, (left, shift if right < 0 else min(right, shift))
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)
    return keep, False, window_size


def _check_alibi(slopes, query: Tensor, batch: int, heads: int, batch_name: str) -> None:
    """ALiBi slopes: None, or a floating (H,) / (batch, H) tensor on query's device, constant."""
    if slopes is None:
        return
    if not isinstance(slopes, Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(slopes).__name__}")
    if not slopes.is_floating_point():
        raise TypeError(f"alibi_slopes must be a floating tensor, got dtype {slopes.dtype}")
    if tuple(slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape (H,) = ({heads},) or ({batch_name}, H) = "
                         f"({batch}, {heads}), got {tuple(slopes.shape)}")
    if slopes.device != query.device:
        raise ValueError(f"alibi_slopes is on {slopes.device} but the queries are on {query.device}")
    if slopes.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("alibi_slopes are constants: their gradient is not computed; "
                                  "pass alibi_slopes.detach(), or a float attn_mask (whose "
                                  "gradient is) for a trainable bias")


def _check_kv_heads(heads: int, kv_heads: int, gqa: bool, nq: str, nk: str, layout: str) -> None:
    """Key / value heads: as many as the query's, or (grouped-query attention) a divisor of them."""
    if kv_heads == heads:
        return
    if not gqa:
        raise ValueError(f"{nq} has {heads} heads but {nk} has {kv_heads} {layout}; pass "
                         "enable_gqa=True for grouped-query attention")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"grouped-query attention needs the {nk} heads ({kv_heads}) to divide the "
                         f"{nq} heads ({heads}) {layout}")


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    alibi_slopes: Optional[Tensor] = None,
    window_size: Optional[Tuple[int, int]] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Multi-head attention with the semantics of ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        query: (B, H, Lq, D). As in torch, any rank >= 2 is taken, (..., H, Lq, D): a rank below 4
            runs as B = 1 (and H = 1), the dims before H of a larger rank are flattened into B.
        key: (B, Hkv, Lk, D); Hkv = H, or with ``enable_gqa`` any divisor of H.
        value: (B, Hkv, Lk, Dv).
        attn_mask: optional, broadcastable to (B, H, Lq, Lk). A bool mask is True where a key takes
            part; a floating mask is added to the scores (it may require grad). torch's
            ``causal_upper_left(Lq, Lk)`` / ``causal_lower_right(Lq, Lk)`` objects
            (``torch.nn.attention.bias``) are accepted as in torch and never materialised when
            Lq <= Lk: lower-right query i sees keys j <= i + Lk - Lq.
        dropout_p: dropout probability on the attention weights, in [0, 1] (1 drops every weight:
            computed by the torch backend).
        is_causal: query i sees keys j <= i (top-left aligned); may be combined with ``attn_mask``.
        scale: score scale, default 1/sqrt(D).
        enable_gqa: grouped-query attention (as torch's): query head h attends with key / value
            head h // (H / Hkv). The Triton kernels read the shared heads in place and sum their
            gradients over each group in registers; nothing is repeated in memory.
        alibi_slopes: optional (H,) or (B, H) floating tensor: ALiBi (as in MosaicBERT and
            Jina-BERT), ``- slope * |i - j|`` added to the score of query i and key j, on top of
            ``attn_mask``. The Triton kernels compute it in place (no (H, Lq, Lk) bias is read);
            the slopes are constants (no gradient).
        window_size: optional (left, right): local (sliding-window) attention, query i sees keys
            i - left .. i + right only; -1 leaves a side unbounded (FlashAttention's convention,
            aligned top-left like ``is_causal``; ModernBERT's local layers use (64, 64)). The Triton
            kernels visit only the key blocks the window reaches: work O(L * window).
        backend: None/"auto", "triton", "cuda" or "torch" (default from ``FASTBERT_BACKEND``).

    Returns:
        (B, H, Lq, Dv) in the dtype of ``query``. A query row whose every key is masked returns 0
        and gets zero gradient, never NaN, on every backend (as torch's SDPA on its math path in
        recent versions; torch's ``nn.MultiheadAttention`` gives NaN).

    A NaN or inf in ``key`` / ``value`` at a position a row masks out may or may not reach that row:
    the torch backend multiplies it by the row's zero weight (0 * NaN = NaN, as torch's SDPA does),
    while the Triton kernels never read the keys they skip (past the last key a bool mask lets any
    query of the batch entry see, past the causal diagonal, outside a window).
    Zero such positions first (e.g. padding filled with NaN) when the rows must not depend on them.

    Limits of the Triton kernels, beyond which torch's math path differs: a float mask's finite
    values beyond +-2e38 count as +-2e38 (they are converted to base 2, like the scores, in fp32),
    so keys whose mask values differ only out there weigh the same (HuggingFace's finfo.min
    padding, one value, is unaffected); ``scale`` is at most 2.359e38. As in FlashAttention and
    torch's own float16 SDPA, the float16 backward rounds dS = P * (dP - delta) to float16 for its
    matmuls, so upstream gradients large enough that |dO . V| nears 65504 overflow there: use
    bfloat16, or a loss scale that keeps gradients moderate.

    Inputs may be non-contiguous views, e.g. a (B, L, H, D) tensor ``.transpose(1, 2)``. Under
    ``torch.autocast``, floating query, key, value and attn_mask are cast to the autocast dtype, as
    autocast casts those of torch's SDPA.
    """
    ac = autocast_dtype(query)
    if ac is not None:
        if _causal_bias_variant(attn_mask) is None:
            attn_mask = cast(attn_mask, ac)
        with disabled(query):
            return scaled_dot_product_attention(
                cast(query, ac), cast(key, ac), cast(value, ac), attn_mask, dropout_p, is_causal,
                scale, enable_gqa, alibi_slopes=alibi_slopes, window_size=window_size,
                backend=backend)
    if isinstance(query, Tensor) and query.dim() != 4:
        if (query.dim() > 4 and isinstance(key, Tensor) and key.dim() == query.dim()
                and _causal_bias_variant(attn_mask) is None):
            # the dims before (H, L, D) are flattened into B: check the mask against the full rank
            check_attn_mask(attn_mask, query, tuple(query.shape[:-1]) + (key.shape[-2],))
        return _sdpa_any_rank(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                              alibi_slopes=alibi_slopes, window_size=window_size, backend=backend)
    _check_qkv(query, key, value, 4, "(B, H, L, D)")
    enable_gqa = check_bool("enable_gqa", enable_gqa)
    if key.shape[0] != query.shape[0]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must have the same "
                         "batch dim (B, H, L, D)")
    _check_kv_heads(query.shape[1], key.shape[1], enable_gqa, "query", "key", "(B, H, L, D)")
    b, h, lq, _ = query.shape
    lk = key.shape[2]
    window_size = check_window_size(window_size)
    is_causal = check_bool("is_causal", is_causal)
    variant = _causal_bias_variant(attn_mask)
    if variant is not None:
        attn_mask, is_causal, window_size = _from_causal_bias(variant, attn_mask, is_causal,
                                                              window_size, lq, lk, query.device)
    check_attn_mask(attn_mask, query, (b, h, lq, lk))
    _check_alibi(alibi_slopes, query, b, h, "B")
    dropout_p = check_dropout(dropout_p)
    scale = check_scale(scale)
    if lq == 0 or lk == 0 or b == 0 or h == 0:
        # Nothing to attend to: every row is fully masked and returns 0 (zero gradients, a float
        # mask's included).
        extra = [attn_mask] if attn_mask is not None and attn_mask.is_floating_point() else []
        return reference.zeros_in_graph((b, h, lq, value.shape[-1]), *extra, query, key, value)
    impl = select("scaled_dot_product_attention", backend, query.device, query=query, key=key,
                  value=value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                  scale=scale, enable_gqa=enable_gqa, alibi_slopes=alibi_slopes,
                  window_size=window_size)
    return impl.fn(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                   alibi_slopes, window_size)


def _sdpa_any_rank(query: Tensor, key, value, attn_mask, *args, **kwargs) -> Tensor:
    """Inputs (..., L, D) of rank 2, 3 or more than 4, as torch's SDPA takes them: run as
    (B, H, L, D), with leading 1s added or the dims before H flattened into B, then given back the
    caller's leading dims."""
    for name, t in (("key", key), ("value", value)):
        check_tensor(name, t)
    nd = query.dim()
    if nd < 2 or key.dim() != nd or value.dim() != nd:
        raise ValueError("query, key and value must have the same rank, at least 2 ((..., L, D)); "
                         f"got shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    lead = query.shape[:-3]
    if nd > 4 and (key.shape[:-3] != lead or value.shape[:-3] != lead):
        raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                         f"{tuple(value.shape)} must agree in the dims before (H, L, D)")
    if isinstance(attn_mask, Tensor) and attn_mask.dim() > nd:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} has more dims than query "
                         f"{tuple(query.shape)}")

    def as_4d(t: Tensor) -> Tensor:
        return t.reshape((1,) * (4 - nd) + tuple(t.shape)) if nd < 4 else t.flatten(0, nd - 4)

    mask = attn_mask
    if nd > 4 and isinstance(mask, Tensor) and mask.dim() > 3:
        m = mask.reshape((1,) * (nd - mask.dim()) + tuple(mask.shape))
        mask = m.expand(*lead, *m.shape[-3:]).flatten(0, nd - 4)
    out = scaled_dot_product_attention(as_4d(query), as_4d(key), as_4d(value), mask, *args, **kwargs)
    return out.reshape(tuple(query.shape[:-1]) + (value.shape[-1],))


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    *,
    alibi_slopes: Optional[Tensor] = None,
    window_size: Optional[Tuple[int, int]] = None,
    attn_mask: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Attention over packed variable-length sequences, with no padding stored or computed.

    Args:
        q: (total_q, H, D) tokens of all sequences, packed.
        k: (total_k, Hkv, D); Hkv = H, or a divisor of H for grouped-query attention (query head h
            uses key / value head h // (H / Hkv), as in FlashAttention's varlen functions).
        v: (total_k, Hkv, Dv).
        cu_seqlens_q: (N + 1,) int32 (or int64) cumulative query lengths, starting at 0 and ending
            at total_q.
        cu_seqlens_k: (N + 1,) int32 (or int64) cumulative key lengths.
        max_seqlen_q / max_seqlen_k: the longest query / key sequence (upper bounds are fine).
        dropout_p, is_causal, scale, backend: as in :func:`scaled_dot_product_attention`; causal is
            top-left aligned within each sequence.
        alibi_slopes: optional (H,) or (N, H): ALiBi as in :func:`scaled_dot_product_attention`,
            positions counted within each sequence.
        window_size: optional (left, right): sliding window as in
            :func:`scaled_dot_product_attention`, within each sequence.
        attn_mask: optional, broadcastable to (N, H, max_seqlen_q, max_seqlen_k): entry
            [i, h, r, c] applies to the r-th query and the c-th key *of sequence i* (positions
            within the sequence; entries past its length are never read). Bool (True = the key
            takes part) or floating (added to the scores; it may require grad). A (1, H, L, L)
            float bias shared by every sequence is a relative-position bias (MPNet's, T5's) that
            no padded (N, H, L, L) copy is made of. The Triton kernels read it through its strides;
            its gradient takes an fp32 scratch of (N, H, max_seqlen_q, max_seqlen_k).

    Returns:
        (total_q, H, Dv). See :func:`fastbert.unpad_input` to build the inputs from a padded batch.

    In eager mode the lengths are checked on the host (one device sync the first time a
    ``cu_seqlens`` tensor is seen; an unmodified tensor passed again, e.g. by every layer of a
    model, is not read again); under torch.compile and CUDA-graph capture only their type, shape
    and device are, so there a max_seqlen below some sequence's length is the caller's error: the
    kernels then clamp that sequence to max_seqlen (never a read or write out of bounds) and its
    rows come out wrong (NaN from the CUDA kernel; past max_seqlen_q, unwritten from Triton).
    """
    ac = autocast_dtype(q)
    if ac is not None:  # as torch's SDPA under autocast
        with disabled(q):
            return varlen_attention(cast(q, ac), cast(k, ac), cast(v, ac), cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale,
                                    alibi_slopes=alibi_slopes, window_size=window_size,
                                    attn_mask=cast(attn_mask, ac), backend=backend)
    _check_qkv(q, k, v, 3, "(total, H, D)", names=("q", "k", "v"))
    _check_kv_heads(q.shape[1], k.shape[1], True, "q", "k", "(total, H, D)")
    host = host_checks_allowed(q.device)
    cq = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, values=host)
    ck = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, values=host)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} entries but cu_seqlens_k has "
                         f"{cu_seqlens_k.numel()}; both must describe the same batch")
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = check_int("max_seqlen_k", max_seqlen_k)
    if host:
        longest_q = max(b - a for a, b in zip(cq, cq[1:]))
        longest_k = max(b - a for a, b in zip(ck, ck[1:]))
        if longest_q > max_seqlen_q:
            raise ValueError(f"max_seqlen_q = {max_seqlen_q} but a query sequence has {longest_q} tokens")
        if longest_k > max_seqlen_k:
            raise ValueError(f"max_seqlen_k = {max_seqlen_k} but a key sequence has {longest_k} tokens")
    _check_alibi(alibi_slopes, q, cu_seqlens_q.numel() - 1, q.shape[1], "N")
    check_attn_mask(attn_mask, q, (cu_seqlens_q.numel() - 1, q.shape[1], max_seqlen_q, max_seqlen_k))
    window_size = check_window_size(window_size)
    dropout_p = check_dropout(dropout_p)
    is_causal = check_bool("is_causal", is_causal)
    scale = check_scale(scale)
    # the kernels read the offsets as a dense array (a strided view would be read wrong)
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    impl = select("varlen_attention", backend, q.device, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q,
                  cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                  dropout_p=dropout_p, is_causal=is_causal, scale=scale, alibi_slopes=alibi_slopes,
                  window_size=window_size, attn_mask=attn_mask)
    return impl.fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   is_causal, scale, alibi_slopes, window_size, attn_mask)


@register("scaled_dot_product_attention", "torch")
def _sdpa_torch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                alibi_slopes, window_size):
    return reference.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                                  is_causal, scale, enable_gqa,
                                                  alibi_slopes=alibi_slopes,
                                                  window_size=window_size)


def _pad_packed(x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tuple[Tensor, Tensor]:
    """Packed (total, H, D) -> padded (N, H, max_seqlen, D) with zeros past each sequence, and the
    (N, max_seqlen) bool of real positions. No host read of cu_seqlens and no branch on a size
    (torch.compile keeps one graph, sizes read from tensors included); positions past a sequence
    read an appended zero row, not another sequence's rows, so no inf / NaN of theirs leaks in
    and no gradient flows to them."""
    starts, lens = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    pos = torch.arange(max_seqlen, device=x.device)
    real = pos[None, :] < lens[:, None]                                    # (N, L)
    rows = torch.where(real, starts[:, None] + pos[None, :], x.shape[0])   # past the end: the zero row
    padded = torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))])[rows]  # (N, L, H, D)
    return padded.transpose(1, 2), real


def _at_least(n, low: int):
    """max(n, low) for an int or a symbolic size (without a branch on the symbol's value)."""
    return torch.sym_max(n, low) if isinstance(n, torch.SymInt) else max(n, low)


@register("varlen_attention", "torch")
def _varlen_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                  is_causal, scale, alibi_slopes, window_size, attn_mask):
    """Padded to (N, H, max_seqlen, D), dense attention with the keys past each sequence masked,
    unpadded again: one graph under torch.compile. In eager mode, lengths so uneven that padding
    would more than double the scores' memory run reference.varlen_attention instead (a loop over
    the sequences, read on the host; also the definition both are checked against)."""
    n = cu_seqlens_q.numel() - 1
    host = host_checks_allowed(q.device)
    if host and n > 0:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        lq = [b - a for a, b in zip(cq, cq[1:])]
        lk = [b - a for a, b in zip(ck, ck[1:])]
        max_seqlen_q, max_seqlen_k = max(lq), max(lk)  # the real ones: no larger padding than needed
        if n * max_seqlen_q * max_seqlen_k > 2 * sum(a * b for a, b in zip(lq, lk)) + 4096:
            return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                              max_seqlen_k, dropout_p, is_causal, scale,
                                              alibi_slopes=alibi_slopes, window_size=window_size,
                                              attn_mask=attn_mask)
        if attn_mask is not None:  # read at positions < the real maxima only
            attn_mask = attn_mask[..., :max_seqlen_q, :max_seqlen_k]
    if n == 0 or (host and (q.shape[0] == 0 or k.shape[0] == 0 or max_seqlen_q == 0 or max_seqlen_k == 0)):
        extra = [attn_mask] if attn_mask is not None and attn_mask.is_floating_point() else []
        return reference.zeros_in_graph((q.shape[0], q.shape[1], v.shape[-1]), *extra, q, k, v)
    if not host:  # sizes may come from tensors (unpad_input's): no branch on their values, and
        # none that Inductor's matmul lowering must take (is the size 1?); a padded position past
        # every sequence is masked (keys) or dropped (queries) anyway
        max_seqlen_q, max_seqlen_k = _at_least(max_seqlen_q, 2), _at_least(max_seqlen_k, 2)
    qp, _ = _pad_packed(q, cu_seqlens_q, max_seqlen_q)
    kp, real_k = _pad_packed(k, cu_seqlens_k, max_seqlen_k)
    vp, _ = _pad_packed(v, cu_seqlens_k, max_seqlen_k)
    keys = real_k[:, None, None, :]                                        # (N, 1, 1, Lk)
    if attn_mask is None:
        mask = keys
    else:
        m4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        mask = m4 & keys if m4.dtype == torch.bool else torch.where(keys, m4, float("-inf"))
    out = reference.scaled_dot_product_attention(qp, kp, vp, mask, dropout_p, is_causal, scale,
                                                 enable_gqa=True, alibi_slopes=alibi_slopes,
                                                 window_size=window_size)  # (N, H, Lq, Dv)
    # Packed row r lies in sequence seq[r] (the number of sequence ends <= r), at position t[r].
    rows = torch.arange(q.shape[0], device=q.device)
    seq = torch.searchsorted(cu_seqlens_q[1:].long(), rows, right=True)
    t = rows - cu_seqlens_q.long()[seq]
    return out.transpose(1, 2)[seq, t]                                     # (total_q, H, Dv)


# ----------------------------------------------------------------------------------------------
# Triton backend (kernels/attention.py): torch.library custom ops with fake impls and autograd,
# so that torch.compile(fullgraph=True) treats each pass as one opaque op.
# ----------------------------------------------------------------------------------------------
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MIN_HEAD_DIM, _TRITON_MAX_HEAD_DIM = 16, 256


def _triton_attention_arch_reasons(device: torch.device) -> list:
    """The Triton attention kernels' tiles are made for sm_80 and newer (tensor-core tl.dot, the
    shared memory of an A100-class SM): older GPUs (sm_75, T4) would fail to launch their backward
    kernels (81 KB of shared memory against 64 KB) and run tl.dot without tensor cores."""
    if device.type != "cuda":
        return []
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return [f"compute capability {major}.{minor}: the Triton attention kernels need 8.0 or "
                "newer (sm_80+)"]
    return []


def _triton_attention_reasons(query: Tensor, value: Tensor) -> list:
    """What the Triton attention kernels cannot do, common to the dense and varlen ops."""
    from ..backends import interpreter_enabled

    reasons = []
    if query.dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {query.dtype} is not supported by the Triton attention kernels "
                       "(float16, bfloat16, float32)")
    elif query.dtype == torch.bfloat16 and query.device.type == "cpu" and interpreter_enabled():
        reasons.append("bfloat16 is refused under the Triton interpreter (TRITON_INTERPRET=1): its "
                       "tl.dot gives wrong results for bfloat16; use a GPU or float16/float32")
    reasons += _triton_attention_arch_reasons(query.device)
    for name, d in (("head dim D", query.shape[-1]), ("value head dim Dv", value.shape[-1])):
        if d % 8 != 0 or not _TRITON_MIN_HEAD_DIM <= d <= _TRITON_MAX_HEAD_DIM:
            reasons.append(f"{name} = {d}: the Triton attention kernels need a multiple of 8 in "
                           f"[{_TRITON_MIN_HEAD_DIM}, {_TRITON_MAX_HEAD_DIM}]")
    return reasons


# The kernels address each (batch, head, sequence) slice from a 64-bit base with 32-bit offsets
# inside it (64-bit offsets that change inside the key loop make ptxas serialise the sm90 wgmma
# pipeline); a slice must therefore span fewer than 2^31 elements.
_INT32_SPAN = 2 ** 31


def _span(t: Tensor, dims) -> int:
    """Largest element offset reachable inside ``t`` along ``dims``."""
    return sum((t.shape[d] - 1) * abs(t.stride(d)) for d in dims)


def _span_reasons(named_spans) -> list:
    reasons = []
    for name, span in named_spans:
        if torch.compiler.is_compiling():
            # traced, maybe with a size only known at run time (e.g. a packed length read from a
            # tensor): unless it is known too large, the Triton kernels are kept and the limit
            # becomes a run-time check
            from torch.fx.experimental.symbolic_shapes import guard_or_false
            if not guard_or_false(span >= _INT32_SPAN):
                torch._check(span < _INT32_SPAN)  # no message: torch 2.11's Dynamo cannot trace one
                continue
        if span >= _INT32_SPAN:
            reasons.append(f"{name} spans {span} elements within one (batch, head) slice; the "
                           "Triton attention kernels use 32-bit offsets inside a slice (limit 2^31)")
    return reasons


def _sdpa_triton_reasons(*, query, key, value, attn_mask=None, scale=None, **_) -> list:
    # Any mask dtype the public op accepts (bool, float16/bfloat16/float32/float64) is read as is.
    reasons = _triton_attention_reasons(query, value) + triton_scale_reasons(scale)
    b, h, lq, _ = query.shape
    lk = key.shape[2]
    spans = [("query", _span(query, (2, 3))), ("key", _span(key, (2, 3))),
             ("value", _span(value, (2, 3))), ("the output", lq * h * value.shape[-1])]
    if attn_mask is not None:  # broadcast dims are read with stride 0; a dim of unknown size
        # (traced) counts as above 1: its stride then counts in the span, an over-estimate at worst
        m_lq, m_lk = (attn_mask.shape[-2] if attn_mask.dim() > 1 else 1), attn_mask.shape[-1]
        m_sq = attn_mask.stride(-2) if attn_mask.dim() > 1 and unless_known_false(m_lq > 1) else 0
        m_sk = attn_mask.stride(-1) if unless_known_false(m_lk > 1) else 0
        spans.append(("attn_mask", (lq - 1) * abs(m_sq) + (lk - 1) * abs(m_sk)))
    return reasons + _span_reasons(spans)


def _varlen_triton_reasons(*, q, k, v, max_seqlen_q, max_seqlen_k, attn_mask=None, scale=None,
                           **_) -> list:
    reasons = _triton_attention_reasons(q, v) + triton_scale_reasons(scale)
    spans = [("q", max_seqlen_q * abs(q.stride(0)) + _span(q, (2,))),
             ("k", max_seqlen_k * abs(k.stride(0)) + _span(k, (2,))),
             ("v", max_seqlen_k * abs(v.stride(0)) + _span(v, (2,))),
             ("the output", max_seqlen_q * q.shape[1] * v.shape[-1])]
    if attn_mask is not None:  # one (sequence, head) slice of it, broadcast dims at stride 0
        m = attn_mask
        m_sq = m.stride(-2) if m.dim() > 1 and unless_known_false(m.shape[-2] > 1) else 0
        m_sk = m.stride(-1) if unless_known_false(m.shape[-1] > 1) else 0
        spans.append(("attn_mask", (max_seqlen_q - 1) * abs(m_sq) + (max_seqlen_k - 1) * abs(m_sk)))
    return reasons + _span_reasons(spans)


def _default_scale(scale: Optional[float], head_dim: int) -> float:
    return 1.0 / head_dim ** 0.5 if scale is None else float(scale)


@custom_op("fastbert::attention_fwd", seeded=True)
def _attention_fwd_op(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                      dropout_p: float, is_causal: bool, scale: float,
                      alibi_slopes: Optional[Tensor] = None, window_left: int = -1,
                      window_right: int = -1) -> Tuple[Tensor, Tensor, Tensor]:
    """-> out (B, H, Lq, Dv), softmax stats (2 * B * H * Lq,) fp32, dropout seed: int64 (1,) on
    query's device, drawn there (see fastbert._rng), or (0,) without dropout."""
    from ..kernels.attention import attention_fwd

    seed = dropout_seed(dropout_p, query.device)
    out, stats = attention_fwd(query, key, value, attn_mask, dropout_p, is_causal, scale, seed,
                               alibi_slopes, _window(window_left, window_right))
    return out, stats, seed


@_attention_fwd_op.register_fake
def _attention_fwd_fake(query, key, value, attn_mask, dropout_p, is_causal, scale,
                        alibi_slopes=None, window_left=-1, window_right=-1):
    from ..kernels.attention import attention_out_layout

    b, h, lq, _ = query.shape
    out = attention_out_layout(query, (b, h, lq, value.shape[-1]))
    stats = query.new_empty((2 * b * h * lq,), dtype=torch.float32)
    return out, stats, seed_like(dropout_p, query.device)


@custom_op("fastbert::attention_bwd")
def _attention_bwd_op(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                      stats: Tensor, seed: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
                      is_causal: bool, scale: float, mask_grad: bool,
                      alibi_slopes: Optional[Tensor] = None, window_left: int = -1,
                      window_right: int = -1) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dq, dk, dv, dmask (the float mask's gradient in its shape, or an empty tensor)."""
    from ..kernels.attention import attention_bwd

    dq, dk, dv, dmask = attention_bwd(grad_out, query, key, value, out, stats, attn_mask,
                                      dropout_p, is_causal, scale, seed, mask_grad, alibi_slopes,
                                      _window(window_left, window_right))
    if dmask is None:
        dmask = query.new_zeros((0,))
    return dq, dk, dv, dmask


@_attention_bwd_op.register_fake
def _attention_bwd_fake(grad_out, query, key, value, out, stats, seed, attn_mask, dropout_p,
                        is_causal, scale, mask_grad, alibi_slopes=None, window_left=-1,
                        window_right=-1):
    from ..kernels.attention import attention_out_layout

    b, h, lq, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[-1]
    if mask_grad and attn_mask is not None and attn_mask.is_floating_point():
        dmask = attn_mask.new_empty(attn_mask.shape)
    else:
        dmask = query.new_empty((0,))
    return (attention_out_layout(query, (b, h, lq, d)), attention_out_layout(key, (b, hkv, lk, d)),
            attention_out_layout(value, (b, hkv, lk, dv)), dmask)


def _attention_setup_context(ctx, inputs, output):
    (query, key, value, attn_mask, dropout_p, is_causal, scale, alibi_slopes, window_left,
     window_right) = inputs
    out, stats, seed = output
    ctx.save_for_backward(query, key, value, attn_mask, out, stats, seed, alibi_slopes)
    ctx.mark_non_differentiable(stats, seed)
    ctx.set_materialize_grads(False)  # no zero gradients for them (marking them does not stop it)
    ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale
    ctx.window = (window_left, window_right)


def _attention_backward(ctx, grad_out, grad_stats, grad_seed):
    if grad_out is None:  # only the statistics were used
        return (None,) * len(ctx.needs_input_grad)
    query, key, value, attn_mask, out, stats, seed, alibi_slopes = ctx.saved_tensors
    mask_grad = (attn_mask is not None and attn_mask.is_floating_point()
                 and ctx.needs_input_grad[3])
    dq, dk, dv, dmask = _attention_bwd_op(grad_out.to(out.dtype), query, key, value, out, stats,
                                          seed, attn_mask, ctx.dropout_p, ctx.is_causal,
                                          ctx.scale, mask_grad, alibi_slopes, *ctx.window)
    return dq, dk, dv, (dmask if mask_grad else None), None, None, None, None, None, None


_attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


@register("scaled_dot_product_attention", "triton", reasons=_sdpa_triton_reasons)
def _sdpa_triton(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                 alibi_slopes, window_size):
    # GQA needs nothing more: the kernels read key / value head h // (H / Hkv) from the shapes.
    out, _, _ = _attention_fwd_op(query, key, value, _savable(attn_mask), dropout_p, is_causal,
                                  _default_scale(scale, query.shape[-1]), _savable(alibi_slopes),
                                  *(window_size or (-1, -1)))
    return out


@custom_op("fastbert::varlen_attention_fwd", seeded=True)
def _varlen_attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                             cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                             dropout_p: float, is_causal: bool, scale: float,
                             alibi_slopes: Optional[Tensor] = None, window_left: int = -1,
                             window_right: int = -1, attn_mask: Optional[Tensor] = None
                             ) -> Tuple[Tensor, Tensor, Tensor]:
    """-> out (total_q, H, Dv), softmax stats (2 * H * total_q,) fp32, dropout seed (as in
    fastbert::attention_fwd, on q's device)."""
    from ..kernels.attention import varlen_attention_fwd

    seed = dropout_seed(dropout_p, q.device)
    out, stats = varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, dropout_p, is_causal, scale, seed,
                                      alibi_slopes, _window(window_left, window_right), attn_mask)
    return out, stats, seed


@_varlen_attention_fwd_op.register_fake
def _varlen_attention_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p, is_causal, scale, alibi_slopes=None, window_left=-1,
                               window_right=-1, attn_mask=None):
    total_q, h, _ = q.shape
    return (q.new_empty((total_q, h, v.shape[-1])),
            q.new_empty((2 * h * total_q,), dtype=torch.float32),
            seed_like(dropout_p, q.device))


@custom_op("fastbert::varlen_attention_bwd")
def _varlen_attention_bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                             stats: Tensor, seed: Tensor, cu_seqlens_q: Tensor,
                             cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                             dropout_p: float, is_causal: bool, scale: float,
                             alibi_slopes: Optional[Tensor] = None, window_left: int = -1,
                             window_right: int = -1, attn_mask: Optional[Tensor] = None,
                             mask_grad: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dq, dk, dv (packed), dmask (the float mask's gradient in its shape, or an empty tensor)."""
    from ..kernels.attention import varlen_attention_bwd

    dq, dk, dv, dmask = varlen_attention_bwd(grad_out, q, k, v, out, stats, cu_seqlens_q,
                                             cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                             is_causal, scale, seed, alibi_slopes,
                                             _window(window_left, window_right), attn_mask,
                                             mask_grad)
    if dmask is None:
        dmask = q.new_zeros((0,))
    return dq, dk, dv, dmask


@_varlen_attention_bwd_op.register_fake
def _varlen_attention_bwd_fake(grad_out, q, k, v, out, stats, seed, cu_seqlens_q, cu_seqlens_k,
                               max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale,
                               alibi_slopes=None, window_left=-1, window_right=-1, attn_mask=None,
                               mask_grad=False):
    if mask_grad and attn_mask is not None and attn_mask.is_floating_point():
        dmask = attn_mask.new_empty(attn_mask.shape)
    else:
        dmask = q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _varlen_attention_setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal,
     scale, alibi_slopes, window_left, window_right, attn_mask) = inputs
    out, stats, seed = output
    ctx.save_for_backward(q, k, v, out, stats, seed, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                          attn_mask)
    ctx.mark_non_differentiable(stats, seed)
    ctx.set_materialize_grads(False)
    ctx.args = (max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale)
    ctx.window = (window_left, window_right)


def _varlen_attention_backward(ctx, grad_out, grad_stats, grad_seed):
    if grad_out is None:
        return (None,) * len(ctx.needs_input_grad)
    q, k, v, out, stats, seed, cu_seqlens_q, cu_seqlens_k, alibi_slopes, attn_mask = ctx.saved_tensors
    mask_grad = (attn_mask is not None and attn_mask.is_floating_point()
                 and ctx.needs_input_grad[13])
    dq, dk, dv, dmask = _varlen_attention_bwd_op(grad_out.to(out.dtype), q, k, v, out, stats, seed,
                                                 cu_seqlens_q, cu_seqlens_k, *ctx.args, alibi_slopes,
                                                 *ctx.window, attn_mask, mask_grad)
    return (dq, dk, dv, None, None, None, None, None, None, None, None, None, None,
            dmask if mask_grad else None)


_varlen_attention_fwd_op.register_autograd(
    _varlen_attention_backward, setup_context=_varlen_attention_setup_context)


def _savable(index: Optional[Tensor]) -> Optional[Tensor]:
    """A tensor the backward reads but never differentiates (offsets, a layout, a bool mask,
    ALiBi slopes) made under torch.inference_mode (by a data pipeline, say) cannot be saved for a
    backward pass; torch and the torch backend take it, so the ops save a normal copy instead."""
    if (index is not None and not torch.compiler.is_compiling() and index.is_inference()
            and not torch.is_inference_mode_enabled() and torch.is_grad_enabled()):
        return index.clone()
    return index


@register("varlen_attention", "triton", reasons=_varlen_triton_reasons)
def _varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   is_causal, scale, alibi_slopes, window_size, attn_mask):
    cu_seqlens_q, cu_seqlens_k = _savable(cu_seqlens_q), _savable(cu_seqlens_k)
    out, _, _ = _varlen_attention_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                         max_seqlen_k, dropout_p, is_causal,
                                         _default_scale(scale, q.shape[-1]), _savable(alibi_slopes),
                                         *(window_size or (-1, -1)), _savable(attn_mask))
    return out


# ----------------------------------------------------------------------------------------------
# CUDA backend (csrc/attention, extension fastbert._C), for scaled_dot_product_attention:
#   * with gradients, dropout, float masks or any head dim: the unfused path, cuBLAS GEMMs (through
#     torch) around a fused scale + mask + softmax (+ dropout) kernel and its fused backward
#     (torch.ops.fastbert_cuda.attention_fwd / attention_bwd);
#   * inference (no gradient needed) without dropout, fp16 / bf16, head dim 64 or 128, at most 512
#     keys, any mask: the fused tensor-core forward (fused_attention_fwd, which itself
#     falls back to the unfused path where the device lacks the shared memory).
# and for varlen_attention, inference only: the same fused kernel over packed sequences
# (fused_varlen_attention_fwd; ByteTransformer's padding-free fused MHA).
# Fakes and autograd are registered when the extension is first used (it is loaded lazily, at
# trace time under torch.compile: see fastbert.backends.cuda_ops). Dropout: the C++ forward draws its seed on the
# device from that device's default CUDA generator (as fastbert._rng does: graph-safe, reproduced
# by torch.manual_seed, never read on the host) and returns it as an int64 [1] CUDA tensor, which
# backward takes.
# ----------------------------------------------------------------------------------------------
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CUDA_FUSED_HEAD_DIMS = (64, 128)
_CUDA_FUSED_MAX_KEYS = 512


def _sdpa_cuda_reasons(*, query, **_) -> list:
    # Every mask kind (bool / float, any broadcast, float masks that require grad), causal,
    # dropout, Lq != Lk and any head dims are served by the unfused path.
    if query.dtype not in _CUDA_DTYPES:
        return [f"query dtype {query.dtype} is not supported by the CUDA kernels "
                "(float16, bfloat16, float32)"]
    return []


def _cuda_fused_eligible(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                         dropout_p: float) -> bool:
    """True when the fused tensor-core forward serves this call: no gradient needed, no dropout,
    fp16 / bf16, head dim 64 or 128 (value's equal), at most 512 keys; any mask (bool, or float
    added to the scores: a relative-position or ALiBi bias, an "eager" padding mask)."""
    tensors = (query, key, value) + ((attn_mask,) if attn_mask is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return (dropout_p == 0.0 and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[-1] in _CUDA_FUSED_HEAD_DIMS and value.shape[-1] == query.shape[-1]
            and 1 <= key.shape[-2] <= _CUDA_FUSED_MAX_KEYS)


def _cuda_ops():
    """torch.ops.fastbert_cuda, with the extension loaded and this family's fakes / autograd registered."""
    return cuda_ops("attention")


def _register_cuda_ops(namespace: str = "fastbert_cuda") -> None:
    # `namespace`: also "fastbert_emu", the CPU-emulated build of the same kernels (tests/cuda_emu).
    lib = namespace + "::"
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(lib + "attention_fwd")
    def _(query, key, value, attn_mask, dropout_p, is_causal, scale):
        b, h, lq, _ = query.shape
        seed = seed_like(dropout_p, query.device)
        return query.new_empty((b, h, lq, value.shape[3])), query.new_empty((b, h, lq, key.shape[2])), seed

    @torch.library.register_fake(lib + "attention_bwd")
    def _(grad_out, query, key, value, probs, seed, dropout_p, scale):
        return (query.new_empty(query.shape), query.new_empty(key.shape), query.new_empty(value.shape),
                query.new_empty(probs.shape))

    @torch.library.register_fake(lib + "fused_attention_fwd")
    def _(query, key, value, attn_mask, is_causal, scale):
        return query.new_empty(query.shape[:3] + value.shape[3:])

    @torch.library.register_fake(lib + "fused_varlen_attention_fwd")
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale):
        return q.new_empty(q.shape)

    def setup(ctx, inputs, output):
        query, key, value, attn_mask, dropout_p, _is_causal, scale = inputs
        _, probs, seed = output
        ctx.save_for_backward(query, key, value, probs, seed)  # P: the dropout mask is regenerated
        ctx.dropout_p = dropout_p
        ctx.scale = scale
        float_mask = attn_mask is not None and attn_mask.is_floating_point()
        ctx.mask_shape = tuple(attn_mask.shape) if float_mask else None
        ctx.mask_dtype = attn_mask.dtype if float_mask else None
        ctx.mark_non_differentiable(probs, seed)
        ctx.set_materialize_grads(False)  # no (B, H, Lq, Lk) zero gradient for the probabilities

    def backward(ctx, grad_out, _grad_probs, _grad_seed):
        if grad_out is None:
            return (None,) * len(ctx.needs_input_grad)
        query, key, value, probs, seed = ctx.saved_tensors
        dq, dk, dv, ds = ops.attention_bwd(grad_out, query, key, value, probs, seed, ctx.dropout_p,
                                           ctx.scale)
        need = ctx.needs_input_grad
        dmask = None
        if need[3]:
            # ds = dL/d(logits) * scale, and a float mask is added to the logits. The broadcast
            # sum and the division by the scale run in fp32: rounding the sum to fp16/bf16 before
            # the division would add a second rounding error, amplified by 1 / scale.
            dmask = (ds.float().sum_to_size(ctx.mask_shape) / ctx.scale).to(ctx.mask_dtype)
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, dmask,
                None, None, None)

    torch.library.register_autograd(lib + "attention_fwd",
                                    first_order_only(lib + "attention_fwd", backward), setup_context=setup)


register_cuda_family("attention", _register_cuda_ops)


@register("scaled_dot_product_attention", "cuda", reasons=_sdpa_cuda_reasons)
def _sdpa_cuda(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
               alibi_slopes, window_size):
    if window_size is not None:  # the window as a (Lq, Lk) bool mask merged into attn_mask
        attn_mask = reference.with_window(attn_mask, window_size, query.shape[2], key.shape[2],
                                          query.device)
    if alibi_slopes is not None:
        # ALiBi as a float bias added to the mask (materialised, (B or 1, H, Lq, Lk)); a float
        # mask that requires grad still gets its gradient through the sum.
        attn_mask = reference.with_alibi(attn_mask, alibi_slopes, query.shape[2], key.shape[2],
                                         torch.float32)
    if key.shape[1] != query.shape[1]:
        # GQA: the CUDA kernels take one key / value head per query head; the repeated copies'
        # gradients sum back through autograd.
        key, value = reference.repeat_kv_heads(key, value, query.shape[1], dim=1)
    ops = _cuda_ops()
    scale = _default_scale(scale, query.shape[-1])
    if _cuda_fused_eligible(query, key, value, attn_mask, dropout_p):
        return ops.fused_attention_fwd(query, key, value, attn_mask, is_causal, scale)
    out, _, _ = ops.attention_fwd(query, key, value, attn_mask, dropout_p, is_causal, scale)
    return out


def _fused_smem_bytes(head_dim: int, k_len: int) -> int:
    """Shared memory of the fused kernel's block (csrc/attention/fused_mha_fwd.cu, Layout::bytes):
    the query tile and one K / V chunk (64 rows of D + 8 16-bit values each) and the fp32 scores
    of 64 rows of Lk rounded up to 64, + 4."""
    return 2 * 64 * (head_dim + 8) * 2 + 64 * (-(-k_len // 64) * 64 + 4) * 4


@constant_result
def _cuda_fused_device_problem(device_index: int, head_dim: int, k_len: int) -> str:
    # The fused kernel's device needs (as the binding's fused_reason): constant-folded under
    # torch.compile.
    props = torch.cuda.get_device_properties(device_index)
    if props.major < 8:
        return (f"the fused kernel needs compute capability 8.0 or newer; {props.name} is "
                f"{props.major}.{props.minor}")
    need, have = _fused_smem_bytes(head_dim, k_len), props.shared_memory_per_block_optin
    if need > have:
        return (f"the fused kernel needs {need} bytes of shared memory per block for head dim "
                f"{head_dim} and {k_len} keys; {props.name} allows {have}")
    return ""


def _varlen_cuda_reasons(*, q, k, v, max_seqlen_q, max_seqlen_k, dropout_p=0.0, alibi_slopes=None,
                         window_size=None, cu_seqlens_q=None, attn_mask=None, **_) -> list:
    reasons = []
    if attn_mask is not None:
        reasons.append("attn_mask: the CUDA varlen kernel takes no mask (the Triton one does)")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        reasons.append("the CUDA varlen kernel is an inference forward (no autograd); gradients "
                       "need the Triton backend (or torch.no_grad())")
    if dropout_p > 0.0:
        reasons.append("dropout: the CUDA varlen kernel is an inference forward")
    if alibi_slopes is not None or window_size is not None:
        reasons.append("ALiBi and sliding windows are not supported by the CUDA varlen kernel")
    if q.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {q.dtype}: the CUDA varlen kernel takes float16 / bfloat16")
    d = q.shape[-1]
    if d not in _CUDA_FUSED_HEAD_DIMS or v.shape[-1] != d:
        reasons.append(f"head dims D = {d}, Dv = {v.shape[-1]}: the CUDA varlen kernel needs "
                       "D = Dv in (64, 128)")
    if k.shape[1] != q.shape[1]:
        reasons.append("grouped-query attention (fewer K/V heads) is not supported by the CUDA "
                       "varlen kernel")
    if not 1 <= max_seqlen_k <= _CUDA_FUSED_MAX_KEYS:
        reasons.append(f"max_seqlen_k = {max_seqlen_k}: the CUDA varlen kernel takes 1 to "
                       f"{_CUDA_FUSED_MAX_KEYS} keys per sequence")
    if cu_seqlens_q is not None and cu_seqlens_q.numel() - 1 > 65535:
        reasons.append("more than 65535 sequences (the kernel's grid)")
    if q.shape[1] > 65535:
        reasons.append(f"{q.shape[1]} heads: the CUDA varlen kernel's grid takes at most 65535")
    if not reasons and q.device.type == "cuda":
        problem = _cuda_fused_device_problem(q.device.index if q.device.index is not None
                                             else torch.cuda.current_device(), d, max_seqlen_k)
        if problem:
            reasons.append(problem)
    return reasons


@register("varlen_attention", "cuda", reasons=_varlen_cuda_reasons)
def _varlen_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                 is_causal, scale, alibi_slopes, window_size, attn_mask):
    # the kernel reads int32 offsets; int64 ones (accepted by the op) are narrowed here (a packed
    # batch of 2^31 tokens would not fit in a GPU's memory)
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
    return _cuda_ops().fused_varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                  max_seqlen_k, is_causal,
                                                  _default_scale(scale, q.shape[-1]))
