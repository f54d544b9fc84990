"""Continuous batching over the engine's own cache: sequences join a running decode batch at any
step and leave when they finish, each in a row of its own.

A prompt joins by a prefill into a scratch cache of one row, copied into free rows of the engine's
cache (several rows for several samples of one prompt); the running rows keep their state. A step
decodes rows 0 .. top (the highest row in use) as one batch, so the weights are read once for every
sequence; free rows inside that range compute a throwaway token and are reset after the step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .engine import Engine
from .inputs import check_range


class ContinuousBatch:
    """The rows of `engine.cache`, each free or holding one sequence, with each row's length kept
    on the host so that no row is ever stepped past max_seq. It owns the engine's cache: it resets
    it when made, and the engine's prefill and decode must not be called on it meanwhile."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cache = engine.cache
        engine.reset()
        self.lengths: list[int | None] = [None] * self.cache.max_batch  # None: the row is free
        self._scratch = engine.new_cache(1, 64)

    @property
    def max_seq(self) -> int:
        return self.cache.max_seq

    @property
    def free_rows(self) -> list[int]:
        return [row for row, length in enumerate(self.lengths) if length is None]

    @property
    def active_rows(self) -> list[int]:
        return [row for row, length in enumerate(self.lengths) if length is not None]

    def room(self, row: int) -> int:
        """How many more tokens row `row` can take."""
        length = self.lengths[row]
        if length is None:
            raise ValueError(f"row {row} is free")
        return self.max_seq - length

    def join(self, prompt: Sequence[int] | torch.Tensor, copies: int = 1) -> tuple[list[int], torch.Tensor]:
        """Prefill `prompt` (token ids) into `copies` free rows, the lowest ones. Returns the rows and
        the logits [V] that follow the prompt (the first new token is drawn from them)."""
        ids = torch.as_tensor(prompt, dtype=torch.int64).reshape(1, -1).to(self.engine.device)
        if ids.shape[1] == 0 or ids.shape[1] > self.max_seq:
            raise ValueError(f"a prompt of {ids.shape[1]} tokens does not fit rows of max_seq={self.max_seq} slots")
        check_range("prompt", ids, self.engine.config.vocab_size)
        free = self.free_rows
        if not 1 <= copies <= len(free):
            raise ValueError(f"{copies} rows asked for, {len(free)} free")
        rows = free[:copies]
        logits = self.engine.prefill(ids, cache=self._scratch).logits[0]
        for row in rows:
            self.cache.copy_row(self._scratch, 0, row, ids.shape[1])
            self.lengths[row] = ids.shape[1]
        return rows, logits

    def step(self, tokens: dict[int, int]) -> dict[int, torch.Tensor]:
        """Append tokens[row] to every row in use (each must have room); returns each row's next
        logits [V]. One decode of rows 0 .. top, then free rows are reset."""
        active = self.active_rows
        if sorted(tokens) != active:
            raise ValueError(f"step takes one token for each row in use {active}, got rows {sorted(tokens)}")
        full = [row for row in active if self.room(row) < 1]
        if full:
            raise ValueError(f"rows {full} are full (max_seq={self.max_seq}); they must leave before another step")
        ids = torch.zeros(active[-1] + 1, dtype=torch.int64)
        ids[active] = torch.tensor([tokens[row] for row in active])
        check_range("tokens", ids, self.engine.config.vocab_size)
        logits = self.engine.decode_rows(ids.to(self.engine.device), check_ids=False).logits
        for row in active:
            self.lengths[row] += 1
        self.cache.reset_rows(self.free_rows)
        return {row: logits[row] for row in active}

    def leave(self, rows: Sequence[int]) -> None:
        """Free the rows at once; the others keep their state."""
        for row in rows:
            if self.lengths[row] is None:
                raise ValueError(f"row {row} is already free")
            self.lengths[row] = None
        self.cache.reset_rows(list(rows))
