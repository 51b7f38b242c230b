"""fastbert's ops under ``torch.autocast``: the casts autocast applies to the computation they fuse.

Autocast changes the dtypes of the torch ops it knows; fastbert's fused ops are new to it. So each
op casts its own inputs, as autocast would cast those of the torch composition it replaces, and a
model that fastbert.optimize() rewrote computes in the dtypes it did before:

* attention (``scaled_dot_product_attention``, ``varlen_attention``, ``block_sparse_attention``,
  ``linformer_attention``): torch's SDPA runs in the autocast dtype (autocast's "lower precision"
  list, on CPU and CUDA): floating query, key, value, a floating ``attn_mask`` and Linformer's
  projections are cast to it; the output is in it.
* ``layer_norm``: on CUDA autocast runs ``F.layer_norm`` in fp32 (its "fp32" list): input, weight
  and bias are cast to fp32 and the output is fp32. On CPU autocast leaves layer_norm alone (it
  takes a bf16 input with fp32 parameters and returns bf16): so does fastbert.
* ``add_layer_norm``: ``input_bias`` belongs to the matmul that produced ``input`` (a Linear's bias,
  added in the autocast dtype); ``input + residual`` takes their promoted dtype (bf16 + fp32 ->
  fp32, as torch's ``+``), the LayerNorm follows the rule above (fp32 on CUDA), and input_bias is
  cast to the dtype the sum is computed in (so it is added in fp32 where the unfused Linear added
  it in the autocast dtype: at least as accurate). With ``return_residual`` the sum comes back in
  the promoted dtype.
* ``gelu`` / ``bias_gelu``: not in autocast's lists; bias_gelu already takes a bias of any float
  dtype and returns input's dtype (a Linear's output, with its bias, in the autocast dtype).

Only fp16 / bf16 / fp32 tensors are cast (autocast leaves fp64 alone). The op then runs with
autocast off (:func:`disabled`), so that its torch backend computes as it does without autocast:
an op under autocast equals the op without it on the cast inputs. Without autocast nothing is
cast, and mismatched dtypes stay errors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["autocast_dtype", "cast", "disabled", "layer_norm_dtype"]

_CASTABLE = (torch.float16, torch.bfloat16, torch.float32)
# device types on which autocast runs F.layer_norm in fp32
_LAYER_NORM_FP32 = ("cuda",)


def autocast_dtype(t) -> Optional[torch.dtype]:
    """The autocast dtype in effect for tensor ``t``'s device type, or None (autocast off, or ``t``
    not a tensor: the op's own checks report that)."""
    if not isinstance(t, Tensor):
        return None
    device_type = t.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast(t, dtype: torch.dtype):
    """``t`` in ``dtype`` when it is an fp16 / bf16 / fp32 tensor of another dtype; anything else
    (None, fp64, bool and integer tensors, non-tensors) unchanged."""
    if isinstance(t, Tensor) and t.dtype in _CASTABLE and t.dtype != dtype:
        return t.to(dtype)
    return t


def layer_norm_dtype(t: Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a LayerNorm of a ``dtype`` input computes and returns in under autocast on ``t``'s
    device: fp32 where autocast puts layer_norm in its fp32 list, else ``dtype``."""
    if t.device.type in _LAYER_NORM_FP32 and dtype in _CASTABLE:
        return torch.float32
    return dtype


def disabled(t: Tensor):
    """A context in which autocast is off for ``t``'s device type (the op body, after the casts)."""
    return torch.autocast(t.device.type, enabled=False)
