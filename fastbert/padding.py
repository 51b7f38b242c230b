"""Remove and restore padding: the bridge between padded (B, L, ...) batches and the packed
(total, ...) layout of :func:`fastbert.varlen_attention`."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._validation import check_int, host_checks_allowed, mask_assert, mask_reads_allowed, type_name

__all__ = ["unpad_input", "pad_input"]


def unpad_input(hidden_states: Tensor, attention_mask: Tensor) -> Tuple[Tensor, Tensor, Tensor, int]:
    """Pack the real tokens of a padded batch.

    Args:
        hidden_states: (B, L, ...) padded batch.
        attention_mask: (B, L), 1/True for a real token, 0/False for padding (HuggingFace's
            convention). Real tokens need not be contiguous.

    Returns:
        packed (total, ...), the real tokens in batch-major order;
        indices (total,) int64, their flat positions in (B * L);
        cu_seqlens (B + 1,) int32, cumulative real lengths starting at 0;
        max_seqlen, the longest real length (a Python int: one host sync).
    """
    if not isinstance(hidden_states, Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type_name(hidden_states)}")
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type_name(attention_mask)}")
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, L), got shape {tuple(attention_mask.shape)}")
    if hidden_states.dim() < 2 or tuple(hidden_states.shape[:2]) != tuple(attention_mask.shape):
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} must start with the (B, L) = "
                         f"{tuple(attention_mask.shape)} of attention_mask")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"attention_mask must be bool or integer (1 = real token), got "
                        f"{attention_mask.dtype}")
    if attention_mask.device != hidden_states.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but hidden_states is on "
                         f"{hidden_states.device}")
    if attention_mask.device.type == "meta":
        raise ValueError("attention_mask is a meta tensor: unpad_input needs its values (which "
                         "tokens are real) to build the packed layout")
    keep = attention_mask.bool()
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = seqlens.max().item() if seqlens.numel() else 0
    if not isinstance(max_seqlen, torch.SymInt):  # (traced: a symbol; int() would specialise it)
        max_seqlen = int(max_seqlen)
    flat = hidden_states.reshape((-1,) + tuple(hidden_states.shape[2:]))
    return flat.index_select(0, indices), indices, cu_seqlens, max_seqlen


def gap_in_a_row(attention_mask: Tensor) -> bool:
    """Whether some row of a (B, L) padding mask (1 / True = real token) has padding between two
    real tokens (real, padding, real): packed, its tokens would be neighbours, so whatever counts
    padded positions (MPNet's relative positions, a sliding window) sees another distance. One
    host read."""
    return bool(_has_gap(attention_mask))


def _has_gap(attention_mask: Tensor) -> Tensor:
    """:func:`gap_in_a_row` as a 0-d bool tensor (no host read)."""
    m = attention_mask.bool()
    runs = (m[:, 1:] & ~m[:, :-1]).sum(1) + m[:, 0]  # runs of real tokens per row
    return (runs > 1).any()


def gap_refusal(attention_mask: Tensor, counted_by: str) -> Optional[str]:
    """Why an encoder whose ``counted_by`` counts padded positions cannot pack ``attention_mask``
    (a gap inside a row, :func:`gap_in_a_row`), or None. Read on the host where
    :func:`~fastbert._validation.mask_reads_allowed` (under a plain torch.compile: a graph
    break); in a one-graph compile a runtime assertion fails a call with a gap; not checked
    during CUDA-graph capture (contiguous rows are assumed)."""
    if not mask_reads_allowed(attention_mask.device):
        mask_assert(~_has_gap(attention_mask))
        return None
    if not gap_in_a_row(attention_mask):
        return None
    return f"a padding mask with a gap inside a row ({counted_by} counts it)"


def pad_input(packed: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Inverse of :func:`unpad_input`: scatter packed (total, ...) tokens back into a zero-filled
    (batch, seqlen, ...) tensor. Differentiable with respect to ``packed``.

    ``indices`` (total,) are flat positions in [0, batch * seqlen), as :func:`unpad_input` returns
    them; on the CPU they are range-checked (ValueError), on CUDA (no host sync) index_copy_'s own
    device-side check applies."""
    for name, t in (("packed", packed), ("indices", indices)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type_name(t)}")
    if packed.dim() == 0:
        raise ValueError("packed must be (total, ...) with at least 1 dim, got a 0-dim tensor")
    if indices.dim() != 1 or indices.shape[0] != packed.shape[0]:
        raise ValueError(f"indices must be 1-D with one entry per packed token ({packed.shape[0]}), "
                         f"got shape {tuple(indices.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be an int32 or int64 tensor, got dtype {indices.dtype}")
    if indices.device != packed.device:
        raise ValueError(f"indices is on {indices.device} but packed is on {packed.device}")
    if host_checks_allowed(packed.device):  # (under torch.compile the sizes may be symbolic)
        batch = check_int("batch", batch)
        seqlen = check_int("seqlen", seqlen)
        slots = batch * seqlen
        if indices.shape[0] > slots:
            raise ValueError(f"{indices.shape[0]} packed tokens do not fit in batch * seqlen = "
                             f"{batch} * {seqlen} = {slots} positions")
        if indices.device.type == "cpu" and indices.numel():
            # Positions are range-checked only where reading them costs no device sync (on CUDA,
            # index_copy_ checks them itself, with a device-side assert).
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= slots:
                raise ValueError(f"indices must be positions in [0, batch * seqlen) = [0, {slots}), "
                                 f"got values in [{lo}, {hi}]")
    out = packed.new_zeros((batch * seqlen,) + tuple(packed.shape[1:]))
    out = out.index_copy(0, indices.long(), packed)
    return out.reshape((batch, seqlen) + tuple(packed.shape[1:]))
