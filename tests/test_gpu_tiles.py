"""The attention test suites under the interpreter with the tiles a GPU launches.

Under TRITON_INTERPRET=1 the attention launchers normally use small tiles (kernels/attention.py
``_CONFIG_INTERPRETER``; block-sparse: one tile per layout block). ``FASTBERT_INTERPRETER_TILES``
(kernels/_tiles.py) makes them use an H100's or an A100's tables instead: 128 x 64 forward tiles,
32 x 128 dK/dV tiles, 64-row preprocessing, the mask-gradient kernel's tiles and block-sparse
sub-tiles. These tests rerun the attention suites that way, in a subprocess each, so that logic
depending on the tile sizes (causal and window block ranges, key limits, partial tiles) is checked
on CPU before a GPU runs it. On a GPU the suites run with the GPU's own tiles instead.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

from fastbert.testing import DEVICE

import _background  # tests/_background.py

ROOT = Path(__file__).resolve().parents[1]
# the suites each table is checked with (block-sparse tiles depend on the dtype and head dim, not
# on the architecture: one run covers them)
SUITES = {
    "sm90": ["tests/test_attention.py", "tests/test_block_sparse_attention.py"],
    "sm80": ["tests/test_attention.py"],
}


def test_interpreter_tiles_setting(monkeypatch):
    from fastbert.kernels import _tiles, attention

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    monkeypatch.delenv(_tiles.INTERPRETER_TILES_ENV, raising=False)
    assert _tiles.interpreter_tiles() is None and not _tiles.gpu_tiles(cpu)
    assert attention.attention_config("fwd", 64, 64, torch.float16, cpu) == (32, 16, 1, 1)
    monkeypatch.setenv(_tiles.INTERPRETER_TILES_ENV, "sm90")
    assert _tiles.interpreter_tiles() == (90, 227 * 1024) and _tiles.gpu_tiles(cpu)
    assert attention.attention_config("fwd", 64, 64, torch.float16, cpu) == (128, 64, 4, 3)
    assert attention.attention_config("bwd_dkdv", 64, 64, torch.float16, cpu) == (32, 128, 8, 3)
    monkeypatch.setenv(_tiles.INTERPRETER_TILES_ENV, "sm80")
    assert attention.attention_config("bwd_dkdv", 128, 128, torch.float16, cpu) == (32, 64, 8, 2)
    monkeypatch.setenv(_tiles.INTERPRETER_TILES_ENV, "h100")
    with pytest.raises(ValueError, match="FASTBERT_INTERPRETER_TILES must be one of"):
        _tiles.interpreter_tiles()


def _suites_job(arch):
    def build():
        if DEVICE == "cuda":
            return "on a GPU the attention suites run with its own tiles"
        env = dict(os.environ, FASTBERT_INTERPRETER_TILES=arch, TRITON_INTERPRET="1")
        env.pop("FASTBERT_TEST_SHARD", None)
        return _background.Job([sys.executable, "-m", "pytest", *SUITES[arch], "-q", "-x",
                                "-p", "no:cacheprovider"], env, str(ROOT), timeout_s=1200)
    return build


for _arch in SUITES:
    _background.register(f"gpu-tiles-{_arch}", _suites_job(_arch))


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.background(f"gpu-tiles-{a}"))
                                  for a in sorted(SUITES)])
def test_attention_suites_with_gpu_tiles(arch):
    """(The child starts in the background when collection ends: tests/_background.py.)"""
    done = _background.result(f"gpu-tiles-{arch}")
    assert done.returncode == 0, f"with {arch} tiles:\n" + (done.stdout + done.stderr)[-6000:]
