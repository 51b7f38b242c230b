"""The device's own ceilings, measured at the start of every run: every result is also reported as
a fraction of them.

* copy bandwidth: a device-to-device copy of a buffer far larger than L2, counting the bytes read
  plus the bytes written (H100 SXM: about 3.0 TB/s of the 3.35 on the datasheet);
* matmul rate: an n x n x n bf16 matmul on random data (never zeros: they run faster), 2 * n^3
  flops (H100 SXM: about 800 TFLOP/s at n = 8192 of the 989 on the datasheet).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch

__all__ = ["Ceilings", "measure_ceilings", "copy_bytes", "matmul_flops", "fraction_of_ceiling"]


@dataclass
class Ceilings:
    copy_gbps: float          # device-to-device copy, GB/s (1e9 bytes), read + written
    matmul_tflops: float      # bf16 matmul, TFLOP/s
    copy_bytes: int
    matmul_n: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def copy_bytes(nbytes: int) -> int:
    """Bytes moved by copying ``nbytes``: each is read once and written once."""
    return 2 * nbytes


def matmul_flops(n: int) -> float:
    return 2.0 * n ** 3


def fraction_of_ceiling(metric: str, value: Optional[float], ceilings: Optional[Dict]) -> Optional[float]:
    """``value`` (TFLOP/s or GB/s) over the matching measured ceiling, or None when unknown."""
    if value is None or not ceilings:
        return None
    if metric == "TFLOP/s":
        ceiling = ceilings.get("matmul_tflops")
    elif metric == "GB/s":
        ceiling = ceilings.get("copy_gbps")
    else:
        return None
    return value / ceiling if ceiling else None


def measure_ceilings(timer, *, quick: bool = False, device: str = "cuda") -> Ceilings:
    """Measure copy bandwidth and bf16 matmul rate with ``timer`` (a :class:`CudaTimer`)."""
    nbytes = (512 << 20) if quick else (2 << 30)
    n = 8192

    def time_copy():
        src = torch.randn(nbytes // 2, device=device, dtype=torch.float16)
        dst = torch.empty_like(src)
        return timer.measure(lambda i: dst.copy_(src))

    def time_matmul():
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        return timer.measure(lambda i: torch.matmul(a, b))

    t_copy = time_copy()
    t_mm = time_matmul()
    if device == "cuda":
        torch.cuda.empty_cache()
    return Ceilings(copy_gbps=copy_bytes(nbytes) / (t_copy.p50_ms * 1e-3) / 1e9,
                    matmul_tflops=matmul_flops(n) / (t_mm.p50_ms * 1e-3) / 1e12,
                    copy_bytes=nbytes, matmul_n=n)
