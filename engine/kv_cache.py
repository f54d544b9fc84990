"""The static KV cache: preallocated once, reused by every request, never reallocated."""

from __future__ import annotations

import torch


class StaticKVCache:
    """K and V for every layer, [n_layer, max_batch, n_head, max_seq, head_dim], plus per-row state
    on the device so one captured step serves every position:

    - key_mask [max_batch, max_seq] int32: 1 where a slot holds a real token (padding stays 0);
    - lengths [max_batch]: slots used in each row, where the next token is written;
    - next_position [max_batch]: the position id of each row's next real token.

    Rows advance together (a batch is prefilled and decoded as one), so the host knows how many
    slots are used without reading the device: `used`.
    """

    def __init__(
        self,
        n_layer: int,
        max_batch: int,
        n_head: int,
        max_seq: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if max_batch < 1 or max_seq < 1:
            raise ValueError(f"cache size max_batch={max_batch}, max_seq={max_seq} must be positive")
        shape = (n_layer, max_batch, n_head, max_seq, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask = torch.zeros(max_batch, max_seq, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.next_position = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.max_batch, self.max_seq = max_batch, max_seq
        self.used = 0
        self.batch = 0
        self.epoch = 0

    def reset(self) -> None:
        """Forget every request. K and V keep stale values, which the zeroed key_mask hides."""
        self.key_mask.zero_()
        self.lengths.zero_()
        self.next_position.zero_()
        self.used = 0
        self.batch = 0
        self.epoch += 1

    def reserve(self, batch: int, new_tokens: int, *, reset: bool = False) -> None:
        """Check that `new_tokens` more slots fit for a batch of `batch` rows (after a reset, when
        `reset`), before anything is written; ValueError otherwise."""
        used = 0 if reset else self.used
        if batch > self.max_batch:
            raise ValueError(f"batch {batch} is larger than the cache's max_batch={self.max_batch}")
        if used and batch != self.batch:
            raise ValueError(
                f"batch {batch} does not match the {self.batch} rows already in the cache; reset it for a new request"
            )
        if used + new_tokens > self.max_seq:
            raise ValueError(
                f"{new_tokens} new tokens after {used} cached ones exceed the cache's max_seq={self.max_seq}"
            )

    def advance(self, batch: int, new_tokens: int) -> None:
        self.batch = batch
        self.used += new_tokens
