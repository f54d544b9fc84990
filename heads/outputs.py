"""Model outputs named as transformers names them, with transformers' ModelOutput semantics.

As in transformers: an ordered mapping of the fields that are not None (iteration yields their
names, `in` tests them, `keys()` lists them), indexable by name or by position among them, with
`to_tuple()`. The cache field is `past_key_values`, also reachable as `cache` (transformers 5's name).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

import torch

CACHE_ALIASES = {"cache": "past_key_values"}


class ModelOutput(OrderedDict):
    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                super().__setitem__(field.name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        name = CACHE_ALIASES.get(name, name)
        super().__setattr__(name, value)
        if name in {f.name for f in fields(self)}:
            if value is None:
                super().pop(name, None)
            else:
                super().__setitem__(name, value)

    def __getattr__(self, name: str) -> Any:
        if name in CACHE_ALIASES:
            return getattr(self, CACHE_ALIASES[name])
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            return super().__getitem__(CACHE_ALIASES.get(key, key))
        return self.to_tuple()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return super().__contains__(CACHE_ALIASES.get(key, key) if isinstance(key, str) else key)

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(OrderedDict.__getitem__(self, k) for k in self.keys())

    def __reduce__(self):
        return type(self), tuple(getattr(self, f.name) for f in fields(self))


@dataclass(eq=False)
class BaseModelOutputWithPastAndCrossAttentions(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass(eq=False)
class CausalLMOutputWithCrossAttentions(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass(eq=False)
class GPT2DoubleHeadsModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    mc_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mc_logits: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass(eq=False)
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass(eq=False)
class TokenClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass(eq=False)
class QuestionAnsweringModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def as_transformers_output(output: ModelOutput) -> Any:
    """The same fields in transformers' own output class of that name (for an accelerated model)."""
    import transformers.modeling_outputs as outputs

    if type(output).__name__ == "GPT2DoubleHeadsModelOutput":
        from transformers.models.gpt2.modeling_gpt2 import GPT2DoubleHeadsModelOutput as cls
    else:
        cls = getattr(outputs, type(output).__name__)
    names = {f.name for f in fields(cls)}
    values = {f.name: getattr(output, f.name) for f in fields(output)}
    if "past_key_values" not in names and "cache" in names:
        values["cache"] = values.pop("past_key_values", None)
    return cls(**{k: v for k, v in values.items() if k in names})
