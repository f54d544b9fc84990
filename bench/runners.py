"""The implementations the benchmark puts side by side (CTranslate2, the CPU baseline, is in
ctranslate2_runner.py).

transformers eager and sdpa (dynamic cache), transformers sdpa over a static cache with its decode
step compiled, tritongpt2 with CUDA graphs off and on, and tritongpt2 with weight-only quantized
weights (int8, int4, nf4) quantized in-process from the same model. All but the quantized ones read
one random-weight transformers model's tensors in place, but for tritongpt2's layer matmul weights on
the torch backend, which it holds as from_pretrained loads them there: copies in [out, in] rows.
Each runner sizes what it allocates (KV caches, engines) to the workload at hand and frees it in
release(), so that runners and workloads never hold caches at the same time.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import fields, replace
from typing import Callable

import torch

from tritongpt2.engine.config import GPT2Config
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.generation import generate
from tritongpt2.engine.options import EngineOptions
from tritongpt2.engine.quantize import Quantization, quantize_weights
from tritongpt2.engine.weights import GPT2Weights, shared_weights
from tritongpt2.kernels.backend import BACKENDS
from tritongpt2.kernels.quantized_weight import is_quantized

from .timing import median_ms

Step = Callable[[], object]
KINDS = ("embed", "prefill", "decode", "generate")


class Runner:
    """One implementation. decode_step(ids, context) fills a cache of `context` slots with ids and
    returns a function that appends one token per row each call (the cache grows by one per call)."""

    name: str
    kinds: tuple[str, ...] = KINDS  # the workloads it runs; the others get no row
    weight_bytes: int | None = None  # bytes of weights a step reads, when not the model's own (a converted copy)
    activation_dtype: torch.dtype | None = None  # the activations' and KV cache's dtype, when not the model's
    embed_note: str | None = None  # what its embed figure measures beyond the hidden states, if anything

    def runs(self, work) -> bool:
        """Whether it times a workload (suite.Workload)."""
        return work.kind in self.kinds

    def embed(self, ids: torch.Tensor) -> object:
        raise NotImplementedError

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The last position's logits, [batch, vocab]."""
        raise NotImplementedError

    def decode_step(self, ids: torch.Tensor, context: int) -> Step:
        raise NotImplementedError

    def decode_ms(self, ids: torch.Tensor, context: int, device: torch.device, warmup: int, repeats: int) -> float:
        """Median ms of one decode step after prefilling ids, in a cache of `context` slots."""
        return median_ms(self.decode_step(ids, context), device, warmup=warmup, repeats=repeats)

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        raise NotImplementedError

    def embed_ms(self, ids: torch.Tensor, device: torch.device, warmup: int, repeats: int) -> float:
        return median_ms(lambda: self.embed(ids), device, warmup=warmup, repeats=repeats)

    def prefill_ms(self, ids: torch.Tensor, device: torch.device, warmup: int, repeats: int) -> float:
        return median_ms(lambda: self.prefill(ids), device, warmup=warmup, repeats=repeats)

    def generate_ms(self, ids: torch.Tensor, new_tokens: int, device: torch.device, warmup: int, repeats: int) -> float:
        return median_ms(lambda: self.generate(ids, new_tokens), device, warmup=warmup, repeats=repeats)

    def release(self) -> None:
        """Free what the last call kept for the workload (a cache, an engine)."""


def cache_keyword(model: torch.nn.Module) -> str:
    """transformers 5 calls the cache argument `cache`; 4.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def attention_view(model: torch.nn.Module, attention: str) -> torch.nn.Module:
    """The model's modules over the same parameter and buffer tensors, with a config of their own set
    to `attention`. transformers picks the attention function from the config at every call, so
    runners sharing one model object would all run whichever implementation was set last."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    view = copy.deepcopy(model, memo=shared)
    view.config._attn_implementation = attention
    return view


class HFRunner(Runner):
    def __init__(self, model: torch.nn.Module, attention: str) -> None:
        self.name = f"hf-{attention}"
        self.model = attention_view(model, attention)
        self.cache_keyword = cache_keyword(self.model)

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> object:
        return self.model.transformer(input_ids=ids).last_hidden_state

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.transformer(input_ids=ids).last_hidden_state
        return self.model.lm_head(hidden[:, -1])

    def decode_step(self, ids: torch.Tensor, context: int) -> Step:
        # The prompt fills the cache; its logits are not needed (at batch 64 x 1024 they would be 6 GB).
        with torch.no_grad():
            out = self.model.transformer(input_ids=ids, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        token = ids[:, -1:]

        @torch.no_grad()
        def step() -> object:
            return self.model(input_ids=token, use_cache=True, **{self.cache_keyword: cache}).logits

        return step

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **self._generate_options())

    def _generate_options(self) -> dict:
        return {}


def _static_cache(model: torch.nn.Module, batch: int, length: int):
    from transformers import StaticCache

    if "max_batch_size" in inspect.signature(StaticCache.__init__).parameters:  # transformers 4.x
        p = next(model.parameters())
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=length, device=p.device, dtype=p.dtype)
    return StaticCache(config=model.config, max_cache_len=length)


class HFCompiledStaticRunner(HFRunner):
    """transformers' recipe for fast decoding: sdpa over a StaticCache of exactly the workload's
    context, the forward compiled with fullgraph=True and dynamic=False (one graph specialised to each
    batch and cache length, as fast as dynamo makes it) and, on a GPU, mode="reduce-overhead" (CUDA
    graphs). generate is transformers' own static-cache generation, which compiles its decoding
    forward with the same options. Embed and prefill would run uncompiled: this runner has no such rows.

    Compiled graphs are cached per function across models and dtypes and count toward dynamo's
    recompile limit, a hard error with fullgraph: the suite resets dynamo before each model and dtype,
    which leaves one compile per decode shape (six in the GPU suite, under the limit of eight)."""

    kinds = ("decode", "generate")

    def __init__(self, model: torch.nn.Module, *, backend: str = "inductor") -> None:
        super().__init__(model, "sdpa")
        self.name = "hf-compile-static"
        on_gpu = next(model.parameters()).device.type == "cuda"
        # CUDA graphs are what reduce-overhead means; elsewhere (the CPU tests) inductor's default mode.
        self.options = {"backend": backend, "fullgraph": True, "dynamic": False,
                        "mode": "reduce-overhead" if on_gpu and backend == "inductor" else "default"}
        self.compiled = torch.compile(self.model.forward, **self.options)

    def decode_step(self, ids: torch.Tensor, context: int) -> Step:
        batch, seq = ids.shape
        cache = _static_cache(self.model, batch, context)
        with torch.no_grad():
            self.model.transformer(input_ids=ids, use_cache=True, cache_position=torch.arange(seq, device=ids.device),
                                   **{self.cache_keyword: cache})
        token = ids[:, -1:].clone()
        position = torch.tensor([seq], device=ids.device)

        @torch.no_grad()
        def step() -> object:
            logits = self.compiled(input_ids=token, use_cache=True, cache_position=position, **{self.cache_keyword: cache}).logits
            position.add_(1)
            return logits

        return step

    def _generate_options(self) -> dict:
        from transformers import CompileConfig

        config = CompileConfig(**self.options)
        config._compile_all_devices = True  # transformers compiles on CUDA only unless told
        return {"cache_implementation": "static", "compile_config": config}


class TritonGPT2Runner(Runner):
    checks_parity = True  # its logits are held to transformers' in the suite's parity check

    def __init__(self, model: torch.nn.Module, *, backend: str, cuda_graphs: bool) -> None:
        self.name = "tritongpt2" if cuda_graphs or backend != "triton" else "tritongpt2-nograph"
        self.backend = backend
        self.cuda_graphs = cuda_graphs
        self.config = GPT2Config.from_dict(model.config.to_dict())
        self.weights = shared_weights(model, self.config, layout=BACKENDS[backend].weight_layout)
        self.engine: Engine | None = None

    def _engine(self, batch: int, tokens: int) -> Engine:
        """An engine whose cache holds batch rows of `tokens` slots: the workload's size, not the model's largest."""
        if self.engine is None or (self.engine.cache.max_batch, self.engine.cache.max_seq) != (batch, tokens):
            self.engine = None  # the old cache is freed before the new one is allocated
            options = EngineOptions(backend=self.backend, cuda_graphs=self.cuda_graphs, max_batch=batch, max_seq=tokens)
            self.engine = Engine(self.config, self.weights, options)
        return self.engine

    def embed(self, ids: torch.Tensor) -> object:
        return self._engine(*ids.shape).prefill(ids, logits=None, hidden=True).hidden_states

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return self._engine(*ids.shape).prefill(ids).logits

    def decode_step(self, ids: torch.Tensor, context: int) -> Step:
        engine = self._engine(ids.shape[0], context)
        engine.prefill(ids, logits=None)
        token = ids[:, -1]
        return lambda: engine.decode(token, check_ids=False).logits

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        engine = self._engine(ids.shape[0], ids.shape[1] + new_tokens)
        return generate(engine, ids, max_new_tokens=new_tokens, eos_token_id=[])

    def release(self) -> None:
        self.engine = None


def _cast_floats(weights: GPT2Weights, dtype: torch.dtype) -> GPT2Weights:
    """The weights with every float tensor (biases, LayerNorms, wpe) in `dtype`; quantized ones as they are."""
    def cast(value):
        return value if is_quantized(value) else value.to(dtype)

    layers = [replace(layer, **{f.name: cast(getattr(layer, f.name)) for f in fields(layer)}) for layer in weights.layers]
    tied = weights.wte is weights.lm_head
    lm_head = cast(weights.lm_head)
    return replace(weights, wte=lm_head if tied else cast(weights.wte), wpe=cast(weights.wpe), layers=layers,
                   ln_f_weight=cast(weights.ln_f_weight), ln_f_bias=cast(weights.ln_f_bias), lm_head=lm_head)


def _weights_nbytes(weights: GPT2Weights) -> int:
    seen: dict[int, int] = {}
    for value in (weights.wte, weights.wpe, weights.ln_f_weight, weights.ln_f_bias, weights.lm_head,
                  *(getattr(layer, f.name) for layer in weights.layers for f in fields(layer))):
        seen[id(value)] = value.nbytes
    return sum(seen.values())


class QuantizedTritonGPT2Runner(TritonGPT2Runner):
    """tritongpt2 on the model's weights quantized in-process (`quantize_weights`, from the float
    weights), with the activations, biases, LayerNorms, wpe and the KV cache in `activation_dtype`:
    named tritongpt2-<format>-<dtype>, e.g. tritongpt2-int8-bfloat16. `only`: the labels of the
    workloads it times (suite.Workload.label), None for every one. Its logits are not the float
    model's: the parity check leaves it out (bench/quantization_accuracy.py measures what it costs)."""

    checks_parity = False

    def __init__(self, model: torch.nn.Module, quantization: Quantization, activation_dtype: torch.dtype, *,
                 backend: str = "torch", only: tuple[str, ...] | None = None) -> None:
        super().__init__(model, backend=backend, cuda_graphs=False)
        self.quantization = quantization
        self.activation_dtype = activation_dtype
        self.only = only
        self.name = f"tritongpt2-{quantization.format}-{str(activation_dtype).removeprefix('torch.')}"
        self.weights = _cast_floats(quantize_weights(self.weights, self.config, quantization), activation_dtype)
        self.weight_bytes = _weights_nbytes(self.weights)

    def runs(self, work) -> bool:
        return super().runs(work) and (self.only is None or work.label in self.only)
