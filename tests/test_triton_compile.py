"""Every Triton kernel compiles to a cubin for sm_90 and sm_80, without a GPU.

The rest of the suite runs the kernels under Triton's CPU interpreter, which never sees the
compiler: a type error that only the code generator raises, a layout the backend cannot lower, a
ptxas error or a tile configuration whose shared memory does not fit the device would first show
on a GPU. tests/_compile_kernels.py compiles each kernel ahead of time (triton.compile with
ASTSource and GPUTarget) with the specialisation and the block sizes / warps / stages that its
launcher picks on an H100 and an A100, for fp16 / bf16 / fp32 and the main constexpr variants,
then runs the Triton-bundled ptxas on the PTX (register spills are reported, not failures).

It runs in a subprocess without TRITON_INTERPRET: the kernels modules choose between interpreter
and compiler when they are imported, and tests/conftest.py sets TRITON_INTERPRET=1 here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_compile_kernels.py")
FAMILIES = ("attention", "block_sparse_attention", "layer_norm", "gelu")
SKIP_STATUS = 3  # the script's exit status when this Triton cannot compile ahead of time


@pytest.fixture(scope="module")
def compile_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton_compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # compile for real, not from an earlier run
    out = tmp / "results.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode == SKIP_STATUS:
        pytest.skip(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr)
    print(proc.stdout)  # per-kernel shared memory, registers and spills (pytest -s shows it)
    if not out.exists():
        pytest.fail(f"{SCRIPT.name} exited {proc.returncode} without results:\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text()), proc


@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_compile_for_sm90_and_sm80(compile_results, family):
    results, proc = compile_results
    mine = [r for r in results if r["family"] == family]
    assert mine, f"no {family} kernels were compiled"
    assert {r["name"][:4] for r in mine} == {"sm90", "sm80"}, "both architectures"
    failed = [f"{r['name']}: {r['error']}" for r in mine if not r["ok"]]
    assert not failed, f"{len(failed)}/{len(mine)} {family} kernels failed:\n" + "\n".join(failed)
    if family == FAMILIES[-1]:
        assert proc.returncode == 0, proc.stderr[-4000:]


def test_attention_forward_kernels_use_the_architectures_tensor_cores(compile_results):
    """A 16-bit attention forward must issue Hopper's wgmma on sm_90 (where its tile has the 64
    rows a warpgroup MMA needs) and mma.sync on sm_80: a change that quietly drops to a slower
    instruction (or to FMA) would otherwise show first as a benchmark regression on a GPU."""
    import re

    results, _ = compile_results
    checked = []
    for r in results:
        name = r["name"]
        if (r["family"] not in ("attention", "block_sparse_attention") or "-fwd-" not in name
                or not ("-fp16" in name or "-bf16" in name) or not r["ok"]):
            continue
        block_m = int(re.search(r"-BM(\d+)-", name).group(1))
        if name.startswith("sm90") and block_m >= 64:
            assert r["mma"] == "wgmma", f"{name}: {r['mma'] or 'no tensor-core'} instructions"
        elif name.startswith("sm80"):
            assert r["mma"] == "mma", f"{name}: {r['mma'] or 'no tensor-core'} instructions"
        checked.append(name)
    assert len(checked) >= 8, checked
