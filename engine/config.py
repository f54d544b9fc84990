"""GPT2Config: every field of transformers' GPT2Config, with the same defaults, read from config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritongpt2.kernels.activations import activation_formula

# transformers' attribute_map: the generic names of the same fields.
ALIASES = {
    "hidden_size": "n_embd",
    "max_position_embeddings": "n_positions",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
}


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    summary_type: str = "cls_index"
    summary_use_proj: bool = True
    summary_activation: str | None = None
    summary_proj_to_labels: bool = True
    summary_first_dropout: float = 0.1
    scale_attn_weights: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    # Fields of transformers' PretrainedConfig that GPT-2 heads read: the defaults of a forward's flags, labels.
    output_hidden_states: bool = False
    output_attentions: bool = False
    return_dict: bool = True
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    problem_type: str | None = None
    architectures: list[str] | None = None
    # Everything else config.json holds, kept so that nothing is lost on a round trip.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id2label, dict):
            raise ValueError(f"config id2label={self.id2label!r} must be a mapping of label ids to names")
        try:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
        except (TypeError, ValueError):
            raise ValueError(f"config id2label has keys that are not integers: {sorted(map(repr, self.id2label))[:5]}") from None
        if not all(isinstance(label, str) for label in self.id2label.values()):
            raise ValueError(f"config id2label={self.id2label!r} must map label ids to names (strings)")
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"config {name}={value!r} must be a positive integer")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "initializer_range"):
            if not _is_number(getattr(self, name)):
                raise ValueError(f"config {name}={getattr(self, name)!r} must be a number")
        if not _is_number(self.layer_norm_epsilon) or not 0 < self.layer_norm_epsilon < float("inf"):
            raise ValueError(f"config layer_norm_epsilon={self.layer_norm_epsilon!r} must be a positive number")
        for name in ("summary_use_proj", "summary_proj_to_labels", "scale_attn_weights", "use_cache",
                     "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention",
                     "tie_word_embeddings", "output_hidden_states", "output_attentions", "return_dict"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config {name}={getattr(self, name)!r} must be true or false")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"config {name}={value!r} must be a non-negative integer or null")
        eos = self.eos_token_id
        if eos is not None and not (_is_int(eos) and eos >= 0) and not (
            isinstance(eos, list) and all(_is_int(e) and e >= 0 for e in eos)
        ):
            raise ValueError(f"config eos_token_id={eos!r} must be a non-negative integer, a list of them, or null")
        if not isinstance(self.activation_function, str):
            raise ValueError(f"config activation_function={self.activation_function!r} must be a string")
        if not isinstance(self.summary_type, str):
            raise ValueError(f"config summary_type={self.summary_type!r} must be a string")
        if self.summary_activation is not None and not isinstance(self.summary_activation, str):
            raise ValueError(f"config summary_activation={self.summary_activation!r} must be a string or null")
        if self.n_embd % self.n_head:
            raise ValueError(f"config n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_inner is not None and (not _is_int(self.n_inner) or self.n_inner < 1):
            raise ValueError(f"config n_inner={self.n_inner!r} must be a positive integer or None")
        activation_formula(self.activation_function)
        if self.add_cross_attention:
            raise ValueError("config add_cross_attention=True (GPT-2 as a decoder with cross-attention) is not supported")
        if self.problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            raise ValueError(f"config problem_type={self.problem_type!r} is not one of transformers' problem types")
        if self.architectures is not None and not (
            isinstance(self.architectures, list) and all(isinstance(name, str) for name in self.architectures)
        ):
            raise ValueError(f"config architectures={self.architectures!r} must be a list of class names or null")

    @property
    def inner_size(self) -> int:
        """n_inner, or 4 * n_embd when n_inner is None, as GPT2MLP does."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in self.id2label.items()}

    def attention_scale(self, layer_idx: int) -> float:
        """The factor on q.k in layer `layer_idx` (from 0): 1/sqrt(head_dim) when scale_attn_weights,
        further divided by layer_idx + 1 when scale_attn_by_inverse_layer_idx."""
        scale = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        return scale

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPT2Config:
        values = dict(values)
        for alias, name in ALIASES.items():
            if alias in values:
                values.setdefault(name, values.pop(alias))
        if "num_labels" in values and "id2label" not in values:
            count = values.pop("num_labels")
            if not _is_int(count) or count < 0:
                raise ValueError(f"config num_labels={count!r} must be a non-negative integer")
            values["id2label"] = {i: f"LABEL_{i}" for i in range(count)}
        values.pop("label2id", None)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: values.pop(k) for k in list(values) if k not in known}
        return cls(**values, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | Path) -> GPT2Config:
        """ValueError naming the file and the field at fault."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"no config.json at {path}") from None
        except OSError as error:
            raise ValueError(f"{path} could not be read: {error.strerror or error}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} holds a JSON {type(values).__name__}, not an object of config fields")
        model_type = values.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"{path} is a {model_type!r} config, not a GPT-2 ('gpt2') one")
        try:
            return cls.from_dict(values)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **values, "model_type": "gpt2"}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in ALIASES:
            return getattr(self, ALIASES[name])
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
