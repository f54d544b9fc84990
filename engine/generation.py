"""Generation over the engine: greedy, temperature, top-k, top-p, EOS per row, streaming.

Sampling (draw_tokens) draws by inverse transform on the CPU, one uniform number a row, and by the
exponential race on a GPU; neither needs a host synchronisation. The host reads each step's tokens
once, to stream them and to stop when every row has finished. It reads them only after queueing the next step, so
that on a GPU the device computes step t + 1 while the host streams step t: a token then costs the
longer of the device's time and the host's, not their sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .engine import Engine


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature={self.temperature!r} must be a positive number")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be a non-negative integer (0 turns it off)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """float32 logits [B, V] divided by the temperature, with tokens outside top-k and top-p set to
    -inf, as transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper do: a new
    tensor, never `logits` itself, each row shifted by its largest logit before the temperature
    divides it, so that each row's largest score is 0 (softmax, top-k and top-p, which keep that
    token, do not see the shift): a tiny temperature then sends the other tokens to -inf, never the
    most likely one to inf, so the draw is the limit of a falling temperature, not NaN. A NaN logit
    becomes 0: a broken row still draws a token in range."""
    wide = logits.float()
    scores = (wide - wide.amax(-1, keepdim=True)).div_(params.temperature).nan_to_num_(neginf=float("-inf"))
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - params.top_p
        remove[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return scores


def draw_tokens(scores: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of scores [B, V] (filter_logits' output, each row's largest score 0, which
    this overwrites with the rows' weights exp(score)), token i with probability softmax(scores)[i];
    row r draws its random numbers from generators[r], or every row from generators[0] when it is
    the only one.

    On the CPU by inverse transform, one random number a row: a 16-row draw over gpt2's vocabulary
    (filter_logits included) takes 0.6 ms so on a 2-core Xeon, against 5.1 ms for the exponential
    race measured alongside, most of it drawing its V numbers a row. The CPU's cumsum adds each row
    in order (in float64), so the running sums stay flat across a filtered-out token; a GPU's adds
    in a tree order, whose roundings can open a gap there, so a GPU races."""
    weights = scores.exp_()
    if weights.device.type != "cpu":
        return exponential_race(weights, generators)
    if len(generators) == 1:
        uniforms = torch.rand(weights.shape[0], generator=generators[0], dtype=weights.dtype)
    else:
        uniforms = torch.cat([torch.rand(1, generator=g, dtype=weights.dtype) for g in generators])
    return inverse_transform(weights, uniforms)


def inverse_transform(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row of weights [B, V] (>= 0, overwritten by their running sums), the first token whose
    running sum reaches (1 - u) times the row's total, u = uniforms[row] in [0, 1). 1 - u is in
    (0, 1], so the bound is above 0 and at most the total: a weight of 0 is never drawn (where the
    sums add in order), nor is a token past the last."""
    running = weights.cumsum_(-1)
    return torch.searchsorted(running, (1.0 - uniforms)[:, None] * running[:, -1:]).squeeze(-1)


def exponential_race(weights: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Per row of weights [B, V] (>= 0), argmax(weight / E) with E Exponential(1) per token, drawn
    as -log of a uniform in [0, 1): E > 0 (inf for a uniform of 0), so a weight of 0 always loses."""
    noise = torch.empty_like(weights)
    for row, generator in enumerate(generators):
        (noise if len(generators) == 1 else noise[row]).uniform_(generator=generator)
    return (weights / noise.log_().neg_()).argmax(-1)


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from logits [B, V]."""
    if not params.do_sample:
        return logits.argmax(-1)
    return draw_tokens(filter_logits(logits, params), [generator])


class TokensToHost:
    """Each step's tokens, copied to the host behind the device's queue: on a GPU into pinned memory
    with an event, so the host can queue more work before it waits for them."""

    def __init__(self, steps: int, batch: int, device: torch.device) -> None:
        self.on_gpu = device.type == "cuda"
        self.rows = torch.empty(steps, batch, dtype=torch.int64, pin_memory=self.on_gpu)
        self.copied: torch.cuda.Event | None = None

    def start(self, step: int, tokens: torch.Tensor) -> None:
        self.rows[step].copy_(tokens, non_blocking=self.on_gpu)
        if self.on_gpu:
            self.copied = torch.cuda.Event()
            self.copied.record()

    def wait(self, step: int) -> torch.Tensor:
        if self.copied is not None:
            self.copied.synchronize()
        return self.rows[step]


def stream_tokens(
    engine: Engine,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    params: SamplingParams = SamplingParams(),
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield each step's new tokens, [B] on the CPU, until every row has produced an EOS token or
    max_new_tokens are out. A row that has finished yields pad_token_id (EOS when none is set).
    eos_token_id and pad_token_id default to the config's; eos_token_id=[] never stops early.
    Each step is queued before the previous one's tokens are yielded, so a stop on EOS has run the
    step after it too: the cache then holds the last yielded tokens as well. The engine's lock is
    held until the generator finishes or is closed: other threads' calls wait, never interleave.
    Bad arguments are refused by this call, before the generator runs anything."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2):
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a torch.Tensor of [batch, seq] (or [seq]), got {shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if seed is not None:
        generator = torch.Generator(device=engine.device).manual_seed(seed)
    eos_token_id = engine.config.eos_token_id if eos_token_id is None else eos_token_id
    pad_token_id = engine.config.pad_token_id if pad_token_id is None else pad_token_id
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    filler = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    room = engine.cache.max_seq - ids.shape[1]
    if room < 0:
        raise ValueError(
            f"a prompt of {ids.shape[1]} tokens is longer than the model's context of max_seq={engine.cache.max_seq} "
            "tokens; shorten it to leave room for new ones"
        )
    if max_new_tokens > room + 1:
        raise ValueError(
            f"a prompt of {ids.shape[1]} tokens leaves room for {room + 1} new ones in the cache "
            f"(max_seq={engine.cache.max_seq}), not max_new_tokens={max_new_tokens}"
        )
    return _stream(engine, ids, attention_mask, max_new_tokens, params, eos, filler, generator)


def _stream(
    engine: Engine, ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int, params: SamplingParams,
    eos: list[int], filler: int, generator: torch.Generator | None,
) -> Iterator[torch.Tensor]:
    """stream_tokens' loop, over arguments it has checked."""
    eos_on_host = torch.tensor(eos, dtype=torch.int64)
    eos_ids = eos_on_host.to(engine.device)
    with engine.lock:
        logits = engine.prefill(ids, attention_mask).logits
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=engine.device)
        to_host = TokensToHost(max_new_tokens, ids.shape[0], engine.device)
        finished_on_host = torch.zeros(ids.shape[0], dtype=torch.bool)
        for step in range(max_new_tokens):
            tokens = next_tokens(logits, params, generator).masked_fill(finished, filler)
            finished |= torch.isin(tokens, eos_ids)
            to_host.start(step, tokens)
            if step + 1 < max_new_tokens:
                logits = engine.decode(tokens, check_ids=False).logits
            host_tokens = to_host.wait(step)
            yield host_tokens
            finished_on_host |= torch.isin(host_tokens, eos_on_host)
            if step + 1 == max_new_tokens or bool(finished_on_host.all()):
                return


def generate(
    engine: Engine,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The prompts followed by their continuations, [B, T + new] on the CPU, as transformers'
    generate returns them; `streamer` gets each step's tokens [B] as they come."""
    params = SamplingParams(do_sample, temperature, top_k, top_p)
    prompt = (input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)).cpu()
    steps = []
    for tokens in stream_tokens(
        engine, input_ids, attention_mask, max_new_tokens=max_new_tokens, params=params,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, generator=generator,
    ):
        if streamer is not None:
            streamer(tokens)
        steps.append(tokens)
    return torch.cat([prompt, torch.stack(steps, dim=1)], dim=1)
