"""Builds csrc/ as a CPU library for the CUDA emulator (see cuda_emu.h) and loads it.

Every csrc file is copied into a build folder with three mechanical rewrites that let a C++
compiler take a .cu file: ``kernel<<<grid, block, smem, stream>>>(args);`` becomes
``::emu::launch(::emu::Config(grid, block, smem, stream), kernel, args);``, an ``extern __shared__``
array becomes a pointer to the emulated dynamic shared memory, and a kernel's
``__launch_bounds__(N)`` becomes a check at the top of its body; a static ``__shared__`` array is
filled with NaN bytes by the first thread of each block that reaches it (its content is undefined). The binding (csrc/fastbert.cpp) is
compiled with ``FASTBERT_EMULATE``, which registers the same schemas as ``torch.ops.fastbert_emu``
with CPU kernels (the launchers then run on CPU tensors' memory). Nothing here ships with the
package.

    python tests/cuda_emu/build_emu.py      # builds (about 2 minutes on 2 cores) and prints the library
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"

_LAUNCH = re.compile(r"(?m)^(?P<indent>[ \t]*)(?P<kernel>[^\s;{}][^;{}]*?)<<<(?P<config>.*?)>>>\((?P<args>.*?)\);[ \t]*$",
                     re.S)
_EXTERN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(?P<type>[\w ]+?)\s+(?P<name>\w+)\[\];")
_STATIC_SMEM = re.compile(r"(?m)^(?P<indent>[ \t]*)__shared__\s+(?P<type>[\w:]+)\s+(?P<decls>[^;]+);")
_BOUNDS = re.compile(r"__global__\s+void\s+__launch_bounds__\((?P<bounds>[^)]*)\)\s*(?P<head>\w+\s*\()")


def _rewrite_bounds(text: str) -> str:
    out, pos = [], 0
    for m in _BOUNDS.finditer(text):
        body = text.index("{", m.end())  # the kernel body's opening brace
        threads = m.group("bounds").split(",")[0].strip()
        out.append(text[pos:m.start()])
        out.append(f"__global__ void {m.group('head')}")
        out.append(text[m.end():body + 1])
        out.append(f" ::emu::check_launch_bounds({threads});")
        pos = body + 1
    out.append(text[pos:])
    return "".join(out)


def _poison_static_smem(m: "re.Match") -> str:
    names = [d.split("[")[0].strip() for d in m.group("decls").split(",")]
    poison = " ".join(f"::emu::poison_shared_once({n}, sizeof({n}));" for n in names)
    return f"{m.group(0)} {poison}"


def rewrite(text: str) -> str:
    """A csrc source made compilable as C++ against cuda_emu.h (see the module docstring)."""
    text = _LAUNCH.sub(lambda m: (f"{m.group('indent')}::emu::launch(::emu::Config({m.group('config')}), "
                                  f"{m.group('kernel').strip()}, {m.group('args')});"), text)
    text = _EXTERN_SMEM.sub(lambda m: (f"{m.group('type')}* {m.group('name')} = "
                                       f"reinterpret_cast<{m.group('type')}*>(::emu::dynamic_smem());"), text)
    text = _STATIC_SMEM.sub(_poison_static_smem, text)
    return _rewrite_bounds(text)


def _sources(build: Path) -> list:
    """Rewritten copies of csrc under build/src; returns the files to compile."""
    src = build / "src"
    if src.exists():
        shutil.rmtree(src)
    compiled = []
    for path in sorted(CSRC.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(CSRC)
        text = path.read_text()
        if path.suffix in (".cu", ".cuh"):
            text = rewrite(text)
            if "<<<" in text or "extern __shared__" in text or "__launch_bounds__" in text:
                raise RuntimeError(f"cuda_emu: {rel} has a construct the rewrite does not handle")
        if path.suffix == ".cu":
            rel = rel.with_suffix(".cpp")
            text = '#include "cuda_emu.h"\n' + text
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        if dest.suffix == ".cpp":
            compiled.append(str(dest))
    return compiled + [str(HERE / "cuda_emu_runtime.cpp")]


def cuda_include() -> Path:
    """The CUDA toolkit's include folder (cuda_fp16.h and friends; nothing is linked)."""
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda_fp16.h").exists():
            return Path(base) / "include"
    nvcc = shutil.which("nvcc")
    if nvcc and (Path(nvcc).resolve().parents[1] / "include" / "cuda_fp16.h").exists():
        return Path(nvcc).resolve().parents[1] / "include"
    raise RuntimeError("cuda_emu: no CUDA toolkit headers found (set CUDA_HOME)")


_LOADED: list = []  # the library this process has loaded


def asan_runtime() -> str:
    """Path of the compiler's AddressSanitizer runtime (to LD_PRELOAD into the Python that loads
    an instrumented build), or "" when the compiler has none."""
    import subprocess

    try:
        out = subprocess.run(["c++", "-print-file-name=libasan.so"], capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out if os.path.isabs(out) and os.path.exists(out) else ""


def build(verbose: bool = False, sanitize: bool = None) -> str:
    """Builds (or reuses) the emulated library and loads it; returns its path. The ops are then
    torch.ops.fastbert_emu.*.

    ``sanitize`` (default: ``FASTBERT_EMU_SANITIZE=address`` in the environment) instruments the
    kernels with AddressSanitizer and UndefinedBehaviorSanitizer: a read or write outside any tensor
    or outside a block's shared memory (the CPU counterpart of compute-sanitizer's memcheck), a
    signed overflow in index arithmetic or a misaligned vector access then stops the process with a
    report. The process must have been started with the ASan runtime preloaded
    (``LD_PRELOAD=$(c++ -print-file-name=libasan.so)``, see :func:`asan_runtime`)."""
    import torch
    from torch.utils import cpp_extension

    if sanitize is None:
        sanitize = os.environ.get("FASTBERT_EMU_SANITIZE", "") == "address"
    if _LOADED:
        # A process holds one: torch refuses a second library registering fastbert_emu (as after
        # an edit of csrc/ while the tests run). An instrumented and a plain build never meet.
        return _LOADED[0]
    digest = hashlib.sha256()
    for path in sorted(list(CSRC.rglob("*")) + sorted(HERE.rglob("*.h")) + sorted(HERE.rglob("*.cpp"))
                       + [Path(__file__)]):
        if path.is_file():
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    digest.update(torch.__version__.encode())  # a build per torch: its ABI changes between them
    name = "fastbert_emu_" + digest.hexdigest()[:12] + ("_asan" if sanitize else "")
    build_dir = Path(os.environ.get("FASTBERT_EMU_BUILD", ROOT / "build" / "cuda_emu")) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    cflags = ["-O2", "-DFASTBERT_EMULATE", "-Wno-attributes"]
    ldflags = []
    if sanitize:
        # UndefinedBehaviorSanitizer too: signed overflow in index arithmetic, bad shifts, misaligned
        # vector accesses; any finding aborts (no recovery), like an ASan report.
        checks = "address,undefined"
        cflags = ["-O1", "-g", f"-fsanitize={checks}", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer"] + cflags[1:]
        ldflags = [f"-fsanitize={checks}"]
    # torch's build lock is a file that a killed build leaves behind, and the next build then waits
    # for it forever. Builds here take an OS lock first (released when its holder dies): whoever
    # holds it knows a lock file left in the folder is stale.
    with open(build_dir / "build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        lib = cpp_extension.load(
            name=name,
            sources=_sources(build_dir),  # (rewritten into the folder: under the lock too)
            extra_include_paths=[str(HERE / "include"), str(HERE), str(build_dir / "src"),
                                 str(cuda_include())],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(build_dir),
            is_python_module=False,
            with_cuda=False,
            verbose=verbose,
        )
    _LOADED.append(lib if isinstance(lib, str) else str(build_dir / f"{name}.so"))
    return _LOADED[0]


def toolchain_missing() -> str:
    """Why the emulator cannot be built here ("" when it can)."""
    if shutil.which("c++") is None:
        return "no C++ compiler (c++) to build the CUDA emulator"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():  # torch's extension loader builds with ninja only
        return "ninja is not installed (pip install ninja): torch builds the CUDA emulator with it"
    try:
        cuda_include()
    except RuntimeError as e:
        return str(e)
    return ""


_GLUE: list = []  # set once the op families' glue is registered on torch.ops.fastbert_emu


@contextlib.contextmanager
def emulated_cuda_backend(order: str = "forward"):
    """Builds (or reuses) and loads the emulated library, registers each op family's fakes and
    autograd on ``torch.ops.fastbert_emu`` (once per process), and while the context lasts points
    the families' ``backend="cuda"`` implementation functions (``_layer_norm_cuda``,
    ``_sdpa_cuda``, ...) at it, with each block's threads run in ``order`` ("forward" or
    "reverse"). Yields ``torch.ops.fastbert_emu``. The public ops still refuse backend="cuda" on
    CPU tensors: call the implementation functions."""
    import torch

    if order not in ("forward", "reverse"):
        raise ValueError(f"order must be 'forward' or 'reverse', got {order!r}")
    build()
    families = [sys.modules[f"fastbert.ops.{name}"] for name in ("layer_norm", "gelu", "attention")]
    ops = torch.ops.fastbert_emu
    if not _GLUE:
        for family in families:
            family._register_cuda_ops("fastbert_emu")
        _GLUE.append(True)
    saved_order = os.environ.get("FASTBERT_EMU_ORDER")
    saved_ops = [family._cuda_ops for family in families]
    os.environ["FASTBERT_EMU_ORDER"] = order
    for family in families:
        family._cuda_ops = lambda: ops
    try:
        yield ops
    finally:
        for family, fn in zip(families, saved_ops):
            family._cuda_ops = fn
        if saved_order is None:
            os.environ.pop("FASTBERT_EMU_ORDER", None)
        else:
            os.environ["FASTBERT_EMU_ORDER"] = saved_order


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
