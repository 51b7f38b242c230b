"""The dropout seed as every Triton launcher receives it: an int64 (1,) tensor on the inputs'
device (``fastbert._rng.dropout_seed``), passed to the kernels as a pointer that they load only
when dropout is on, so the host never reads it (no sync; fresh on every CUDA-graph replay)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["check_seed", "seed_arg", "load_seed", "keep_scale"]


def check_seed(seed) -> None:
    """TypeError unless ``seed`` is an int64 tensor of one element."""
    if not (isinstance(seed, Tensor) and seed.dtype == torch.int64 and seed.numel() == 1):
        got = (f"a {seed.dtype} tensor of shape {tuple(seed.shape)}" if isinstance(seed, Tensor)
               else type(seed).__name__)
        raise TypeError("seed must be the int64 (1,) dropout seed tensor (as the forward op "
                        f"returns it, from fastbert._rng.dropout_seed), got {got}")


def seed_arg(seed: Optional[Tensor], dropout_p: float, dummy: Tensor) -> Tensor:
    """The kernels' seed pointer: with dropout the checked seed tensor, on ``dummy``'s device;
    without, ``dummy`` itself (never dereferenced: the kernel's dropout flag is off)."""
    if dropout_p <= 0.0:
        return dummy
    check_seed(seed)
    if seed.device != dummy.device:
        raise ValueError(f"seed is on {seed.device}, the kernel's tensors on {dummy.device}")
    return seed


def keep_scale(dropout_p: float) -> float:
    """``1 / (1 - p)``, the scale of the kept values, computed on the host in double and passed
    to the kernels (rounded once to fp32 there). A kernel computing it from its fp32 copy of p
    would be off by up to about 1e-6 relative at p = 0.99 (1e-5 at 0.999). 1.0 without dropout
    (and at p = 1, which the backends answer without a kernel)."""
    p = float(dropout_p)
    return 1.0 / (1.0 - p) if 0.0 < p < 1.0 else 1.0


@triton.jit
def load_seed(Seed, HAS_DROPOUT: tl.constexpr):
    """In a kernel: the dropout seed read from device memory (no host sync), or 0 (unused) when
    ``HAS_DROPOUT`` is off, in which case the pointer is never dereferenced."""
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    else:
        seed = 0
    return seed
