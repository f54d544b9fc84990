"""The losses of transformers' GPT-2 heads, computed as transformers computes them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# The keyword arguments transformers' causal LM loss takes beside logits and labels.
LOSS_KEYWORDS = frozenset({"num_items_in_batch", "ignore_index", "shift_labels"})


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss: token t predicts label t + 1 (or shift_labels[t], already
    shifted); labels equal to ignore_index are ignored; in float32, the mean over the rest, or their
    sum over num_items_in_batch (gradient accumulation across batches)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1).to(logits.device),
                           ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
    return loss


def double_heads_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """GPT2DoubleHeadsModel's own shift: the last position's logits are dropped, in logits' dtype."""
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels.to(logits.device)[..., 1:].contiguous()
    return F.cross_entropy(shift_logits.view(-1, shift_logits.shape[-1]), shift_labels.view(-1))


def sequence_problem_type(labels: Any, num_labels: int, problem_type: str | None) -> str:
    """config.problem_type, or when unset the one transformers infers: regression for one label,
    single-label classification for int64 or int32 labels, multi-label otherwise."""
    if problem_type is not None:
        return problem_type
    if num_labels == 1:
        return "regression"
    if getattr(labels, "dtype", None) in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def sequence_classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_labels: int, problem_type: str
) -> torch.Tensor:
    """MSE, cross-entropy or BCE-with-logits, by problem type (labels as heads.labels checked them)."""
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(), labels.squeeze()) if num_labels == 1 else F.mse_loss(logits, labels)
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)


def question_answering_loss(
    start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor
) -> torch.Tensor:
    """Mean of the start and end cross-entropies; positions outside the sequence are clamped to its
    length and ignored."""
    if start_positions.dim() > 1:
        start_positions = start_positions.squeeze(-1)
    if end_positions.dim() > 1:
        end_positions = end_positions.squeeze(-1)
    ignored = start_logits.shape[1]
    start_positions = start_positions.to(start_logits.device).clamp(0, ignored)
    end_positions = end_positions.to(end_logits.device).clamp(0, ignored)
    start = F.cross_entropy(start_logits, start_positions, ignore_index=ignored)
    end = F.cross_entropy(end_logits, end_positions, ignore_index=ignored)
    return (start + end) / 2
