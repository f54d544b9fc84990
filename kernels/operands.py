"""What the backends' ops pass between them besides plain tensors. No triton here: the torch backend
and the engine import this without the kernels.

- `Residual`: the residual stream x [..., C] with its row moments [..., blocks, 3] float32, each block
  a (count, mean, M2) of a run of the row's columns. Whatever writes x (the embedding, a c_proj)
  computes them from the values it stores, so a LayerNorm consumer merges a few numbers per row
  instead of reading the whole row once more. The torch backend has no use for them: None.
- `CacheAccess`: where a step's tokens are written in the KV cache and which slots each of them
  sees (the causal bound and the key mask); made once per step by the backend's `cache_access`, so
  a backend can precompute its own form of it once for every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

MOMENT_FIELDS = 3  # count, mean, M2 (the sum of squared deviations from the block's mean)


class Residual(NamedTuple):
    values: torch.Tensor  # [..., C]
    moments: torch.Tensor | None = None  # [..., blocks, 3] float32

    def rows(self, index: Any) -> Residual:
        """The same rows of the values and of their moments: x[index] for an index over the leading dims."""
        return Residual(self.values[index], None if self.moments is None else self.moments[index])


@dataclass(frozen=True)
class CacheAccess:
    """Token t of row b is written at slot slots[b, t] (slots outside the cache are dropped); as a
    query it sits at slot query_start[b] + t and sees slot j when j <= its slot and key_mask[b, j]
    != 0. `prepared` is a backend's own precomputed form of the same, if it keeps one. `semaphores`,
    zeroed int32 counters owned by the cache, serve kernels whose programs count each other's arrival
    (split-K products, decode attention); kernels given none allocate their own."""

    slots: torch.Tensor  # [B, T] int
    query_start: torch.Tensor  # [B] int
    key_mask: torch.Tensor  # [B_cache, S] int32
    prepared: Any = None
    semaphores: torch.Tensor | None = None

    @property
    def queries(self) -> int:
        return self.slots.shape[1]
