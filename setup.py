"""Build script for fastbert.

The Triton kernels in ``kernels/`` are installed as ``fastbert.kernels``. The CUDA extension
``fastbert._C`` is built from ``csrc/`` when csrc has sources and both a CUDA toolkit and a CUDA
build of torch are present.

Environment:
  FASTBERT_BUILD_CUDA   unset: build the extension when possible; 0: never; 1: always, fail loudly.
  TORCH_CUDA_ARCH_LIST  target architectures (default without a visible GPU: 8.0;8.6;8.9;9.0+PTX;
                        the PTX lets newer GPUs, sm_100 and up, JIT-compile the kernels).
  MAX_JOBS              parallel compile jobs (honoured by torch's ninja builder).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def _version():
    ns = {}
    with open(os.path.join(HERE, "fastbert", "version.py"), encoding="utf-8") as f:
        exec(f.read(), ns)
    return ns["__version__"]


def _cuda_sources():
    return sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
                  + glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))


def _point_cuda_home_at_toolkit():
    """torch derives CUDA_HOME from `which nvcc`; when that is a wrapper script (e.g.
    /usr/local/bin/nvcc) it gets /usr/local, which has neither the CUDA headers nor libcudart.
    Unless CUDA_HOME / CUDA_PATH is set, point it at a toolkit that has them."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            os.environ["CUDA_HOME"] = home
            return


def _cuda_extension():
    """Return (ext_modules, cmdclass) for fastbert._C, or ([], {}) with a printed reason."""
    mode = os.environ.get("FASTBERT_BUILD_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"FASTBERT_BUILD_CUDA must be 0, 1 or unset, got {mode!r}")
    if mode == "0":
        print("fastbert: FASTBERT_BUILD_CUDA=0, skipping the CUDA extension", file=sys.stderr)
        return [], {}

    def skip(reason):
        if mode == "1":
            raise SystemExit(f"fastbert: FASTBERT_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        print(f"fastbert: skipping the CUDA extension: {reason}", file=sys.stderr)
        return [], {}

    sources = _cuda_sources()
    if not sources:
        return skip("csrc/ has no sources")
    _point_cuda_home_at_toolkit()  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:  # pragma: no cover - depends on the environment
        return skip(f"torch is not importable at build time ({e}); install with --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None:
        return skip("no CUDA toolkit found (set CUDA_HOME)")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch's arch detection needs a GPU; build for the common data-centre and desktop archs.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    # The nvidia-* wheels carry headers (cusparse.h, ...) that ATen's CUDA headers include and a
    # bare system toolkit may lack.
    include_dirs = [os.path.join(HERE, "csrc")]
    try:
        import nvidia  # noqa: F401

        for base in getattr(nvidia, "__path__", []):
            include_dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
            include_dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    except ImportError:
        pass
    ext = CUDAExtension(
        name="fastbert._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={
            # No -std: torch adds the standard its headers need (C++20 from torch 2.14 on).
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="fastbert",
    version=_version(),
    description="Fused Triton and CUDA kernels for BERT-style transformer encoders",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    python_requires=">=3.10",  # as torch 2.11
    packages=["fastbert", "fastbert.ops", "fastbert.nn", "fastbert.benchmarks",
              "fastbert.integrations", "fastbert.models", "fastbert.kernels"],
    package_dir={"fastbert.kernels": "kernels"},
    # The measured dispatch table (bench/make_dispatch_table.py), once GPU results exist.
    package_data={"fastbert": ["dispatch_table.json"]},
    # The oldest torch / Triton this is tested with: torch 2.11 + Triton 3.6 (the GPU machine's),
    # and torch 2.14.1 + Triton 3.8 (CI).
    install_requires=["torch>=2.11", "numpy", "triton>=3.6; platform_system == 'Linux'"],
    extras_require={
        "test": ["pytest", "hypothesis", "matplotlib", "transformers>=4.57", "ninja"],
        "bench": ["matplotlib", "pytest-benchmark", "tqdm"],
    },
    entry_points={"console_scripts": ["fastbert = fastbert.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
