"""The dropout seed as every Triton launcher receives it: an int64 (1,) tensor on the inputs'
device (``fastbert._rng.dropout_seed``), passed to the kernels as a pointer that they load only
when dropout is on, so the host never reads it (no sync; fresh on every CUDA-graph replay)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["check_seed", "seed_arg", "load_seed"]


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


@triton.jit
def load_seed(Seed, HAS_DROPOUT: tl.constexpr):
    """In a kernel: the dropout seed read from device memory (no host sync), or 0 (unused) when
    ``HAS_DROPOUT`` is off, in which case the pointer is never dereferenced."""
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    else:
        seed = 0
    return seed
