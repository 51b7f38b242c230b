"""Block-sparse attention: public function, checks and dispatch (op ``"block_sparse_attention"``)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _rng, reference
from .._validation import (check_attn_mask, check_dropout, check_int, check_scale,
                           check_tensor, triton_scale_reasons)
from .._autocast import autocast_dtype, cast, disabled
from .._library import custom_op
from ..backends import interpreter_enabled, register, select
from .attention import _check_qkv, _savable, _triton_attention_arch_reasons

__all__ = ["block_sparse_attention"]

_MAX_BLOCK_SIZE = 2 ** 31 - 1  # token indices are int64: a larger block size would overflow them


def check_block_size(block_size) -> int:
    """``block_size``: an int in [1, 2**31 - 1] (TypeError / ValueError naming it otherwise)."""
    block_size = check_int("block_size", block_size, minimum=1)
    if isinstance(block_size, int) and block_size > _MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be <= {_MAX_BLOCK_SIZE} (one block covers any longer "
                         f"sequence), got {block_size}")
    return block_size


def _check_layout(layout, h: int, nbq: int, nbk: int) -> None:
    check_tensor("layout", layout, ndim=(3,), floating=False)
    if layout.is_floating_point() or layout.is_complex():
        raise TypeError(f"layout must be a bool (or integer, nonzero = attend) tensor, got dtype "
                        f"{layout.dtype}")
    if layout.shape[0] not in (1, h) or tuple(layout.shape[1:]) != (nbq, nbk):
        raise ValueError(f"layout must have shape (H or 1, ceil(Lq/block_size), ceil(Lk/block_size)) "
                         f"= ({h} or 1, {nbq}, {nbk}), got {tuple(layout.shape)}")


def block_sparse_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: Tensor,
    block_size: int = 64,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Attention restricted to the blocks of a layout.

    Args:
        query: (B, H, Lq, D); key: (B, H, Lk, D); value: (B, H, Lk, Dv).
        layout: bool (H or 1, ceil(Lq / block_size), ceil(Lk / block_size)); query block i sees key
            block j iff ``layout[h, i, j]`` (an integer layout: iff it is nonzero). Build one with
            :mod:`fastbert.sparsity`.
        block_size: tokens per block side. Lq and Lk need not be multiples of it.
        attn_mask: optional SDPA-style mask (e.g. key padding), combined with the layout.
        dropout_p, scale, backend: as in :func:`fastbert.scaled_dot_product_attention`.

    Returns:
        (B, H, Lq, Dv). A query row that sees no key returns 0.

    The Triton kernels never read the blocks a layout skips; the torch backend computes densely, so
    a NaN or inf in ``key`` / ``value`` there reaches the rows of its batch and head (0 * NaN, as in
    :func:`fastbert.scaled_dot_product_attention`): zero such positions first if they can occur.

    The Triton backend walks, for each query block, only its listed key blocks (work proportional
    to the layout's density); it serves float16/bfloat16/float32, block sizes 16/32/64/128, head
    dims that are multiples of 8 up to 256, any strides, bool or float masks (a float mask that
    requires grad gets its gradient, zero in the blocks the layout skips; the backward needs an
    fp32 scratch of the mask's batch and head extents times (Lq, Lk)) and dropout. The layout's
    preparation is cached per layout tensor (:func:`fastbert.sparsity.prepare_layout`): keep the
    layout (e.g. as a module buffer) rather than rebuilding it every call. Under ``torch.autocast``,
    floating query, key, value and attn_mask are cast to the autocast dtype (as for SDPA).
    """
    ac = autocast_dtype(query)
    if ac is not None:
        with disabled(query):
            return block_sparse_attention(cast(query, ac), cast(key, ac), cast(value, ac), layout,
                                          block_size, cast(attn_mask, ac), dropout_p, scale,
                                          backend=backend)
    _check_qkv(query, key, value, 4, "(B, H, L, D)")
    if key.shape[:2] != query.shape[:2]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must have the same "
                         "batch and head dims (B, H, L, D)")
    block_size = check_block_size(block_size)
    b, h, lq, _ = query.shape
    lk = key.shape[2]
    _check_layout(layout, h, -(-lq // block_size), -(-lk // block_size))
    if layout.device != query.device:
        raise ValueError(f"layout is on {layout.device} but query is on {query.device}")
    check_attn_mask(attn_mask, query, (b, h, lq, lk))
    dropout_p = check_dropout(dropout_p)
    scale = check_scale(scale)
    if lq == 0 or lk == 0 or b == 0 or h == 0:
        # Nothing to attend to (as in scaled_dot_product_attention): every row returns 0.
        extra = [attn_mask] if attn_mask is not None and attn_mask.is_floating_point() else []
        return reference.zeros_in_graph((b, h, lq, value.shape[-1]), *extra, query, key, value)
    impl = select("block_sparse_attention", backend, query.device, query=query, key=key,
                  value=value, layout=layout, block_size=block_size, attn_mask=attn_mask,
                  dropout_p=dropout_p, scale=scale)
    return impl.fn(query, key, value, layout, block_size, attn_mask, dropout_p, scale)


@register("block_sparse_attention", "torch")
def _block_sparse_torch(query, key, value, layout, block_size, attn_mask, dropout_p, scale):
    return reference.block_sparse_attention(query, key, value, layout, block_size, attn_mask,
                                            dropout_p, scale)


# ----------------------------------------------------------------------------------------------
# Triton backend: kernels/block_sparse_attention.py, registered as torch ops so that autograd and
# torch.compile(fullgraph=True) see one opaque op per pass.
# ----------------------------------------------------------------------------------------------
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_BLOCK_SIZES = (16, 32, 64, 128)  # = fastbert.kernels.block_sparse_attention.BLOCK_SIZES


def _triton_reasons(*, query, key, value, layout, block_size, attn_mask, dropout_p, scale, **_):
    reasons = []
    if query.dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {query.dtype} is not supported by the Triton kernel "
                       "(float16, bfloat16, float32)")
    elif query.dtype == torch.bfloat16 and query.device.type == "cpu" and interpreter_enabled():
        reasons.append("bfloat16 is refused under the Triton interpreter (TRITON_INTERPRET=1): its "
                       "tl.dot gives wrong results for bfloat16; use a GPU or float16/float32")
    reasons += _triton_attention_arch_reasons(query.device) + triton_scale_reasons(scale)
    if block_size not in _TRITON_BLOCK_SIZES:
        reasons.append(f"block_size {block_size} is not supported by the Triton kernel "
                       f"(one of {_TRITON_BLOCK_SIZES})")
    for name, d in (("query/key", query.shape[-1]), ("value", value.shape[-1])):
        if d < 8 or d > 256 or d % 8:
            reasons.append(f"{name} head dim {d} is not supported by the Triton kernel "
                           "(a multiple of 8, from 8 to 256)")
    b, h, lq = query.shape[:3]
    programs = b * h * -(-max(lq, key.shape[2]) // 16)  # at most, with the smallest 16-row tiles
    if programs > 2 ** 31 - 1:
        reasons.append(f"batch * heads * tiles = {programs} exceeds the Triton kernel's grid limit "
                       "of 2^31 - 1 programs")
    return reasons


@custom_op("fastbert::block_sparse_attention_fwd", seeded=True)
def _block_sparse_attention_fwd_op(query: Tensor, key: Tensor, value: Tensor, layout: Tensor,
                                   block_size: int, attn_mask: Optional[Tensor], dropout_p: float,
                                   scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (out (B, H, Lq, Dv), stats (B, H, 2, Lq) float32 (each row's max and log2 of its sum,
    base 2), seed: int64 on query's device, (1,)
    with dropout (drawn there, read only by the kernels: no host sync, fresh on every CUDA graph
    replay) or (0,) without)."""
    from .. import sparsity
    from ..kernels import block_sparse_attention as kern

    prep = sparsity.prepare_layout(layout)
    seed = _rng.dropout_seed(dropout_p, query.device)
    out, stats = kern.block_sparse_attention_fwd(query, key, value, prep.q_count, prep.q_index,
                                                 block_size, attn_mask, dropout_p, scale, seed)
    return out, stats, seed


@_block_sparse_attention_fwd_op.register_fake
def _(query, key, value, layout, block_size, attn_mask, dropout_p, scale):
    b, h, lq, _ = query.shape
    out = query.new_empty((b, h, lq, value.shape[-1]))
    stats = query.new_empty((b, h, 2, lq), dtype=torch.float32)
    return out, stats, _rng.seed_like(dropout_p, query.device)


@custom_op("fastbert::block_sparse_attention_bwd")
def _block_sparse_attention_bwd_op(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
                                   out: Tensor, stats: Tensor, seed: Tensor, layout: Tensor,
                                   block_size: int, attn_mask: Optional[Tensor], dropout_p: float,
                                   scale: float, mask_grad: bool
                                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv, dmask): dmask is the float attn_mask's gradient in its shape and dtype when
    ``mask_grad``, else an empty tensor."""
    from .. import sparsity
    from ..kernels import block_sparse_attention as kern

    prep = sparsity.prepare_layout(layout)
    dq, dk, dv, dmask = kern.block_sparse_attention_bwd(
        grad_out, query, key, value, out, stats, prep.q_count, prep.q_index, prep.k_count,
        prep.k_index, block_size, attn_mask, dropout_p, scale, seed, mask_grad, layout=prep.blocks)
    if dmask is None:
        dmask = query.new_empty((0,))
    return dq, dk, dv, dmask


def _wants_mask_grad(attn_mask: Optional[Tensor], mask_grad: bool) -> bool:
    return bool(mask_grad) and attn_mask is not None and attn_mask.is_floating_point()


@_block_sparse_attention_bwd_op.register_fake
def _(grad_out, query, key, value, out, stats, seed, layout, block_size, attn_mask, dropout_p,
      scale, mask_grad):
    dmask = (attn_mask.new_empty(attn_mask.shape) if _wants_mask_grad(attn_mask, mask_grad)
             else query.new_empty((0,)))
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
            dmask)


def _block_sparse_attention_setup_context(ctx, inputs, output):
    query, key, value, layout, block_size, attn_mask, dropout_p, scale = inputs
    out, stats, seed = output
    ctx.save_for_backward(query, key, value, out, stats, seed, layout, attn_mask)
    ctx.mark_non_differentiable(stats, seed)
    ctx.set_materialize_grads(False)  # no zero gradients for them (marking them does not stop it)
    ctx.block_size, ctx.dropout_p, ctx.scale = block_size, dropout_p, scale


def _block_sparse_attention_backward(ctx, grad_out, grad_stats, grad_seed):
    if grad_out is None:
        return (None,) * len(ctx.needs_input_grad)
    query, key, value, out, stats, seed, layout, attn_mask = ctx.saved_tensors
    mask_grad = _wants_mask_grad(attn_mask, ctx.needs_input_grad[5])
    dq, dk, dv, dmask = _block_sparse_attention_bwd_op(
        grad_out.to(out.dtype), query, key, value, out, stats, seed, layout, ctx.block_size,
        attn_mask, ctx.dropout_p, ctx.scale, mask_grad)
    return dq, dk, dv, None, None, (dmask if mask_grad else None), None, None


_block_sparse_attention_fwd_op.register_autograd(
    _block_sparse_attention_backward, setup_context=_block_sparse_attention_setup_context)


@register("block_sparse_attention", "triton", reasons=_triton_reasons)
def _block_sparse_triton(query, key, value, layout, block_size, attn_mask, dropout_p, scale):
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    # The layout goes in as given (bool or integers): a converted copy would be a new tensor
    # on every call, and miss sparsity.prepare_layout's per-tensor cache (an inference-mode
    # layout, never cached anyway, is copied to be saved for the backward).
    out, _, _ = _block_sparse_attention_fwd_op(query, key, value, _savable(layout), block_size,
                                               _savable(attn_mask), dropout_p, scale)
    return out
