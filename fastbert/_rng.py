"""Dropout seeds for the fused kernels.

Every fused op with dropout (attention, block-sparse attention, add+LayerNorm; Triton and CUDA
alike) uses counter-based randomness: a kernel keeps element ``e`` iff
``uniform(seed, e) >= p``, and the backward pass regenerates the same mask from the same seed.

The seed of one call is drawn here, **on the device of the inputs**, from that device's default
torch generator, and kernels read it from device memory. That gives three properties:

* ``torch.manual_seed`` (which seeds the CPU and every CUDA generator) reproduces the masks;
* drawing the seed never synchronises the GPU (the value is never read on the host);
* it is safe under CUDA graph capture: torch's CUDA generator advances its Philox offset on every
  replay of a captured ``torch.randint``, so each replay of a captured training step draws a fresh
  seed and a fresh mask instead of replaying the mask drawn at capture time.

The cost is one tiny kernel launch per call with ``dropout_p > 0``; calls without dropout get an
empty tensor and launch nothing.
"""
from __future__ import annotations

import torch

__all__ = ["dropout_seed", "seed_like"]

# Seeds take 63 bits (every kernel keys its Philox generator with the full 64-bit seed: Triton's
# tl.rand and the CUDA kernels alike). Two calls that draw the same seed get the same masks (the
# counter is the element index), so fewer bits would repeat masks within a training run: with 31
# bits, once in about 2**15.5 = 46k calls with dropout (a BERT-base step makes 36).
_SEED_HIGH = 2 ** 63 - 1


def dropout_seed(dropout_p: float, device: torch.device) -> torch.Tensor:
    """The dropout seed of one call: int64 of shape (1,) on ``device`` when ``dropout_p > 0``,
    else an empty int64 tensor of shape (0,) (nothing is launched)."""
    if dropout_p > 0.0:
        return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)
    return torch.empty((0,), dtype=torch.int64, device=device)


def seed_like(dropout_p: float, device: torch.device) -> torch.Tensor:
    """The fake (meta) counterpart of :func:`dropout_seed`: same shape, dtype and device."""
    return torch.empty((1,) if dropout_p > 0.0 else (0,), dtype=torch.int64, device=device)
