"""The shared base of the drop-in classes: loading, and the transformer forward over the engine."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tritongpt2.engine.checkpoint import load_checkpoint
from tritongpt2.engine.config import GPT2Config
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.options import EngineOptions
from tritongpt2.engine.save import save_checkpoint
from tritongpt2.engine.weights import split_state_dict
from tritongpt2.kernels.quantized_weight import QuantizedWeight, is_quantized
from tritongpt2.kernels.reference import matrix

from .cache import KVCache, new_cache, static_length
from .outputs import BaseModelOutputWithPastAndCrossAttentions

OUTPUT_ATTENTIONS_GAP = (
    "output_attentions=True is not supported: the flash-attention kernels never materialise the attention "
    "probabilities; use transformers' eager attention to inspect them"
)


class GPT2PreTrainedModel(nn.Module):
    """A transformers-shaped GPT-2 class over an Engine. Subclasses name their head modules in
    `head_modules()`; their weights load from the checkpoint (missing ones are initialised as
    transformers initialises them, with a warning). Inference only: forward runs without autograd."""

    def __init__(self, config: GPT2Config, engine: Engine, heads: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.config = config
        self.engine = engine
        for name, module in (heads if heads is not None else self.head_modules()).items():
            setattr(self, name, module)

    def head_modules(self) -> dict[str, nn.Module]:
        return {}

    def __reduce_ex__(self, protocol: int) -> tuple:
        # copy.deepcopy and pickle (torch.save of the whole model): the engine is copied as itself
        # (Engine.__reduce__), the heads' own tensors as a state dict, and the model is built again
        # over them, so that its LM head wraps the copied engine's weight, as in the original. What
        # the state dict does not hold (attributes a user set, hooks, a submodule's own train/eval
        # flag) is not copied; copy.copy shares the engine and gives the heads tensors of their own.
        heads = {k: v for k, v in self.state_dict().items() if not k.startswith("lm_head.")}
        return (_rebuilt, (type(self), self.engine, heads, self.training))

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.weights.dtype

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, options: EngineOptions | None = None, **option_values: Any
    ) -> GPT2PreTrainedModel:
        """Load any GPT-2 checkpoint (folder or hub id) into this class. Options as EngineOptions
        fields (dtype=, device=, backend=, max_batch=, max_seq=, cuda_graphs=, quantization=,
        group_size=, double_quant=) or an EngineOptions. A forward's past_key_values is a cache of its
        own (several can be alive at once). A checkpoint that save_pretrained wrote quantized loads
        as it was saved, without quantizing again."""
        options = EngineOptions.of(options, **option_values)  # bad options are refused before anything is read
        checkpoint = load_checkpoint(name_or_path)
        engine = Engine.from_checkpoint(checkpoint, options)
        model = cls(engine.config, engine)
        _, head_state = split_state_dict(checkpoint.state)
        # The engine's: tied to wte or loaded with it (quantized, as its tensors lm_head.weight.q<field>).
        head_state = {k: v for k, v in head_state.items() if k != "lm_head.weight" and not k.startswith("lm_head.weight.")}
        model._load_heads({k: v.to(device=engine.device, dtype=engine.weights.dtype) for k, v in head_state.items()})
        return model.eval()

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write the model as a checkpoint folder: config.json and model.safetensors under
        transformers' keys, which transformers loads too; a quantized model's matmul weights are
        written quantized (engine/quantize.py: `key.q<field>`, and config.json's
        quantization_config), which from_pretrained loads back as they are."""
        heads = {k: v for k, v in self.state_dict().items() if not k.startswith("lm_head.")}  # lm_head: the engine's
        save_checkpoint(save_directory, self.config, self.engine.weights, heads, type(self).__name__)

    def get_output_embeddings(self) -> nn.Module | None:
        """The LM head module (None for classes without one): an nn.Linear over the engine's weight,
        or for a quantized model a QuantizedLMHead that dequantizes it on demand."""
        return getattr(self, "lm_head", None)

    def _load_heads(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        head = self.engine.weights.lm_head
        shared = set() if is_quantized(head) else {name for name, p in params.items() if p.data_ptr() == head.data_ptr()}
        missing = []
        for name, param in params.items():
            if name in shared:
                continue
            if name in state:
                if state[name].shape != param.shape:
                    raise ValueError(f"{name} has shape {tuple(state[name].shape)} in the checkpoint, expected {tuple(param.shape)}")
                param.data.copy_(state[name])
            else:
                missing.append(name)
                nn.init.zeros_(param) if name.endswith("bias") else nn.init.normal_(param, std=self.config.initializer_range)
        unused = sorted(set(state) - set(params))
        if missing:
            warnings.warn(f"{type(self).__name__}: newly initialised (not in the checkpoint): {', '.join(missing)}", stacklevel=3)
        if unused:
            warnings.warn(f"{type(self).__name__}: checkpoint weights not used: {', '.join(unused)}", stacklevel=3)

    def _new_linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
        return nn.Linear(in_features, out_features, bias=bias, device=self.device, dtype=self.dtype).requires_grad_(False)

    def _tied_lm_head(self) -> nn.Module:
        """The LM head module over the engine's own head weight (the logits come from the engine)."""
        if is_quantized(self.engine.weights.lm_head):
            return QuantizedLMHead(self.engine.weights.lm_head, self.dtype)
        head = nn.Linear(self.config.n_embd, self.config.vocab_size, bias=False, device="meta")
        head.weight = nn.Parameter(self.engine.weights.lm_head, requires_grad=False)
        return head

    def _flag(self, name: str, given: bool | None) -> bool:
        """A forward's flag: as given, else the config's default (transformers' PretrainedConfig)."""
        return bool(getattr(self.config, name, False)) if given is None else bool(given)

    @torch.no_grad()
    def _transformer(
        self,
        *,
        input_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        lm_logits: bool = False,
        last_hidden: bool | None = None,
    ) -> tuple[BaseModelOutputWithPastAndCrossAttentions, torch.Tensor | None]:
        """GPT2Model's forward (inputs [..., T], positions past + arange(T) unless given), and the LM
        logits of every position when lm_logits. Without past_key_values a new cache holds the
        inputs (returned when use_cache); with one, the inputs continue from it. last_hidden: whether
        to compute the final hidden states (default: unless lm_logits; always with output_hidden_states)."""
        if self._flag("output_attentions", output_attentions):
            raise NotImplementedError(OUTPUT_ATTENTIONS_GAP)
        shape = input_shape(input_ids, inputs_embeds)
        lead, seq = shape[:-1], shape[-1]
        engine = self.engine
        ids = input_ids.reshape(-1, seq) if input_ids is not None else None
        embeds = inputs_embeds.reshape(-1, seq, inputs_embeds.shape[-1]) if inputs_embeds is not None else None
        rows = (ids if ids is not None else embeds).shape[0]
        use_cache = self._flag("use_cache", use_cache)
        output_hidden_states = self._flag("output_hidden_states", output_hidden_states)

        cache = self.cache_for(past_key_values, rows, seq)
        if position_ids is not None:
            position_ids = _rows_of("position_ids", position_ids, rows, seq)
        if token_type_ids is not None:
            token_type_ids = _rows_of("token_type_ids", token_type_ids, rows, seq)
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise ValueError(f"attention_mask must be a torch.Tensor of [batch, seq] of 0 and 1, got {_described(attention_mask)}")
            if attention_mask.dim() > len(lead) + 1:
                raise ValueError(
                    f"attention_mask must be [batch, seq] (or [batch, past + seq]) of 0 and 1, got {_described(attention_mask)}; "
                    "a 4-D mask needs transformers' own forward (an accelerated model falls back to it)"
                )
            if attention_mask.numel() == 0 or attention_mask.numel() % rows:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected [batch, seq] (or [batch, past + seq]) "
                    f"for inputs of {rows} rows of {seq}"
                )
            attention_mask = attention_mask.reshape(rows, -1)
        if cache is None:
            storage = engine.cache if not use_cache and rows <= engine.cache.max_batch else engine.new_cache(rows, seq)
        else:
            storage = cache.storage
        out = engine.prefill(
            ids, attention_mask, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=embeds,
            logits="all" if lm_logits else None, hidden=(not lm_logits if last_hidden is None else last_hidden) or output_hidden_states,
            layer_inputs=output_hidden_states, reset=cache is None, head_mask=head_mask, cache=storage,
            slot_positions=position_ids is None,  # past + arange(seq), as transformers' forward numbers them
        )
        if use_cache and cache is None:
            cache = new_cache(storage)

        def shaped(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.reshape(*lead, *t.shape[1:])

        last = shaped(out.hidden_states)
        all_states = tuple(shaped(t) for t in out.layer_inputs) + (last,) if output_hidden_states else None
        return BaseModelOutputWithPastAndCrossAttentions(last, cache if use_cache else None, all_states), shaped(out.logits)

    def cache_for(self, past_key_values: Any, rows: int, seq: int) -> KVCache | None:
        """The cache a forward of `rows` x `seq` tokens continues from: this model's own kind (the
        past_key_values it returned), or for an empty transformers cache (generate starts with one) a
        new one of ours, static like it when it is a StaticCache; None for none."""
        if past_key_values is None or isinstance(past_key_values, KVCache):
            return past_key_values
        if hasattr(past_key_values, "get_seq_length") and past_key_values.get_seq_length() == 0:
            length = static_length(past_key_values)
            if length is None:
                return None
            return new_cache(self.engine.new_cache(rows, length, growable=False), static=True)
        raise ValueError(
            f"past_key_values is a {type(past_key_values).__name__}; the tritongpt2 forward continues only from "
            "the past_key_values it returned"
        )


class QuantizedLMHead(nn.Module):
    """The LM head of a quantized model. Its weight is the engine's QuantizedWeight (W [C, vocab],
    `quantized`), which the engine's kernels read for the logits; the module holds no parameter, so
    its state_dict is empty (save_pretrained writes the weight with the engine's, quantized).
    `weight` dequantizes on demand, as nn.Linear's [vocab, C] in the model's dtype: a new tensor each
    time, vocab x C floats, which in-place changes do not reach. forward(h) = h @ W, dequantized
    the same way (the engine's logits are the fast path; this is for code that calls the head)."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.quantized, self.dtype = weight, dtype
        self.in_features, self.out_features = weight.shape

    @property
    def weight(self) -> torch.Tensor:
        return matrix(self.quantized, self.dtype).T

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ matrix(self.quantized, hidden.dtype)

    def extra_repr(self) -> str:
        q = self.quantized
        return f"in_features={self.in_features}, out_features={self.out_features}, {q.format}, group_size={q.group_size}"


def input_shape(input_ids: Any, inputs_embeds: Any) -> tuple[int, ...]:
    """The inputs' shape [..., seq] (inputs_embeds' without n_embd); ValueError unless exactly one of
    them is given, as a non-empty tensor."""
    if input_ids is not None and inputs_embeds is not None:
        raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
    if input_ids is None and inputs_embeds is None:
        raise ValueError("You have to specify either input_ids or inputs_embeds")
    name, inputs, dims = ("input_ids", input_ids, 1) if input_ids is not None else ("inputs_embeds", inputs_embeds, 2)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < dims:
        raise ValueError(f"{name} must be a torch.Tensor of [batch, seq{'' if dims == 1 else ', n_embd'}], got {_described(inputs)}")
    shape = tuple(inputs.shape[: inputs.dim() - dims + 1])
    if 0 in shape:
        raise ValueError(f"{name} is empty (shape {tuple(inputs.shape)})")
    return shape


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def _rows_of(name: str, values: Any, rows: int, seq: int) -> torch.Tensor:
    """position_ids or token_type_ids as [rows, seq] (a single row is shared by every row)."""
    if not isinstance(values, torch.Tensor) or values.dim() == 0 or values.numel() == 0 or values.shape[-1] != seq:
        raise ValueError(f"{name} must be a tensor of [batch, {seq}] like the inputs, got {_described(values)}")
    flat = values.reshape(-1, seq)
    if flat.shape[0] not in (1, rows):
        raise ValueError(f"{name} has {flat.shape[0]} rows of {seq}; the inputs have {rows}")
    return flat.expand(rows, seq)


def _rebuilt(cls: type[GPT2PreTrainedModel], engine: Engine, heads: dict[str, torch.Tensor], training: bool) -> GPT2PreTrainedModel:
    """A copied or unpickled model: its class over the copied engine, with the heads' tensors."""
    model = cls(engine.config, engine)
    model._load_heads(heads)
    return model.train(training)
