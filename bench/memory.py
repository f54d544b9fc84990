"""Peak device memory of the benchmark on one model and dtype, by arithmetic, before a GPU is there to
run out of it.

The suite keeps the model's weights; every runner sizes its cache to the workload at hand and frees
it after each timing call (bench/runners.py), so no two runners' caches, nor two workloads' caches,
are held at once. The peak is then the weights plus the largest that one runner needs for one
workload: its KV cache, the activations of the prompt's forward, and (transformers eager) one
layer's attention scores and probabilities.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .model_shapes import ModelShape
from .suite import Workload

# Activations live at once during a forward, in rows of n_embd per token: the residual stream, the
# LayerNorm output, Q, K and V, the attention output, the MLP's 4 * n_embd and GELU's temporaries
# (transformers' gelu_new makes several of those). Generous on purpose.
ACTIVATION_ROWS = 16


def weights_bytes(shape: ModelShape, element: int) -> int:
    c = shape.n_embd
    return (shape.n_layer * (12 * c * c + 13 * c) + (shape.vocab_size + shape.n_positions) * c + 2 * c) * element


def kv_cache_bytes(shape: ModelShape, batch: int, tokens: int, element: int) -> int:
    return 2 * shape.n_layer * batch * tokens * shape.n_embd * element


def activation_bytes(shape: ModelShape, batch: int, tokens: int, element: int) -> int:
    return ACTIVATION_ROWS * batch * tokens * shape.n_embd * element + 2 * batch * shape.vocab_size * element


def eager_scores_bytes(shape: ModelShape, batch: int, tokens: int, element: int) -> int:
    """One layer's attention scores and their softmax, [batch, n_head, tokens, tokens] each."""
    return 2 * batch * shape.n_head * tokens * tokens * element


def runner_bytes(impl: str, shape: ModelShape, work: Workload, element: int) -> int:
    """What one runner allocates beyond the weights for one workload. Every cache holds the
    workload's tokens (transformers' dynamic cache grows to them; the static caches and tritongpt2's
    engines are made that size)."""
    tokens = work.tokens
    needed = kv_cache_bytes(shape, work.batch, tokens, element) + activation_bytes(shape, work.batch, tokens, element)
    if impl == "hf-eager":
        needed += eager_scores_bytes(shape, work.batch, tokens, element)
    return needed


def peak_bytes(shape: ModelShape, dtype: torch.dtype, workloads: Iterable[Workload], impls: Iterable[str]) -> int:
    """Estimated peak bytes of the suite on one model and dtype."""
    element = dtype.itemsize
    transient = max(runner_bytes(impl, shape, work, element) for work in workloads for impl in impls)
    return weights_bytes(shape, element) + transient
