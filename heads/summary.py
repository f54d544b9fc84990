"""GPT2DoubleHeadsModel's multiple-choice head: transformers' SequenceSummary, every option."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tritongpt2.engine.config import GPT2Config

SUMMARY_TYPES = ("last", "first", "mean", "cls_index")


class SequenceSummary(nn.Module):
    """One vector per sequence from hidden states [B, ..., T, C]: the last, first or mean along
    dimension 1, or the token at cls_index; then an optional projection (to num_labels or to C) and activation. The
    dropouts are identity at inference."""

    def __init__(self, config: GPT2Config, activation: Callable[[str], Callable], num_labels: int = 1) -> None:
        """activation(name) gives the function for an ACT2FN name (the engine's `activation`)."""
        super().__init__()
        if config.summary_type not in SUMMARY_TYPES:
            raise ValueError(f"summary_type={config.summary_type!r} is not supported; use one of {SUMMARY_TYPES}")
        self.summary_type = config.summary_type
        self.summary: nn.Module = nn.Identity()
        if config.summary_use_proj:
            classes = num_labels if config.summary_proj_to_labels and num_labels > 0 else config.n_embd
            self.summary = nn.Linear(config.n_embd, classes)
        self.activation = activation(config.summary_activation) if config.summary_activation else None

    def forward(self, hidden_states: torch.Tensor, cls_index: torch.Tensor | None = None) -> torch.Tensor:
        # As transformers indexes: dimension 1, which for DoubleHeads' [B, choices, T, C] is the choice.
        if self.summary_type == "last":
            output = hidden_states[:, -1]
        elif self.summary_type == "first":
            output = hidden_states[:, 0]
        elif self.summary_type == "mean":
            output = hidden_states.mean(dim=1)
        else:
            if cls_index is None:
                cls_index = torch.full_like(hidden_states[..., :1, :], hidden_states.shape[-2] - 1, dtype=torch.long)
            else:
                cls_index = cls_index.unsqueeze(-1).unsqueeze(-1)
                cls_index = cls_index.expand((-1,) * (cls_index.dim() - 1) + (hidden_states.shape[-1],))
            output = hidden_states.gather(-2, cls_index).squeeze(-2)
        output = self.summary(output)
        if self.activation is not None:
            output = self.activation(output)
        return output
