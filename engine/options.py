"""EngineOptions: how an engine is built, taken the same way by every entry point that builds one."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from tritongpt2.kernels.backend import BACKENDS, Backend, resolve_backend

from .quantize import Quantization

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EngineOptions:
    """dtype: the weights' dtype (default: the checkpoint's); device: where they live (default: the
    backend's); backend: triton, interpret or torch (default: $TRITONGPT2_BACKEND, else by device);
    max_batch, max_seq: the static KV cache's rows and slots (max_seq defaults to n_positions);
    cuda_graphs: capture steps (default: on where the backend can); quantization: None (float
    weights), a format name (int8, int4, nf4) or a Quantization, with group_size and double_quant
    (engine/quantize.py): the engine quantizes its matmul weights once, after loading. `quantization`
    is always a Quantization or None once validated; group_size and double_quant stay as given."""

    dtype: torch.dtype | None = None
    device: torch.device | None = None
    backend: str | None = None
    max_batch: int = 8
    max_seq: int | None = None
    cuda_graphs: bool | None = None
    quantization: str | Quantization | None = None
    group_size: int | None = None
    double_quant: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str) and self.dtype.removeprefix("torch.") in DTYPES:
            object.__setattr__(self, "dtype", DTYPES[self.dtype.removeprefix("torch.")])
        if self.dtype is not None and self.dtype not in DTYPES.values():
            raise ValueError(f"dtype={self.dtype!r} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device={self.device!r} is not a device") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device={self.device!r} asked for, but torch.cuda.is_available() is False")
            object.__setattr__(self, "device", device)
        if self.backend is not None and not isinstance(self.backend, (str, Backend)):
            raise ValueError(f"backend={self.backend!r} must be one of {', '.join(BACKENDS)}")
        _check_count("max_batch", self.max_batch)
        if self.max_seq is not None:
            _check_count("max_seq", self.max_seq)
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs={self.cuda_graphs!r} must be True, False or None")
        object.__setattr__(self, "quantization", Quantization.of(self.quantization, self.group_size, self.double_quant))

    @classmethod
    def of(cls, options: EngineOptions | None = None, **overrides: Any) -> EngineOptions:
        """options with the given fields replaced; TypeError naming an unknown option."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(options or cls(), **overrides)

    def backend_for(self, device: torch.device | None = None) -> Backend:
        """The backend for weights on `device` (default: this options' device, else the backend's)."""
        return resolve_backend(self.backend, device=device if device is not None else self.device)


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
