"""GPT2DoubleHeadsModel's multiple-choice head: transformers' SequenceSummary, every option."""

from __future__ import annotations

import torch
from torch import nn

from tritongpt2.engine.config import GPT2Config
from tritongpt2.kernels.activations import activation_formula
from tritongpt2.kernels.reference import apply_activation

SUMMARY_TYPES = ("last", "first", "mean", "cls_index")


class SequenceSummary(nn.Module):
    """One vector per sequence from hidden states [B, ..., T, C]: the last, first or mean along
    dimension 1, or the token at cls_index; then an optional projection (to num_labels or to C) and activation. The
    dropouts are identity at inference."""

    def __init__(self, config: GPT2Config, num_labels: int = 1) -> None:
        super().__init__()
        if config.summary_type not in SUMMARY_TYPES:
            raise ValueError(f"summary_type={config.summary_type!r} is not supported; use one of {SUMMARY_TYPES}")
        self.summary_type = config.summary_type
        self.summary: nn.Module = nn.Identity()
        if config.summary_use_proj:
            classes = num_labels if config.summary_proj_to_labels and num_labels > 0 else config.n_embd
            self.summary = nn.Linear(config.n_embd, classes)
        self.activation_name = config.summary_activation
        if self.activation_name:
            activation_formula(self.activation_name)

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
        if self.activation_name:
            output = apply_activation(output, self.activation_name)
        return output
