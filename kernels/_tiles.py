"""Which tile rules a launcher follows: the GPU's, or the small tiles of Triton's CPU interpreter.

Compiled on a CUDA device, the attention launchers pick their tiles from per-architecture tables.
Under ``TRITON_INTERPRET=1`` they use small tiles, so that short test sequences (17, 97, 130) span
several blocks. ``FASTBERT_INTERPRETER_TILES=sm90`` (or ``sm80``) makes the interpreter use the
tables of that GPU (an H100's or an A100's) instead, so that the logic that depends on the tile
sizes (causal and window block ranges, key limits, partial tiles, BLOCK_M != BLOCK_N, sub-tiles of
a block-sparse layout block) is checked on CPU with the tiles a GPU launches
(``tests/test_gpu_tiles.py``).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

__all__ = ["INTERPRETER_TILES_ENV", "interpreting", "interpreter_tiles", "gpu_tiles"]

INTERPRETER_TILES_ENV = "FASTBERT_INTERPRETER_TILES"
# (compute capability, shared memory per block in bytes) of the GPUs whose tables can be chosen
_GPU_LIMITS = {"sm90": (90, 227 * 1024), "sm80": (80, 163 * 1024)}


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter: ``TRITON_INTERPRET`` read as Triton
    reads it (3.6 to 3.8: 1, true, on, yes or y, in any case; anything else is off)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


def interpreter_tiles() -> Optional[Tuple[int, int]]:
    """(compute capability, shared memory) of the GPU whose tile tables the interpreter uses, or
    None (its own small tiles); ValueError for a value other than sm90 / sm80."""
    value = os.environ.get(INTERPRETER_TILES_ENV, "")
    if not value:
        return None
    if value not in _GPU_LIMITS:
        raise ValueError(f"{INTERPRETER_TILES_ENV} must be one of {sorted(_GPU_LIMITS)} or unset, "
                         f"got {value!r}")
    return _GPU_LIMITS[value]


def gpu_tiles(device: torch.device) -> bool:
    """Whether launches on ``device`` follow the GPU tile rules: compiled on a CUDA device, or under
    the interpreter with FASTBERT_INTERPRETER_TILES set."""
    if device.type == "cuda" and not interpreting():
        return True
    return interpreter_tiles() is not None
