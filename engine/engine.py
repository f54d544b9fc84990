"""The engine: weights, a static KV cache, prefill and decode, on one backend, with CUDA graphs."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from tritongpt2.kernels.backend import IN_OUT, Backend

from .checkpoint import Checkpoint, load_checkpoint
from .config import GPT2Config
from .forward import LOGITS_MODES, StepOutput, gpt2_step
from .graphs import CudaGraphs, GraphCapture, GraphRunner, bucket
from .inputs import as_batch, attention_mask_of, check_range, check_same_shape
from .kv_cache import StaticKVCache
from .options import EngineOptions
from .quantize import Quantization, load_quantized, quantization_of, quantize_weights, saved_quantization
from .weights import GPT2Weights, split_state_dict, weights_from_state_dict

SMALLEST_PREFILL_BUCKET = 16
Method = TypeVar("Method", bound=Callable[..., Any])


def serialized(method: Method) -> Method:
    """Run the method holding the engine's lock (reentrant: a generation holds it across its steps)."""

    @functools.wraps(method)
    def locked(self: Engine, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


class Engine:
    """GPT-2 over a static KV cache. `prefill` starts (or, with reset=False, continues) a batch of
    requests; `decode` appends one token per row. Outputs are fresh tensors, never graph buffers.

    CUDA graphs (on by default where the backend can capture) capture decode per batch bucket
    (1, 2, 4, ... max_batch) and prefill per (batch, length) bucket, length padded up to a power of
    two from 16; all graphs share one memory pool. Steps that collect every layer's input, or that
    would not fit the cache once padded, run eagerly.

    Calls from several threads are serialized on the engine's lock (one KV cache, one set of graph
    buffers): each caller gets its own answer.

    With options.quantization, float weights are quantized once, when the engine is built (before its
    cache and graphs); weights that are quantized already (a quantized checkpoint) are run as they
    are. `quantization` is the Quantization the engine runs, None for float weights."""

    def __init__(
        self,
        config: GPT2Config,
        weights: GPT2Weights,
        options: EngineOptions | None = None,
        *,
        graph_capture: GraphCapture | None = None,
    ) -> None:
        options = options or EngineOptions()
        self.config = config
        self.options = options
        self.backend = options.backend_for(weights.device)
        self.backend.check_dtype(weights.dtype)
        self.quantization = _quantization_to_run(options.quantization, quantization_of(weights), config, self.backend)
        if self.quantization is not None and quantization_of(weights) is None:
            weights = quantize_weights(weights, config, self.quantization)
        self.ops = self.backend.ops
        self.device = weights.device
        self.weights = weights
        max_seq = config.n_positions if options.max_seq is None else options.max_seq
        if max_seq > config.n_positions:
            raise ValueError(f"max_seq={max_seq} must be between 1 and n_positions={config.n_positions}")
        self.cache = StaticKVCache(
            config.n_layer, options.max_batch, config.n_head, max_seq, config.head_dim, dtype=weights.dtype, device=self.device
        )
        cuda_graphs = options.cuda_graphs
        if cuda_graphs is None:
            cuda_graphs = self.backend.cuda_graphs or graph_capture is not None
        if cuda_graphs and graph_capture is None and not self.backend.cuda_graphs:
            raise ValueError(f"CUDA graphs need a backend that can capture them; this engine runs {self.backend.name!r}")
        self.graphs = GraphRunner(graph_capture or CudaGraphs()) if cuda_graphs else None
        self.lock = threading.RLock()
        # Small device constants a step needs every call (a decode's mask of ones, the token count),
        # made once each rather than launched every step.
        self._constants: dict[tuple, torch.Tensor] = {}

    def __reduce__(self) -> tuple:
        # A copy (copy.deepcopy, pickle) is a new engine over copies of the weights, with the same
        # options and a cache, lock and graphs of its own: none of those can be shared or pickled.
        return (type(self), (self.config, self.weights, self.options))

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, options: EngineOptions | None = None) -> Engine:
        """The engine over a loaded checkpoint's base model (its head tensors are the heads' business),
        its float matmul weights stored as its backend reads them fastest (Backend.weight_layout)."""
        options = options or EngineOptions()
        device = options.device if options.device is not None else options.backend_for().device
        config, folder = checkpoint.config, checkpoint.folder
        saved = saved_quantization(config, folder)
        if saved is not None and options.quantization not in (None, saved):
            raise ValueError(
                f"quantization={options.quantization.describe()} asked for, but {folder} is saved quantized as "
                f"{saved.describe()}; load it without quantization= (its weights are used as saved), or quantize "
                "its float checkpoint instead"
            )
        base, rest = split_state_dict(checkpoint.state)
        quantized, head = load_quantized(config, base, rest, saved, folder) if saved is not None else ({}, None)
        weights = weights_from_state_dict(
            config, base, head if head is not None else rest.get("lm_head.weight"), dtype=options.dtype, device=device,
            source=folder, quantized=quantized,
            # Weights about to be quantized are read once: a copy in the backend's layout would be waste.
            layout=IN_OUT if options.quantization is not None else options.backend_for(device).weight_layout,
        )
        return cls(config, weights, options)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, options: EngineOptions | None = None, **option_values: Any) -> Engine:
        """Load a Hugging Face GPT-2 checkpoint (any head; the head's tensors are not used) from a
        folder or a hub id. Options as EngineOptions fields (dtype=, device=, backend=, max_batch=,
        max_seq=, cuda_graphs=, quantization=, group_size=, double_quant=) or an EngineOptions. A
        checkpoint saved quantized (save_pretrained of a quantized model) loads as saved, never
        quantized again."""
        options = EngineOptions.of(options, **option_values)  # bad options are refused before anything is read
        return cls.from_checkpoint(load_checkpoint(name_or_path), options)

    @staticmethod
    def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """transformers' ACT2FN[name] as a torch function, for the heads' own math."""
        from tritongpt2.kernels.torch_ops import activation_function

        return activation_function(name)

    @serialized
    def reset(self) -> None:
        """Empty the engine's own cache for a new request; nothing is reallocated."""
        self.cache.reset()

    def new_cache(self, batch: int, tokens: int = 1, *, growable: bool = True) -> StaticKVCache:
        """A cache of the caller's own, for `batch` rows, with room for `tokens`. A growable one grows
        (up to max_seq slots, and in rows) as requests need; a fixed one holds `tokens` at most.
        Steps on it run without graphs."""
        config = self.config
        if not growable and tokens > self.cache.max_seq:
            raise ValueError(f"a cache of {tokens} slots is longer than the model's max_seq={self.cache.max_seq}")
        return StaticKVCache(
            config.n_layer, batch, config.n_head, self.cache.max_seq if growable else tokens, config.head_dim,
            dtype=self.weights.dtype, device=self.device, slots=tokens, growable=growable,
        )

    @serialized
    def prefill(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits: str | None = "last",
        hidden: bool = False,
        layer_inputs: bool = False,
        reset: bool = True,
        head_mask: torch.Tensor | None = None,
        cache: StaticKVCache | None = None,
        slot_positions: bool = False,
    ) -> StepOutput:
        """Run prompts input_ids [B, T] (or inputs_embeds [B, T, C]; padded left or right, padding
        marked 0 in attention_mask) into the cache. Positions default to those transformers'
        generate derives from the mask, continuing from the cached tokens; with slot_positions, to
        the cached tokens' count + arange(T), padding included (transformers' forward). reset=False appends to the
        batch already cached; its attention_mask may then cover the cached tokens too, [B, used + T].
        head_mask [n_head] or [n_layer, n_head] scales each head's attention output (0 removes it).
        `cache` is the engine's own unless given (one from `new_cache`)."""
        _check_logits_mode(logits)
        cache = self.cache_to_use(cache)
        head_scale = self._head_scale(head_mask)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            embeds, ids = self._check_embeds(inputs_embeds), None
            shape = embeds.shape[:2]
        else:
            ids = as_batch("input_ids", input_ids, self.device)
            check_range("input_ids", ids, self.config.vocab_size)
            embeds, shape = None, ids.shape
        past = 0 if reset else cache.used
        mask, past_mask = self._split_mask(attention_mask, shape, past)
        types = self._optional_ids("token_type_ids", token_type_ids, shape, self.config.vocab_size)
        positions = self._optional_ids("position_ids", position_ids, shape, self.config.n_positions)
        batch, seq = mask.shape
        if reset:
            cache.reserve(batch, seq, reset=True)
            cache.reset()
        cache.reserve(batch, seq)
        if past_mask is not None:
            cache.key_mask[:batch, :past] = past_mask
        inputs = {"input_ids": ids, "inputs_embeds": embeds, "attention_mask": mask, "token_type_ids": types, "position_ids": positions}
        return self._step(
            cache, inputs, logits=logits, hidden=hidden, layer_inputs=layer_inputs, head_scale=head_scale,
            mask_of_ones=attention_mask is None and seq == 1, slot_positions=slot_positions,
        )

    @serialized
    def decode(
        self,
        input_ids: torch.Tensor,
        *,
        token_type_ids: torch.Tensor | None = None,
        logits: str | None = "last",
        hidden: bool = False,
        check_ids: bool = True,
        cache: StaticKVCache | None = None,
    ) -> StepOutput:
        """Append one token per row: input_ids [B] or [B, 1], B the batch in the cache.
        check_ids=False skips the range check of the ids, which reads them on the host (a device
        synchronisation): for tokens the engine sampled itself."""
        _check_logits_mode(logits)
        cache = self.cache_to_use(cache)
        if cache.used == 0:
            raise ValueError("decode needs a prefilled cache; call prefill first")
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(1)
        ids = as_batch("input_ids", input_ids, self.device)
        if ids.shape[1] != 1:
            raise ValueError(f"decode takes one token per row, got input_ids of shape {tuple(ids.shape)}")
        if check_ids:
            check_range("input_ids", ids, self.config.vocab_size)
        types = self._optional_ids("token_type_ids", token_type_ids, ids.shape, self.config.vocab_size)
        cache.reserve(ids.shape[0], 1)
        mask = self._constant(tuple(ids.shape), 1, torch.int32)
        inputs = {"input_ids": ids, "inputs_embeds": None, "attention_mask": mask, "token_type_ids": types, "position_ids": None}
        return self._step(cache, inputs, logits=logits, hidden=hidden, mask_of_ones=True)

    @serialized
    def decode_rows(self, input_ids: torch.Tensor, *, check_ids: bool = True) -> StepOutput:
        """Continuous batching's step: append one token to each of the first B rows of the engine's
        own cache, input_ids [B], each row at its own length (rows joined at different times, with
        `StaticKVCache.copy_row`). Returns logits [B, V]. Under CUDA graphs it replays decode's batch
        buckets. The caller keeps each row's length on the host and never steps a full row; rows it
        does not use still advance (their output is meaningless) and are the caller's to
        `reset_rows`. `cache.used` is left alone: it describes rows that advance together."""
        ids = as_batch("input_ids", input_ids.reshape(-1, 1) if isinstance(input_ids, torch.Tensor) else input_ids, self.device)
        if ids.shape[1] != 1 or ids.shape[0] > self.cache.max_batch:
            raise ValueError(f"decode_rows takes one token for each of at most {self.cache.max_batch} rows, got {tuple(ids.shape)}")
        if check_ids:
            check_range("input_ids", ids, self.config.vocab_size)
        mask = self._constant(tuple(ids.shape), 1, torch.int32)
        inputs = {"input_ids": ids, "inputs_embeds": None, "attention_mask": mask, "token_type_ids": None, "position_ids": None}
        return self._step(self.cache, inputs, logits="last", hidden=False, mask_of_ones=True, advance=False)

    def cache_to_use(self, cache: StaticKVCache | None) -> StaticKVCache:
        """The cache a step runs on: the engine's own, or the caller's if it fits this model."""
        if cache is None:
            return self.cache
        if not isinstance(cache, StaticKVCache):
            raise ValueError(f"cache must be a StaticKVCache (from Engine.new_cache), got {type(cache).__name__}")
        expected = (self.config.n_layer, self.config.n_head, self.config.head_dim)
        found = (cache.keys.shape[0], cache.keys.shape[2], cache.keys.shape[4])
        if found != expected:
            raise ValueError(f"the cache holds (layers, heads, head_dim) {found}; this model has {expected}")
        if cache.dtype != self.weights.dtype or cache.device != self.device:
            raise ValueError(
                f"the cache holds {cache.dtype} on {cache.device}, but the model now runs {self.weights.dtype} on "
                f"{self.device}; start a new cache"
            )
        return cache

    def _head_scale(self, head_mask: torch.Tensor | None) -> torch.Tensor | None:
        """head_mask as [n_layer, n_head] in the weights' dtype, or None."""
        if head_mask is None:
            return None
        layers, heads = self.config.n_layer, self.config.n_head
        if not isinstance(head_mask, torch.Tensor) or tuple(head_mask.shape) not in ((heads,), (layers, heads)):
            shape = tuple(head_mask.shape) if isinstance(head_mask, torch.Tensor) else type(head_mask).__name__
            raise ValueError(f"head_mask must be [{heads}] or [{layers}, {heads}] (per head, or per layer and head), got {shape}")
        return head_mask.to(device=self.device, dtype=self.weights.dtype).expand(layers, heads).contiguous()

    def _check_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
            raise ValueError(f"inputs_embeds must be a floating-point torch.Tensor, got {getattr(embeds, 'dtype', type(embeds))}")
        if embeds.device.type != self.device.type:
            raise ValueError(f"inputs_embeds is on {embeds.device}, but the engine runs on {self.device}")
        if embeds.dim() == 2:
            embeds = embeds.unsqueeze(0)
        if embeds.dim() != 3 or embeds.shape[-1] != self.config.n_embd or embeds.numel() == 0:
            raise ValueError(f"inputs_embeds must be [batch, seq, {self.config.n_embd}], got shape {tuple(embeds.shape)}")
        return embeds.to(self.weights.dtype).contiguous()

    def _split_mask(
        self, mask: torch.Tensor | None, shape: torch.Size, past: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The new tokens' mask [B, T], and the cached tokens' [B, past] when the mask covers them."""
        if past and isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == past + shape[1]:
            full = attention_mask_of(mask, mask.shape, self.device)
            return full[:, past:].contiguous(), full[:, :past]
        if mask is None and shape[1] == 1:
            return self._constant(tuple(shape), 1, torch.int32), None
        return attention_mask_of(mask, shape, self.device), None

    def _optional_ids(self, name: str, values: torch.Tensor | None, shape: torch.Size, high: int) -> torch.Tensor | None:
        """token_type_ids or position_ids of the input's [B, T] shape, range-checked."""
        if values is None:
            return None
        if isinstance(values, torch.Tensor) and values.dim() == 1 and shape[1] == 1 and values.numel() == shape[0]:
            values = values.unsqueeze(1)
        values = as_batch(name, values, self.device)
        check_same_shape(name, values, shape)
        check_range(name, values, high)
        return values

    def _step(
        self, cache: StaticKVCache, inputs: dict[str, torch.Tensor | None], *, logits: str | None, hidden: bool,
        layer_inputs: bool = False, mask_of_ones: bool = False, head_scale: torch.Tensor | None = None,
        slot_positions: bool = False, advance: bool = True,
    ) -> StepOutput:
        batch, seq = inputs["attention_mask"].shape
        # Graphs are captured over the engine's own cache, whose storage never moves.
        if self.graphs is None or layer_inputs or head_scale is not None or cache is not self.cache:
            out = self._run_step(
                cache, inputs, self._constant((1,), seq, torch.int64), logits=logits, hidden=hidden,
                layer_inputs=layer_inputs, head_scale=head_scale, slot_positions=slot_positions,
            )
        else:
            out = self._graph_step(
                inputs, logits=logits, hidden=hidden, mask_of_ones=mask_of_ones, slot_positions=slot_positions
            )
        if advance:
            cache.advance(batch, seq)
        return out

    def _constant(self, shape: tuple[int, ...], value: int, dtype: torch.dtype) -> torch.Tensor:
        key = (shape, value, dtype)
        if key not in self._constants:
            self._constants[key] = torch.full(shape, value, dtype=dtype, device=self.device)
        return self._constants[key]

    def _run_step(
        self, cache: StaticKVCache, inputs: dict[str, torch.Tensor | None], new_tokens: torch.Tensor, **options
    ) -> StepOutput:
        return gpt2_step(
            self.ops, self.config, self.weights, cache, inputs["input_ids"], inputs["attention_mask"], new_tokens,
            position_ids=inputs.get("position_ids"), token_type_ids=inputs.get("token_type_ids"),
            inputs_embeds=inputs.get("inputs_embeds"), **options,
        )

    def _graph_step(
        self, inputs: dict[str, torch.Tensor | None], *, logits: str | None, hidden: bool, mask_of_ones: bool,
        slot_positions: bool,
    ) -> StepOutput:
        batch, seq = inputs["attention_mask"].shape
        rows = bucket(batch, self.cache.max_batch)
        length = 1 if seq == 1 else bucket(seq, self.cache.max_seq, SMALLEST_PREFILL_BUCKET)
        if self.cache.used + length > self.cache.max_seq:
            length = seq  # padding would run past the cache: capture this exact length instead
        given = {name: t for name, t in inputs.items() if t is not None}
        given["new_tokens"] = self._constant((1,), seq, torch.int64)
        # The buffers of these hold the same values for every call of the same shape: not copied again.
        known = {"new_tokens": seq, **({"attention_mask": "ones"} if mask_of_ones else {})}
        key = (rows, length, tuple(sorted(given)), logits, hidden) + (("slot_positions",) if slot_positions else ())

        def step(buffers: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
            out = self._run_step(
                self.cache, buffers, buffers["new_tokens"], logits=logits, hidden=hidden, slot_positions=slot_positions
            )
            return out.hidden_states, out.logits

        hidden_states, out_logits = self.graphs.run(key, given, step, leading=(rows, length), known=known)
        if hidden_states is not None:
            hidden_states = hidden_states[:batch, :seq].clone()
        if out_logits is not None:
            out_logits = (out_logits[:batch, :seq] if logits == "all" else out_logits[:batch]).clone()
        return StepOutput(hidden_states, out_logits)


def _quantization_to_run(
    wanted: Quantization | None, present: Quantization | None, config: GPT2Config, backend: Backend
) -> Quantization | None:
    """The quantization an engine runs: the weights' own, or the one asked for (checked against the
    model's shapes and the backend); ValueError when the weights are already in another."""
    if wanted is not None and present is not None and wanted != present:
        raise ValueError(f"quantization={wanted.describe()} asked for, but the weights are already {present.describe()}")
    quantization = wanted or present
    if quantization is not None:
        backend.check_quantization(quantization.format)
        quantization.check_model(config)
    return quantization


def _check_logits_mode(logits: str | None) -> None:
    if logits not in LOGITS_MODES:
        raise ValueError(f"logits={logits!r} must be one of {LOGITS_MODES}")
