"""The implementations the benchmark puts side by side, each able to run every workload (CTranslate2,
the CPU baseline, is in ctranslate2_runner.py).

transformers eager and sdpa (dynamic cache), transformers sdpa with a static cache and
torch.compile(mode="reduce-overhead") for decode, and tritongpt2 with CUDA graphs off and on. All
share one random-weight transformers model: tritongpt2 reads its tensors in place.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from tritongpt2.engine.config import GPT2Config
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.generation import generate
from tritongpt2.engine.options import EngineOptions
from tritongpt2.engine.weights import shared_weights

from .timing import median_ms

Step = Callable[[], object]


class Runner:
    """One implementation. decode_step() prefills `context` tokens and returns a function that
    appends one token per row each call (the cache grows by one per call)."""

    name: str
    weight_bytes: int | None = None  # bytes of weights a step reads, when not the model's own (a converted copy)
    embed_note: str | None = None  # what its embed figure measures beyond the hidden states, if anything

    def embed(self, ids: torch.Tensor) -> object:
        raise NotImplementedError

    def prefill(self, ids: torch.Tensor) -> object:
        raise NotImplementedError

    def decode_step(self, ids: torch.Tensor) -> Step:
        raise NotImplementedError

    def decode_ms(self, ids: torch.Tensor, device: torch.device, warmup: int, repeats: int) -> float:
        """Median ms of one decode step after prefilling ids."""
        return median_ms(self.decode_step(ids), device, warmup=warmup, repeats=repeats)

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        raise NotImplementedError


def cache_keyword(model: torch.nn.Module) -> str:
    """transformers 5 calls the cache argument `cache`; 4.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class HFRunner(Runner):
    def __init__(self, model: torch.nn.Module, attention: str) -> None:
        self.name = f"hf-{attention}"
        self.model = model
        self.cache_keyword = cache_keyword(model)
        model.config._attn_implementation = attention

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> object:
        return self.model.transformer(input_ids=ids).last_hidden_state

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> object:
        hidden = self.model.transformer(input_ids=ids).last_hidden_state
        return self.model.lm_head(hidden[:, -1])

    def decode_step(self, ids: torch.Tensor) -> Step:
        with torch.no_grad():
            out = self.model(input_ids=ids, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        token = ids[:, -1:]

        @torch.no_grad()
        def step() -> object:
            return self.model(input_ids=token, use_cache=True, **{self.cache_keyword: cache}).logits

        return step

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def _static_cache(model: torch.nn.Module, batch: int, length: int):
    from transformers import StaticCache

    if "max_batch_size" in inspect.signature(StaticCache.__init__).parameters:  # transformers 4.x
        p = next(model.parameters())
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=length, device=p.device, dtype=p.dtype)
    return StaticCache(config=model.config, max_cache_len=length)


class HFCompiledStaticRunner(HFRunner):
    """sdpa over a StaticCache, the decode step compiled with mode="reduce-overhead" (CUDA graphs)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model, "sdpa")
        self.name = "hf-compile-static"
        self.compiled = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    def decode_step(self, ids: torch.Tensor, room: int = 64) -> Step:
        batch, seq = ids.shape
        cache = _static_cache(self.model, batch, seq + room)
        with torch.no_grad():
            self.model(input_ids=ids, use_cache=True, cache_position=torch.arange(seq, device=ids.device),
                       **{self.cache_keyword: cache})
        token = ids[:, -1:].clone()
        position = torch.tensor([seq], device=ids.device)

        @torch.no_grad()
        def step() -> object:
            logits = self.compiled(input_ids=token, use_cache=True, cache_position=position, **{self.cache_keyword: cache}).logits
            position.add_(1)
            return logits

        return step


class TritonGPT2Runner(Runner):
    def __init__(self, model: torch.nn.Module, *, backend: str, cuda_graphs: bool, max_batch: int, max_seq: int) -> None:
        self.name = "tritongpt2" if cuda_graphs or backend != "triton" else "tritongpt2-nograph"
        config = GPT2Config.from_dict(model.config.to_dict())
        options = EngineOptions(backend=backend, cuda_graphs=cuda_graphs, max_batch=max_batch, max_seq=max_seq)
        self.engine = Engine(config, shared_weights(model, config), options)

    def embed(self, ids: torch.Tensor) -> object:
        return self.engine.prefill(ids, logits=None, hidden=True).hidden_states

    def prefill(self, ids: torch.Tensor) -> object:
        return self.engine.prefill(ids).logits

    def decode_step(self, ids: torch.Tensor) -> Step:
        self.engine.prefill(ids, logits=None)
        token = ids[:, -1]
        return lambda: self.engine.decode(token, check_ids=False).logits

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return generate(self.engine, ids, max_new_tokens=new_tokens, eos_token_id=[])
