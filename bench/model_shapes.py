"""The shapes of the GPT-2 family, for audits and benchmarks on random weights."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_embd: int
    n_head: int
    n_layer: int
    vocab_size: int = 50257
    n_positions: int = 1024

    @property
    def n_inner(self) -> int:
        return 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


MODEL_SHAPES = {
    shape.name: shape
    for shape in (
        ModelShape("distilgpt2", 768, 12, 6),
        ModelShape("gpt2", 768, 12, 12),
        ModelShape("gpt2-medium", 1024, 16, 24),
        ModelShape("gpt2-large", 1280, 20, 36),
        ModelShape("gpt2-xl", 1600, 25, 48),
    )
}


def model_shape(name: str) -> ModelShape:
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_SHAPES)}")
    return MODEL_SHAPES[name]
