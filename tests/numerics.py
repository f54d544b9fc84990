"""Shared numerics for the tests: devices, dtypes, tolerances, poisoned outputs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

import device_audit
from tritongpt2.kernels.backend import BACKENDS, Backend, resolve_backend

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


def device_of(backend: str | Backend) -> torch.device:
    """The device a backend's tensors live on: cuda for triton, the CPU for interpret and torch."""
    return (backend if isinstance(backend, Backend) else BACKENDS[backend]).device


def on(backend: str | Backend, value: Any) -> Any:
    """value on device_of(backend): a tensor, a module (moved in place, as module.to does), None,
    or a tuple, list or dict of them. Every tensor a test hands to an engine or model of `backend`
    goes through here (or is made from one that did), so that on a GPU machine the kernel backend's
    inputs are on cuda while the torch backend's stay on the CPU; the device audit (device_audit.py)
    checks that they do."""
    name = backend.name if isinstance(backend, Backend) else backend
    device = device_of(name)
    foreign = device_audit.ENABLED and name == device_audit.FOREIGN
    if value is None:
        return None
    if isinstance(value, torch.nn.Module):
        value.to(device)
        if device_audit.ENABLED:
            device_audit.tag(value, name)
        return value
    if isinstance(value, torch.Tensor):
        moved = value.to(device)  # a tensor the audit marked leaves the device with .to("cpu")
        return device_audit.mark(moved) if foreign else moved
    if isinstance(value, (tuple, list)):
        return type(value)(on(name, item) for item in value)
    if isinstance(value, dict):
        return {key: on(name, item) for key, item in value.items()}
    raise TypeError(f"on() moves tensors, modules and containers of them, not {type(value).__name__}")


def relative_error(out: torch.Tensor, oracle: torch.Tensor) -> float:
    """||out - oracle|| / ||oracle||, in float64 on the CPU: ours, on the backend's device, is held
    against a reference computed on the CPU."""
    out, oracle = out.detach().cpu().double(), oracle.detach().cpu().double()
    return ((out - oracle).norm() / oracle.norm().clamp_min(1e-30)).item()


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

