"""Linformer low-rank attention: public function, checks and dispatch (op ``"linformer_attention"``)."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import reference
from .._autocast import autocast_dtype, cast, disabled
from .._validation import check_dropout, check_same, check_scale, check_tensor
from ..backends import register, select
from .attention import _check_qkv

__all__ = ["linformer_attention"]


def _check_proj(name: str, proj, h: int, lk: int, query: Tensor) -> None:
    check_tensor(name, proj, ndim=(2, 3))
    check_same("query", query, name, proj, dtype=False)
    if proj.shape[-1] != lk or (proj.dim() == 3 and proj.shape[0] not in (1, h)):
        raise ValueError(f"{name} must have shape (k, Lk) or (H, k, Lk) with Lk = {lk}, H = {h}; "
                         f"got {tuple(proj.shape)}")
    if proj.shape[-2] < 1:
        raise ValueError(f"{name} must project to k >= 1 rows, got shape {tuple(proj.shape)}")


def linformer_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    proj_k: Tensor,
    proj_v: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Linformer attention (Wang et al., 2020): attention over k learned projections of the keys.

    Args:
        query: (B, H, Lq, D); key: (B, H, Lk, D); value: (B, H, Lk, Dv).
        proj_k, proj_v: (k, Lk) shared by all heads, or (H, k, Lk) per head. Pass the same tensor for
            a shared key/value projection.
        key_padding_mask: optional bool (B, Lk), True marks padding (``nn.MultiheadAttention``'s
            convention); padded positions contribute nothing to the projections.
        dropout_p, scale, backend: as in :func:`fastbert.scaled_dot_product_attention`.

    Returns:
        (B, H, Lq, Dv): softmax(Q (E K)^T * scale) (F V), with E = proj_k, F = proj_v.

    Under ``torch.autocast``, floating query, key, value and the projections are cast to the
    autocast dtype (the projections are matmuls, the rest is SDPA).
    """
    ac = autocast_dtype(query)
    if ac is not None:
        pk = cast(proj_k, ac)
        pv = pk if proj_v is proj_k else cast(proj_v, ac)  # a shared projection stays shared
        with disabled(query):
            return linformer_attention(cast(query, ac), cast(key, ac), cast(value, ac), pk, pv,
                                       key_padding_mask, dropout_p, scale, backend=backend)
    _check_qkv(query, key, value, 4, "(B, H, L, D)")
    if key.shape[:2] != query.shape[:2]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must have the same "
                         "batch and head dims (B, H, L, D)")
    b, h, _, _ = query.shape
    lk = key.shape[2]
    _check_proj("proj_k", proj_k, h, lk, query)
    _check_proj("proj_v", proj_v, h, lk, query)
    if proj_k.shape[-2] != proj_v.shape[-2]:
        raise ValueError(f"proj_k {tuple(proj_k.shape)} and proj_v {tuple(proj_v.shape)} must project "
                         "to the same k")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=(2,), floating=False)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got "
                            f"{key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (b, lk):
            raise ValueError(f"key_padding_mask must have shape (B, Lk) = ({b}, {lk}), got "
                             f"{tuple(key_padding_mask.shape)}")
        check_same("query", query, "key_padding_mask", key_padding_mask, dtype=False)
    dropout_p = check_dropout(dropout_p)
    scale = check_scale(scale)
    impl = select("linformer_attention", backend, query.device, query=query, key=key, value=value,
                  proj_k=proj_k, proj_v=proj_v, key_padding_mask=key_padding_mask,
                  dropout_p=dropout_p, scale=scale)
    return impl.fn(query, key, value, proj_k, proj_v, key_padding_mask, dropout_p, scale)


@register("linformer_attention", "torch")
def _linformer_torch(query, key, value, proj_k, proj_v, key_padding_mask, dropout_p, scale):
    return reference.linformer_attention(query, key, value, proj_k, proj_v, key_padding_mask,
                                         dropout_p, scale)


# ----------------------------------------------------------------------------------------------
# Triton and CUDA backends: the masked projections are batched GEMMs that torch hands to cuBLAS; a
# fused Triton projection would mainly save the one elementwise pass that zeroes padded rows, so
# none is written (not measured yet: no GPU in the sessions that wrote this). The dense attention
# of the same backend then runs over the k projected keys. Autograd flows through both, so proj_k
# and proj_v get their gradients.
# ----------------------------------------------------------------------------------------------
_BACKEND_NAMES = {"triton": "Triton", "cuda": "CUDA"}


def _dense(backend: str):
    """The dense scaled_dot_product_attention implementation of ``backend``, or None."""
    from ..backends import implementations

    return implementations("scaled_dot_product_attention").get(backend)


def _dense_triton():
    return _dense("triton")


def _dense_reasons(backend: str, dense, *, query, key, value, proj_k, dropout_p, scale) -> List[str]:
    name = _BACKEND_NAMES[backend]
    if dense is None:
        return [f"the {name} Linformer runs on the dense {name} attention kernel "
                f"(scaled_dot_product_attention, backend '{backend}'), which is not registered"]
    # Ask the dense kernel about the call it will get: keys/values of k rows (stand-ins that
    # share dtype, device and last-dim stride with the real projections, without allocating).
    b, h, _, d = query.shape
    kp = proj_k.shape[-2]

    def stand_in(x):
        base = x[:, :, :1] if x.shape[2] > 0 else x.new_zeros((b, h, 1, x.shape[-1]))
        return base.expand(b, h, kp, x.shape[-1])

    reasons = dense.reasons(query=query, key=stand_in(key), value=stand_in(value), attn_mask=None,
                            dropout_p=dropout_p, is_causal=False, scale=scale)
    return [f"dense {name} attention over the {kp} projected keys: {r}" for r in reasons]


def _triton_reasons(*, query, key, value, proj_k, proj_v, key_padding_mask, dropout_p, scale, **_):
    return _dense_reasons("triton", _dense_triton(), query=query, key=key, value=value,
                          proj_k=proj_k, dropout_p=dropout_p, scale=scale)


def _cuda_reasons(*, query, key, value, proj_k, proj_v, key_padding_mask, dropout_p, scale, **_):
    return _dense_reasons("cuda", _dense("cuda"), query=query, key=key, value=value,
                          proj_k=proj_k, dropout_p=dropout_p, scale=scale)


def _project(x: Tensor, proj: Tensor, keep: Optional[Tensor]) -> Tensor:
    """proj @ x along the sequence axis, padded rows excluded: x (B, H, Lk, D), proj (k, Lk) or
    (H, k, Lk), keep (B, 1, Lk, 1) bool or None -> (B, H, k, D) in x's dtype. Computed in the
    promoted dtype of the two (fp32 projections of fp16 keys are not rounded to fp16 first: as
    the reference, which projects in fp32)."""
    if keep is not None:
        x = torch.where(keep, x, x.new_zeros(()))  # where, not multiply: NaN padding stays out
    e = proj if proj.dim() == 3 else proj.unsqueeze(0)
    cdt = torch.promote_types(x.dtype, e.dtype)
    # [1, H|1, k, Lk] @ [B, H, Lk, D] -> [B, H, k, D]
    return torch.matmul(e.to(cdt).unsqueeze(0), x.to(cdt)).to(x.dtype)


def _linformer_on(backend, query, key, value, proj_k, proj_v, key_padding_mask, dropout_p, scale):
    from .attention import scaled_dot_product_attention

    keep = None if key_padding_mask is None else ~key_padding_mask[:, None, :, None]
    k_proj = _project(key, proj_k, keep)
    v_proj = _project(value, proj_v, keep)
    return scaled_dot_product_attention(query, k_proj, v_proj, dropout_p=dropout_p, scale=scale,
                                        backend=backend)


@register("linformer_attention", "triton", reasons=_triton_reasons)
def _linformer_triton(query, key, value, proj_k, proj_v, key_padding_mask, dropout_p, scale):
    return _linformer_on("triton", query, key, value, proj_k, proj_v, key_padding_mask, dropout_p,
                         scale)


@register("linformer_attention", "cuda", reasons=_cuda_reasons)
def _linformer_cuda(query, key, value, proj_k, proj_v, key_padding_mask, dropout_p, scale):
    return _linformer_on("cuda", query, key, value, proj_k, proj_v, key_padding_mask, dropout_p,
                         scale)
