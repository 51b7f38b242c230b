"""How the attention kernels read an additive (float) attn_mask: shared by the dense, varlen and
block-sparse kernels, so that every one treats -inf, HuggingFace's finfo.min padding and NaN alike."""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["bias_log2"]


@triton.jit
def bias_log2(bias):
    """An additive mask tile (fp32) in base-2 units, as the scores are. Finite values beyond
    +-2e38 (e.g. HuggingFace's torch.finfo(float32).min padding) are clamped first so that
    ``* log2(e)`` cannot overflow them to +-inf: they stay "alive" keys, as in the reference (a
    row padded that way everywhere averages its keys, as torch does; a key at +3e38 takes all the
    weight), while -inf stays -inf (key removed), and +inf and NaN stay themselves (the row comes
    out NaN, as in torch; tl.maximum would drop a NaN). The clamp is a limit: keys whose finite
    mask values differ only beyond +-2e38 (3e38 and 2.5e38, say) weigh the same here, where torch
    tells them apart; the public docstrings say so."""
    finite = (bias != float("-inf")) & (bias != float("inf"))
    bias = tl.where((bias < -2.0e38) & finite, -2.0e38, bias)
    bias = tl.where((bias > 2.0e38) & finite, 2.0e38, bias)
    return bias * 1.4426950408889634
