"""Shared numerics for the tests: devices, dtypes, tolerances, poisoned outputs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from tritongpt2.kernels.backend import resolve_backend

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
BACKEND = "triton" if ON_GPU else "interpret"
OPS = resolve_backend(BACKEND).ops  # the kernels' launchers
# Every backend's ops on the tests' device, each held to the reference the same way.
BACKEND_OPS = {name: resolve_backend(name).ops for name in ([BACKEND] if ON_GPU else [BACKEND, "torch"])}
# The interpreter's bfloat16 tl.dot is wrong (a known interpreter limit), so bfloat16 runs on a GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

# Relative Frobenius error allowed against a float64 oracle, on top of twice what torch itself makes
# computing the same thing in the same dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def relative_error(out: torch.Tensor, oracle: torch.Tensor) -> float:
    diff = out.double() - oracle.double()
    return (diff.norm() / oracle.double().norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, oracle: torch.Tensor, same_dtype: torch.Tensor | None = None) -> None:
    """out (from a kernel) against the float64 oracle; same_dtype is torch's own answer in out's dtype."""
    assert out.shape == oracle.shape, f"shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert not torch.isnan(out).any(), "NaN in the output: an element was not written or the math broke"
    limit = TOLERANCE[out.dtype]
    if same_dtype is not None:
        limit += 2 * relative_error(same_dtype, oracle)
    err = relative_error(out, oracle)
    assert err <= limit, f"relative error {err:.3e} > {limit:.3e} ({out.dtype})"


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype=dtype, device=DEVICE)


def as_float64(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t.double() if t is not None and t.is_floating_point() else t for t in tensors]


def poisoned(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """A buffer full of NaN, so any element a kernel fails to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Inside the block torch.empty returns floating tensors full of NaN, so outputs that a
    launcher allocates and its kernel leaves unwritten show up as NaN."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = nan_empty
    try:
        yield
    finally:
        torch.empty = empty

