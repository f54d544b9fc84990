"""Continuous batching over the engine's own cache: sequences join a running decode batch at any
step and leave when they finish, each in a row of its own.

Prompts that join together are prefilled as one batch, right-padded to the longest, into a scratch
cache; each prompt's row is then copied into free rows of the engine's cache (several rows for
several samples of one prompt), and the running rows keep their state. A step decodes rows 0 .. top
(the highest row in use) as one batch, so the weights are read once for every sequence; free rows
inside that range compute a throwaway token and are reset after the step.
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
        return self.join_many([prompt], [copies])[0]

    def join_many(
        self, prompts: Sequence[Sequence[int] | torch.Tensor], copies: Sequence[int] | None = None
    ) -> list[tuple[list[int], torch.Tensor]]:
        """Prefill the prompts together, as one right-padded batch, each into copies[i] free rows (the
        lowest ones, in the prompts' order). Returns each prompt's rows and the logits [V] that follow it."""
        copies = [1] * len(prompts) if copies is None else list(copies)
        if not prompts or len(copies) != len(prompts):
            raise ValueError(f"join_many takes one or more prompts and a count of copies for each, got {len(prompts)} and {len(copies)}")
        ids = [self._prompt_ids(prompt) for prompt in prompts]
        free = self.free_rows
        if min(copies) < 1:
            raise ValueError(f"each prompt needs at least one row, got copies {copies}")
        if sum(copies) > len(free):
            raise ValueError(f"{sum(copies)} rows asked for, {len(free)} free")
        lengths = [len(prompt) for prompt in ids]
        padded = torch.zeros(len(ids), max(lengths), dtype=torch.int64)
        mask = torch.zeros(len(ids), max(lengths), dtype=torch.int32)
        for i, prompt in enumerate(ids):
            padded[i, :lengths[i]] = prompt
            mask[i, :lengths[i]] = 1
        device = self.engine.device
        logits = self.engine.prefill(padded.to(device), mask.to(device), cache=self._scratch).logits
        sources = [i for i, count in enumerate(copies) for _ in range(count)]
        rows = free[:len(sources)]
        self.cache.copy_rows(self._scratch, sources, rows, [lengths[i] for i in sources])
        for row, source in zip(rows, sources):
            self.lengths[row] = lengths[source]
        rows_of = [[row for row, source in zip(rows, sources) if source == i] for i in range(len(ids))]
        return [(prompt_rows, logits[i]) for i, prompt_rows in enumerate(rows_of)]

    def _prompt_ids(self, prompt: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(prompt, dtype=torch.int64).reshape(-1)
        if ids.shape[0] == 0 or ids.shape[0] > self.max_seq:
            raise ValueError(f"a prompt of {ids.shape[0]} tokens does not fit rows of max_seq={self.max_seq} slots")
        check_range("prompt", ids, self.engine.config.vocab_size)
        return ids

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
