"""The engine: weights, a static KV cache, prefill and decode, on one backend, with CUDA graphs."""

from __future__ import annotations

from pathlib import Path

import torch

from tritongpt2.kernels.backend import backend_device, kernel_ops, resolve_backend

from .checkpoint import load_config, load_state_dict, resolve_model_dir
from .config import GPT2Config
from .forward import LOGITS_MODES, StepOutput, gpt2_step
from .graphs import CudaGraphs, GraphCapture, GraphRunner, bucket
from .inputs import as_batch, attention_mask_of, check_range, check_same_shape
from .kv_cache import StaticKVCache
from .weights import GPT2Weights, split_state_dict, weights_from_state_dict

# Tensors of the task heads; the engine keeps them for the heads and checks that nothing else is left.
HEAD_KEYS = frozenset({
    "score.weight", "classifier.weight", "classifier.bias", "qa_outputs.weight", "qa_outputs.bias",
    "multiple_choice_head.summary.weight", "multiple_choice_head.summary.bias",
})
SMALLEST_PREFILL_BUCKET = 16


class Engine:
    """GPT-2 over a static KV cache. `prefill` starts (or, with reset=False, continues) a batch of
    requests; `decode` appends one token per row. Outputs are fresh tensors, never graph buffers.

    CUDA graphs (triton backend only, on by default there) capture decode per batch bucket
    (1, 2, 4, ... max_batch) and prefill per (batch, length) bucket, length padded up to a power of
    two from 16; all graphs share one memory pool. Steps that collect every layer's input, or that
    would not fit the cache once padded, run eagerly."""

    def __init__(
        self,
        config: GPT2Config,
        weights: GPT2Weights,
        *,
        backend: str | None = None,
        max_batch: int = 8,
        max_seq: int | None = None,
        cuda_graphs: bool | None = None,
        graph_capture: GraphCapture | None = None,
    ) -> None:
        self.config = config
        self.backend = resolve_backend(backend)
        self.ops = kernel_ops(self.backend)
        self.device = backend_device(self.backend)
        if weights.device.type != self.device.type:
            raise ValueError(f"weights are on {weights.device}, but the {self.backend} backend runs on {self.device}")
        self.weights = weights
        max_seq = config.n_positions if max_seq is None else max_seq
        if not 1 <= max_seq <= config.n_positions:
            raise ValueError(f"max_seq={max_seq} must be between 1 and n_positions={config.n_positions}")
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be positive")
        self.cache = StaticKVCache(
            config.n_layer, max_batch, config.n_head, max_seq, config.head_dim, dtype=weights.dtype, device=self.device
        )
        if cuda_graphs is None:
            cuda_graphs = self.backend == "triton" or graph_capture is not None
        if cuda_graphs and graph_capture is None and self.backend != "triton":
            raise ValueError(f"CUDA graphs need the triton backend; this engine runs {self.backend!r}")
        self.graphs = GraphRunner(graph_capture or CudaGraphs()) if cuda_graphs else None
        self.head_state: dict[str, torch.Tensor] = {}
        # Small device constants a step needs every call (a decode's mask of ones, the token count),
        # made once each rather than launched every step.
        self._constants: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
        max_batch: int = 8,
        max_seq: int | None = None,
        cuda_graphs: bool | None = None,
    ) -> Engine:
        """Load a Hugging Face GPT-2 checkpoint (any head) from a folder or a hub id."""
        folder = resolve_model_dir(name_or_path)
        config = load_config(folder)
        backend = resolve_backend(backend)
        device = torch.device(device) if device is not None else backend_device(backend)
        base, rest = split_state_dict(load_state_dict(folder))
        lm_head = rest.pop("lm_head.weight", None)
        unexpected = sorted(set(rest) - HEAD_KEYS)
        if unexpected:
            raise ValueError(f"checkpoint in {folder} has unexpected keys: {', '.join(unexpected)}")
        weights = weights_from_state_dict(config, base, lm_head, dtype=dtype, device=device)
        engine = cls(config, weights, backend=backend, max_batch=max_batch, max_seq=max_seq, cuda_graphs=cuda_graphs)
        engine.head_state = {k: v.to(device=device, dtype=weights.dtype) for k, v in rest.items()}
        return engine

    def reset(self) -> None:
        """Empty the cache for a new request; nothing is reallocated."""
        self.cache.reset()

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
    ) -> StepOutput:
        """Run prompts input_ids [B, T] (or inputs_embeds [B, T, C]; padded left or right, padding
        marked 0 in attention_mask) into the cache. Positions default to those transformers'
        generate derives from the mask, continuing from the cached tokens. reset=False appends to the
        batch already cached; its attention_mask may then cover the cached tokens too, [B, used + T]."""
        _check_logits_mode(logits)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            embeds, ids = self._check_embeds(inputs_embeds), None
            shape = embeds.shape[:2]
        else:
            ids = as_batch("input_ids", input_ids, self.device)
            check_range("input_ids", ids, self.config.vocab_size)
            embeds, shape = None, ids.shape
        past = 0 if reset else self.cache.used
        mask, past_mask = self._split_mask(attention_mask, shape, past)
        types = self._optional_ids("token_type_ids", token_type_ids, shape, self.config.vocab_size)
        positions = self._optional_ids("position_ids", position_ids, shape, self.config.n_positions)
        batch, seq = mask.shape
        if reset:
            self.cache.reserve(batch, seq, reset=True)
            self.reset()
        self.cache.reserve(batch, seq)
        if past_mask is not None:
            self.cache.key_mask[:batch, :past] = past_mask
        inputs = {"input_ids": ids, "inputs_embeds": embeds, "attention_mask": mask, "token_type_ids": types, "position_ids": positions}
        return self._step(inputs, logits=logits, hidden=hidden, layer_inputs=layer_inputs)

    def decode(
        self,
        input_ids: torch.Tensor,
        *,
        token_type_ids: torch.Tensor | None = None,
        logits: str | None = "last",
        hidden: bool = False,
        check_ids: bool = True,
    ) -> StepOutput:
        """Append one token per row: input_ids [B] or [B, 1], B the batch in the cache.
        check_ids=False skips the range check of the ids, which reads them on the host (a device
        synchronisation): for tokens the engine sampled itself."""
        _check_logits_mode(logits)
        if self.cache.used == 0:
            raise ValueError("decode needs a prefilled cache; call prefill first")
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(1)
        ids = as_batch("input_ids", input_ids, self.device)
        if ids.shape[1] != 1:
            raise ValueError(f"decode takes one token per row, got input_ids of shape {tuple(ids.shape)}")
        if check_ids:
            check_range("input_ids", ids, self.config.vocab_size)
        types = self._optional_ids("token_type_ids", token_type_ids, ids.shape, self.config.vocab_size)
        self.cache.reserve(ids.shape[0], 1)
        mask = self._constant(tuple(ids.shape), 1, torch.int32)
        inputs = {"input_ids": ids, "inputs_embeds": None, "attention_mask": mask, "token_type_ids": types, "position_ids": None}
        return self._step(inputs, logits=logits, hidden=hidden, mask_of_ones=True)

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
        self, inputs: dict[str, torch.Tensor | None], *, logits: str | None, hidden: bool, layer_inputs: bool = False,
        mask_of_ones: bool = False,
    ) -> StepOutput:
        batch, seq = inputs["attention_mask"].shape
        if self.graphs is None or layer_inputs:
            out = self._run_step(inputs, self._constant((1,), seq, torch.int64), logits=logits, hidden=hidden, layer_inputs=layer_inputs)
        else:
            out = self._graph_step(inputs, logits=logits, hidden=hidden, mask_of_ones=mask_of_ones)
        self.cache.advance(batch, seq)
        return out

    def _constant(self, shape: tuple[int, ...], value: int, dtype: torch.dtype) -> torch.Tensor:
        key = (shape, value, dtype)
        if key not in self._constants:
            self._constants[key] = torch.full(shape, value, dtype=dtype, device=self.device)
        return self._constants[key]

    def _run_step(self, inputs: dict[str, torch.Tensor | None], new_tokens: torch.Tensor, **options) -> StepOutput:
        # The torch ops attend over the slots in use only; the kernels skip the rest themselves and
        # keep the cache's full, static shape, as a captured graph needs.
        window = self.cache.used + inputs["attention_mask"].shape[1] if self.backend == "torch" else None
        return gpt2_step(
            self.ops, self.config, self.weights, self.cache, inputs["input_ids"], inputs["attention_mask"], new_tokens,
            position_ids=inputs.get("position_ids"), token_type_ids=inputs.get("token_type_ids"),
            inputs_embeds=inputs.get("inputs_embeds"), attention_window=window, **options,
        )

    def _graph_step(
        self, inputs: dict[str, torch.Tensor | None], *, logits: str | None, hidden: bool, mask_of_ones: bool
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
        key = (rows, length, tuple(sorted(given)), logits, hidden)

        def step(buffers: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
            out = self._run_step(buffers, buffers["new_tokens"], logits=logits, hidden=hidden)
            return out.hidden_states, out.logits

        hidden_states, out_logits = self.graphs.run(key, given, step, leading=(rows, length), known=known)
        if hidden_states is not None:
            hidden_states = hidden_states[:batch, :seq].clone()
        if out_logits is not None:
            out_logits = (out_logits[:batch, :seq] if logits == "all" else out_logits[:batch]).clone()
        return StepOutput(hidden_states, out_logits)


def _check_logits_mode(logits: str | None) -> None:
    if logits not in LOGITS_MODES:
        raise ValueError(f"logits={logits!r} must be one of {LOGITS_MODES}")
