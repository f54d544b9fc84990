"""Checks of user inputs, made on the host before anything is written: ValueError names the value."""

from __future__ import annotations

import torch

INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def as_batch(name: str, values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A [B, T] int64 tensor from a [B, T] or [T] integer tensor on the engine's device. Bool is not
    an integer dtype here: True and False as token ids are a mask passed in the wrong place."""
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.dtype not in INTEGER_DTYPES:
        raise ValueError(f"{name} has dtype {values.dtype}; expected an integer dtype such as torch.int64")
    if values.device.type != device.type:
        raise ValueError(f"{name} is on {values.device}, but the engine runs on {device}")
    if values.dim() == 1:
        values = values.unsqueeze(0)
    if values.dim() != 2:
        raise ValueError(f"{name} must be [batch, seq] (or [seq]), got shape {tuple(values.shape)}")
    if values.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(values.shape)})")
    return values.to(device=device, dtype=torch.int64).contiguous()


def check_range(name: str, values: torch.Tensor, high: int) -> None:
    """Every value in [0, high); reads the tensor on the host, so never inside a captured step."""
    smallest, largest = torch.aminmax(values)  # one reduction for both ends
    low_value, high_value = int(smallest), int(largest)
    if low_value < 0:
        raise ValueError(f"{name} holds {low_value}; values must be >= 0")
    if high_value >= high:
        raise ValueError(f"{name} holds {high_value}; values must be < {high}")


def check_same_shape(name: str, values: torch.Tensor, shape: torch.Size) -> None:
    if values.shape != shape:
        raise ValueError(f"{name} has shape {tuple(values.shape)}; expected {tuple(shape)} like input_ids")


def attention_mask_of(mask: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """The [B, T] (`shape`) int32 mask of real tokens (1) and padding (0); all ones when none is given."""
    if mask is None:
        return torch.ones(shape, dtype=torch.int32, device=device)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.device.type != device.type:
        raise ValueError(f"attention_mask is on {mask.device}, but the engine runs on {device}")
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    check_same_shape("attention_mask", mask, shape)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"attention_mask holds values other than 0 and 1: {sorted(set(mask.unique().tolist()))[:8]}")
    return mask.to(dtype=torch.int32, device=device).contiguous()
