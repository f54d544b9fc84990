"""The device's measured peaks, taken in the same run as the benchmark: copy bandwidth and matmul rate."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .timing import median_ms


@dataclass(frozen=True)
class Peaks:
    copy_gb_s: float  # bytes read + written per second, in 1e9
    matmul_tflop_s: float

    def as_dict(self) -> dict[str, float]:
        return {"copy_gb_s": round(self.copy_gb_s, 1), "matmul_tflop_s": round(self.matmul_tflop_s, 2)}


def measure_peaks(device: torch.device, dtype: torch.dtype, *, copy_mb: int = 512, matmul_n: int = 4096) -> Peaks:
    source = torch.empty(copy_mb * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    copy_ms = median_ms(lambda: target.copy_(source), device, warmup=2, repeats=5)
    a = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    b = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    matmul_ms = median_ms(lambda: a @ b, device, warmup=2, repeats=5)
    return Peaks(2 * source.numel() * 4 / copy_ms / 1e6, 2 * matmul_n**3 / matmul_ms / 1e9)
