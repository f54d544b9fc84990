"""The engine's worker: one thread owns the engine, runs every completion in one continuous batch
and embeds concurrent requests together. HTTP handlers submit jobs from any thread and get events
back through the job's `emit`; nothing here knows about HTTP.

Each loop: take new jobs, free the rows of cancelled ones, run one embedding batch if any wait,
let waiting completions join free rows (their prompts prefilled together, as one batch), then one
decode step for every running row. A finished, stopped or cancelled row is freed before the next step.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from tritongpt2.embedder import SMALLEST_LENGTH, Embedder
from tritongpt2.engine.continuous import ContinuousBatch
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.generation import SamplingParams, draw_tokens, filter_logits
from tritongpt2.engine.graphs import bucket
from tritongpt2.engine.tokenizer import GPT2Tokenizer

from .text import TextStream

log = logging.getLogger("tritongpt2.serve")
# Prompts that join at the same step are prefilled as one batch padded to the longest, of at most
# this many tokens (a longer prompt still joins, alone).
JOIN_TOKEN_BUDGET = 4096
Emit = Callable[[tuple], None]


class QueueFull(Exception):
    """More requests are waiting than the server's queue holds."""


class Job:
    """Events it emits, from the worker thread: ("token", choice index, new text, finish reason or
    None) per generated token, then ("done", usage); ("embeddings", [N, n_embd] array);
    ("cancelled",) once its rows are freed after `cancel`; ("error", HTTP status, message)."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.cancelled = False

    def cancel(self) -> None:
        """Stop the job; the worker frees its rows before its next step (a flag: safe from any thread)."""
        self.cancelled = True


@dataclass
class Choice:
    index: int
    text: TextStream
    generator: torch.Generator | None
    row: int | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class CompletionJob(Job):
    """n choices for each prompt (token ids, already checked to fit the model with max_tokens)."""

    def __init__(self, prompts: list[list[int]], *, n: int, max_tokens: int, params: SamplingParams,
                 seed: int | None, stop: list[str], tokenizer: GPT2Tokenizer, device: torch.device, emit: Emit) -> None:
        super().__init__(emit)
        self.prompts, self.n, self.max_tokens, self.params = prompts, n, max_tokens, params
        base = seed if seed is not None else secrets.randbits(62)
        self.choices = [
            Choice(i, TextStream(tokenizer, stop),
                   torch.Generator(device=device).manual_seed(base + i) if params.do_sample else None)
            for i in range(len(prompts) * n)
        ]
        self.joined = 0  # prompts whose choices hold rows (or have finished)

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class EmbeddingJob(Job):
    def __init__(self, inputs: list[list[int]], emit: Emit, dimension: int) -> None:
        super().__init__(emit)
        self.inputs = inputs
        self.vectors = np.empty((len(inputs), dimension), dtype=np.float32)
        self.remaining = len(inputs)


class Scheduler:
    def __init__(self, engine: Engine, tokenizer: GPT2Tokenizer, *, pooling: str = "mean", normalize: bool = False,
                 max_queue: int = 256, embed_token_budget: int = 4096,
                 on_tokens: Callable[[int], None] | None = None) -> None:
        if max_queue < 0 or embed_token_budget < 1:
            raise ValueError(f"max_queue={max_queue} must be >= 0 and embed_token_budget={embed_token_budget} positive")
        self.engine, self.tokenizer = engine, tokenizer
        self.embedder = Embedder(engine, tokenizer, pooling=pooling, normalize=normalize)
        self.max_queue, self.embed_token_budget = max_queue, embed_token_budget
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else engine.config.eos_token_id
        self.eos_token_ids = set() if eos is None else {eos}
        self.on_tokens = on_tokens or (lambda count: None)
        self.batch = ContinuousBatch(engine)
        self._embed_cache = engine.new_cache(1, SMALLEST_LENGTH)
        self._incoming: queue.Queue[Job | None] = queue.Queue()
        self._waiting: deque[CompletionJob] = deque()  # prompts still to join, in arrival order
        self._running: list[CompletionJob] = []
        self._embeds: deque[tuple[EmbeddingJob, int]] = deque()
        self._queued = 0  # submitted jobs not yet fully started
        self._queued_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def running_rows(self) -> int:
        return self.batch.cache.max_batch - len(self.batch.free_rows)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tritongpt2-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._incoming.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull when max_queue jobs are already waiting."""
        with self._queued_lock:
            if self._queued >= self.max_queue or self._stopping.is_set():
                raise QueueFull(f"{self._queued} requests are waiting (the queue holds {self.max_queue})")
            self._queued += 1
        self._incoming.put(job)

    def _started(self) -> None:
        with self._queued_lock:
            self._queued -= 1

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._receive(block=not (self._waiting or self._running or self._embeds))
                self._drop_cancelled()
                self._embed_next_batch()
                self._admit()
                self._decode()
            except Exception as error:  # noqa: BLE001 - a failing step fails its requests, never hangs them
                log.exception("engine step failed")
                self._fail_all(500, f"the engine failed: {type(error).__name__}: {error}")
                self.batch = ContinuousBatch(self.engine)
        self._fail_all(503, "the server is shutting down")

    def _receive(self, block: bool) -> None:
        try:
            item = self._incoming.get(timeout=0.5) if block else self._incoming.get_nowait()
            while True:
                if isinstance(item, CompletionJob):
                    self._waiting.append(item)
                elif isinstance(item, EmbeddingJob):
                    self._embeds.extend((item, i) for i in range(len(item.inputs)))
                item = self._incoming.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        for job in [job for job in self._running if job.cancelled]:
            self.batch.leave([c.row for c in job.choices if c.row is not None])
            for choice in job.choices:
                choice.row = None
            self._running.remove(job)
            job.emit(("cancelled",))
        for job in [job for job in self._waiting if job.cancelled]:
            self._waiting.remove(job)
            self._started()
            job.emit(("cancelled",))
        cancelled = {id(job): job for job, _ in self._embeds if job.cancelled}
        if cancelled:
            self._embeds = deque(item for item in self._embeds if id(item[0]) not in cancelled)
            for job in cancelled.values():
                self._started()
                job.emit(("cancelled",))

    def _embed_next_batch(self) -> None:
        """The oldest waiting input with every other one of its length bucket, up to the token
        budget and max_batch rows."""
        if not self._embeds:
            return
        max_seq, rows = self.engine.cache.max_seq, self.engine.cache.max_batch
        length = bucket(len(self._embeds[0][0].inputs[self._embeds[0][1]]), max_seq, SMALLEST_LENGTH)
        chosen, kept = [], deque()
        for job, index in self._embeds:
            fits = len(chosen) < rows and (len(chosen) + 1) * length <= max(self.embed_token_budget, length)
            same_bucket = bucket(len(job.inputs[index]), max_seq, SMALLEST_LENGTH) == length
            (chosen if fits and same_bucket else kept).append((job, index))
        self._embeds = kept
        vectors = self.embedder.embed_tokens([job.inputs[index] for job, index in chosen], cache=self._embed_cache)
        for (job, index), vector in zip(chosen, vectors):
            job.vectors[index] = vector
            job.remaining -= 1
            if job.remaining == 0:
                self._started()
                job.emit(("embeddings", job.vectors))

    def _admit(self) -> None:
        """Waiting prompts join free rows, first come first served, n rows each: all that fit join
        in one prefill, padded to the longest, up to JOIN_TOKEN_BUDGET padded tokens."""
        chosen = self._joining()
        if not chosen:
            return
        joined = self.batch.join_many([job.prompts[prompt] for job, prompt in chosen], [job.n for job, _ in chosen])
        for (job, prompt), (rows, logits) in zip(chosen, joined):
            job.joined += 1
            if job.joined == len(job.prompts):
                self._waiting.popleft()
                self._started()
            if job not in self._running:
                self._running.append(job)
            choices = job.choices[prompt * job.n:(prompt + 1) * job.n]
            for row, choice in zip(rows, choices):
                choice.row = row
            tokens = _draw(logits.expand(len(choices), -1), [(job, choice) for choice in choices])
            for choice, token in zip(choices, tokens):
                self._take(job, choice, token)

    def _joining(self) -> list[tuple[CompletionJob, int]]:
        """The waiting (job, prompt index) pairs that join now, in arrival order: up to the first that
        does not find its n free rows or would take the padded batch past the token budget."""
        free, longest, chosen = len(self.batch.free_rows), 0, []
        for job in self._waiting:
            for prompt in range(job.joined, len(job.prompts)):
                length = max(longest, len(job.prompts[prompt]))
                if job.n > free or (chosen and (len(chosen) + 1) * length > JOIN_TOKEN_BUDGET):
                    return chosen
                chosen.append((job, prompt))
                free, longest = free - job.n, length
        return chosen

    def _decode(self) -> None:
        by_row = {c.row: (job, c) for job in self._running for c in job.choices if c.row is not None}
        if not by_row:
            return
        logits = self.batch.step({row: choice.tokens[-1] for row, (_, choice) in by_row.items()})
        tokens = _draw(torch.stack([logits[row] for row in by_row]), list(by_row.values()))
        for (job, choice), token in zip(by_row.values(), tokens):
            self._take(job, choice, token)

    def _take(self, job: CompletionJob, choice: Choice, token: int) -> None:
        """Add the choice's next token, send its text, and free its row when it has finished."""
        choice.tokens.append(token)
        self.on_tokens(1)
        if token in self.eos_token_ids:
            reason, text = "stop", choice.text.finish()
        else:
            text = choice.text.add(token)
            full = self.batch.room(choice.row) < 1
            reason = "stop" if choice.text.stopped else "length" if len(choice.tokens) >= job.max_tokens or full else None
            if reason == "length":
                text += choice.text.finish()
        if reason is not None:
            choice.finish_reason = reason
            self.batch.leave([choice.row])
            choice.row = None
        job.emit(("token", choice.index, text, reason))
        if reason is not None and job.joined == len(job.prompts) and all(c.finish_reason for c in job.choices):
            self._running.remove(job)
            job.emit(("done", job.usage()))

    def _fail_all(self, status: int, message: str) -> None:
        jobs: list[Any] = [*self._running, *self._waiting, *{id(job): job for job, _ in self._embeds}.values()]
        while True:
            try:
                item = self._incoming.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                jobs.append(item)
        for job in {id(job): job for job in jobs}.values():
            job.emit(("error", status, message))
        self._running.clear()
        self._waiting.clear()
        self._embeds.clear()
        with self._queued_lock:
            self._queued = 0


def _draw(logits: torch.Tensor, owners: list[tuple[CompletionJob, Choice]]) -> list[int]:
    """One token per row of logits [B, V], each by its job's sampling parameters: rows that sample
    alike share each operation, and each draws its random numbers from its own generator, so a row's
    token is what `next_tokens` draws for it alone."""
    tokens = torch.empty(len(owners), dtype=torch.int64, device=logits.device)
    groups: dict[SamplingParams, list[int]] = {}
    for i, (job, _) in enumerate(owners):
        groups.setdefault(job.params, []).append(i)
    for params, rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        group = logits if len(rows) == len(owners) else logits[index]  # no copy when every row samples alike
        if not params.do_sample:
            tokens[index] = group.argmax(-1)
            continue
        tokens[index] = draw_tokens(filter_logits(group, params), [owners[row][1].generator for row in rows])
    return tokens.tolist()
