"""Checks of the heads' targets (labels, mc_labels, mc_token_ids, answer positions), made before the
forward runs: ValueError naming the argument and the value, so a rejected call leaves the cache as
it was. Each returns the target as the loss takes it."""

from __future__ import annotations

import math
from typing import Any

import torch

from tritongpt2.engine.inputs import INTEGER_DTYPES

from .losses import IGNORE_INDEX


def class_ids(
    name: str, values: Any, shape: tuple[int, ...], classes: int, *, ignore_index: int | None = IGNORE_INDEX,
    exact_shape: bool = True,
) -> torch.Tensor:
    """An int64 tensor of `shape` (or, unless exact_shape, of as many elements) whose values are in
    [0, classes), or equal ignore_index. Reads the values on the host."""
    ids = _integers(name, values)
    if tuple(ids.shape) != shape and (exact_shape or ids.numel() != math.prod(shape)):
        raise ValueError(f"{name} has shape {tuple(ids.shape)}; expected {shape}")
    valid = (ids >= 0) & (ids < classes)
    if ignore_index is not None:
        valid |= ids == ignore_index
    if not bool(valid.all()):
        ignored = f" (or {ignore_index}, ignored)" if ignore_index is not None else ""
        raise ValueError(f"{name} holds {int(ids[~valid][0])}; values must be in [0, {classes}){ignored}")
    return ids


def positions(name: str, values: Any, rows: int) -> torch.Tensor:
    """Answer start or end positions: one integer per row, [rows] or [rows, 1] (any value: the loss
    clamps them)."""
    ids = _integers(name, values)
    if tuple(ids.shape) not in ((rows,), (rows, 1)):
        raise ValueError(f"{name} has shape {tuple(ids.shape)}; expected ({rows},) or ({rows}, 1), one per row")
    return ids


def numbers(name: str, values: Any, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Regression targets or multi-label indicators: a numeric tensor of `shape`, floating values as
    given (the loss then computes as transformers does), integers and bools as `dtype`."""
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.is_complex():
        raise ValueError(f"{name} has dtype {values.dtype}; expected real numbers")
    if tuple(values.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(values.shape)}; expected {shape}")
    return values if values.is_floating_point() else values.to(dtype)


def _integers(name: str, values: Any) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.dtype not in INTEGER_DTYPES:
        raise ValueError(f"{name} has dtype {values.dtype}; expected an integer dtype such as torch.int64")
    return values.long()



def sequence_labels(labels: Any, problem_type: str, rows: int, num_labels: int, dtype: torch.dtype) -> torch.Tensor:
    """Sequence classification's labels for its problem type: one class id per row, or `num_labels`
    numbers per row (one, [rows] or [rows, 1], for a regression on one label)."""
    if problem_type == "single_label_classification":
        return class_ids("labels", labels, (rows,), num_labels, exact_shape=False)
    one_per_row = problem_type == "regression" and num_labels == 1
    shape = (rows,) if one_per_row and isinstance(labels, torch.Tensor) and labels.dim() == 1 else (rows, num_labels)
    return numbers("labels", labels, shape, dtype)
