"""The KV cache a step reads and writes: preallocated storage plus the per-row state of its requests."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# A cache that may grow adds slots in steps of this many (and at least doubles), so a generation
# reallocates a few times, not every token.
SLOT_GRANULE = 64
# Counters for kernels whose programs count each other's arrival, beyond one per (row, head) for
# decode attention: split-K column tiles and the fused MLP's (a few hundred at gpt2-xl's widths).
SEMAPHORES_BEYOND_HEADS = 4096


class StaticKVCache:
    """K and V for every layer, [n_layer, rows, n_head, slots, head_dim], plus per-row state on the
    device so one captured step serves every position:

    - key_mask [rows, slots] int32: 1 where a slot holds a real token (padding stays 0);
    - lengths [rows]: slots used in each row, where the next token is written;
    - next_position [rows]: the position id of each row's next real token;
    - semaphores: int32 counters, zero between kernels, that the step's kernels arrive on (owned by
      the cache so that steps on different caches never share them).

    Rows advance together (a batch is prefilled and decoded as one), so the host knows how many
    slots are used without reading the device: `used`. The engine's own cache is static: its
    storage never moves, which captured graphs need. A cache made with `growable=True` reallocates
    more slots (up to `max_seq`) or rows when a request needs them, for callers that hold many
    caches at once and cannot size each for the longest request up front.
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
        slots: int | None = None,
        growable: bool = False,
    ) -> None:
        if max_batch < 1 or max_seq < 1:
            raise ValueError(f"cache size max_batch={max_batch}, max_seq={max_seq} must be positive")
        slots = max_seq if slots is None else min(max(slots, 1), max_seq)
        self.keys = torch.zeros(n_layer, max_batch, n_head, slots, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.key_mask = torch.zeros(max_batch, slots, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.next_position = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.semaphores = _semaphores(max_batch, n_head, device)
        self.max_seq = max_seq
        self.growable = growable
        self.used = 0
        self.batch = 0
        self.epoch = 0

    @property
    def max_batch(self) -> int:
        return self.keys.shape[1]

    @property
    def slots(self) -> int:
        return self.keys.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

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
        `reset`), before anything is written; ValueError otherwise. A growable cache then makes room."""
        used = 0 if reset else self.used
        if batch > self.max_batch and not self.growable:
            raise ValueError(f"batch {batch} is larger than the cache's max_batch={self.max_batch}")
        if used and batch != self.batch:
            raise ValueError(
                f"batch {batch} does not match the {self.batch} rows already in the cache; reset it for a new request"
            )
        if used + new_tokens > self.max_seq:
            raise ValueError(
                f"{new_tokens} new tokens after {used} cached ones exceed the cache's max_seq={self.max_seq}"
            )
        needed = used + new_tokens
        if needed > self.slots or batch > self.max_batch:
            if not self.growable:
                raise ValueError(f"{new_tokens} new tokens after {used} cached ones exceed the cache's {self.slots} slots")
            slots = self.slots
            if needed > slots:
                slots = min(self.max_seq, max(-(-needed // SLOT_GRANULE) * SLOT_GRANULE, 2 * slots))
            self._reallocate(max(batch, self.max_batch), slots)

    def advance(self, batch: int, new_tokens: int) -> None:
        self.batch = batch
        self.used += new_tokens

    def crop(self, length: int) -> None:
        """Keep the first `length` slots of every row."""
        if not 0 <= length <= self.used:
            raise ValueError(f"cannot crop a cache holding {self.used} tokens to {length}")
        self.key_mask[:, length:] = 0
        self.lengths.fill_(length)
        self.next_position.copy_(self.key_mask.sum(-1))
        self.used = length
        self.epoch += 1

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the given rows, in that order (repeats allowed): beam reordering, dropping finished
        requests, expanding a prompt to several candidates."""
        rows = torch.as_tensor(rows, dtype=torch.int64, device=self.device).reshape(-1)
        if rows.numel() == 0:
            raise ValueError("select_rows needs at least one row")
        if self.batch and (int(rows.min()) < 0 or int(rows.max()) >= self.batch):
            raise ValueError(f"row indices {rows.tolist()[:8]} are outside the cache's {self.batch} rows")
        if rows.numel() > self.max_batch:
            self._reallocate(rows.numel(), self.slots)
        count = rows.numel()
        for name in ("keys", "values"):
            stored = getattr(self, name)
            stored[:, :count] = stored.index_select(1, rows)
        for name in ("key_mask", "lengths", "next_position"):
            stored = getattr(self, name)
            stored[:count] = stored.index_select(0, rows)
        self.batch = count
        self.epoch += 1

    def reset_rows(self, rows: list[int] | torch.Tensor) -> None:
        """Forget the given rows only; every other row keeps its tokens and state (continuous
        batching frees a finished request's row while the others decode on). `used` and `batch`,
        which describe rows that advance together, are left to the caller."""
        index = torch.as_tensor(rows, dtype=torch.int64, device=self.device).reshape(-1)
        if index.numel() == 0:
            return
        self.key_mask.index_fill_(0, index, 0)
        self.lengths.index_fill_(0, index, 0)
        self.next_position.index_fill_(0, index, 0)

    def copy_row(self, source: StaticKVCache, source_row: int, row: int, length: int) -> None:
        """Make `row` hold what `source_row` of `source` holds in its first `length` slots (K, V,
        the key mask, its length and next position), replacing whatever the row held."""
        self.copy_rows(source, [source_row], [row], [length])

    def copy_rows(self, source: StaticKVCache, source_rows: Sequence[int], rows: Sequence[int], lengths: Sequence[int]) -> None:
        """copy_row for several rows at once: rows[i] holds the first lengths[i] slots of
        source_rows[i], and its length becomes lengths[i]. A source row must hold no real token past
        its length (a right-padded prefill's padding may follow: it is not copied as real)."""
        if not len(source_rows) == len(rows) == len(lengths):
            raise ValueError(f"{len(source_rows)} source rows, {len(rows)} rows and {len(lengths)} lengths must match")
        if not rows:
            return
        if len(set(rows)) != len(rows):
            raise ValueError(f"rows {list(rows)} name a row twice")
        outside = [(s, r) for s, r in zip(source_rows, rows) if not (0 <= r < self.max_batch and 0 <= s < source.max_batch)]
        if outside:
            raise ValueError(f"row {outside[0][1]} or source row {outside[0][0]} is outside the caches' {self.max_batch} and {source.max_batch} rows")
        if not all(0 < length <= min(self.slots, source.slots) for length in lengths):
            raise ValueError(f"cannot copy {list(lengths)} slots between caches of {source.slots} and {self.slots} slots")
        span = max(lengths)
        source_index = torch.as_tensor(source_rows, dtype=torch.int64, device=self.device)
        index = torch.as_tensor(rows, dtype=torch.int64, device=self.device)
        # Slots from a row's length up to the longest are copied too, but masked out: as after a reset,
        # their stale K and V are hidden, and the row's next token overwrites the first of them.
        # index_select and index_copy_: on a CPU, advanced indexing took 2.6x as long for a 16-prompt join's rows.
        for mine, theirs in ((self.keys, source.keys), (self.values, source.values)):
            mine[:, :, :, :span].index_copy_(1, index, theirs[:, :, :, :span].index_select(1, source_index))
        kept = torch.arange(span, device=self.device) < torch.as_tensor(lengths, device=self.device)[:, None]
        self.key_mask.index_fill_(0, index, 0)
        self.key_mask[index, :span] = source.key_mask[source_index, :span] * kept
        self.lengths[index] = torch.as_tensor(lengths, dtype=torch.int64, device=self.device)
        self.next_position[index] = source.next_position[source_index]

    def _reallocate(self, rows: int, slots: int) -> None:
        layers, _, heads, _, head_dim = self.keys.shape
        kept_rows, kept_slots = min(rows, self.max_batch), min(slots, self.slots)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.zeros(layers, rows, heads, slots, head_dim, dtype=old.dtype, device=old.device)
            new[:, :kept_rows, :, :kept_slots] = old[:, :kept_rows, :, :kept_slots]
            setattr(self, name, new)
        mask = torch.zeros(rows, slots, dtype=torch.int32, device=self.device)
        mask[:kept_rows, :kept_slots] = self.key_mask[:kept_rows, :kept_slots]
        self.key_mask = mask
        for name in ("lengths", "next_position"):
            new = torch.zeros(rows, dtype=torch.int64, device=self.device)
            new[:kept_rows] = getattr(self, name)[:kept_rows]
            setattr(self, name, new)
        self.semaphores = _semaphores(rows, heads, self.device)


def _semaphores(rows: int, heads: int, device: torch.device | str) -> torch.Tensor:
    return torch.zeros(rows * heads + SEMAPHORES_BEYOND_HEADS, dtype=torch.int32, device=device)
