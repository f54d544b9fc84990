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
from tritongpt2.engine.weights import split_state_dict

from .cache import StaticCacheHandle
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
        fields (dtype=, device=, backend=, max_batch=, max_seq=, cuda_graphs=) or an EngineOptions.
        Batches larger than max_batch run in chunks (and then return no past_key_values)."""
        checkpoint = load_checkpoint(name_or_path)
        engine = Engine.from_checkpoint(checkpoint, EngineOptions.of(options, **option_values))
        model = cls(engine.config, engine)
        _, head_state = split_state_dict(checkpoint.state)
        head_state.pop("lm_head.weight", None)  # the engine's: tied to wte or loaded with it
        model._load_heads({k: v.to(device=engine.device, dtype=engine.weights.dtype) for k, v in head_state.items()})
        return model.eval()

    def _load_heads(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        shared = {name for name, p in params.items() if p.data_ptr() == self.engine.weights.lm_head.data_ptr()}
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

    def _tied_lm_head(self) -> nn.Linear:
        head = nn.Linear(self.config.n_embd, self.config.vocab_size, bias=False, device="meta")
        head.weight = nn.Parameter(self.engine.weights.lm_head, requires_grad=False)
        return head

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
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        lm_logits: bool = False,
    ) -> tuple[BaseModelOutputWithPastAndCrossAttentions, torch.Tensor | None]:
        """GPT2Model's forward (inputs [..., T], positions past + arange(T) unless given), and the LM
        logits of every position when lm_logits."""
        if output_attentions:
            raise NotImplementedError(OUTPUT_ATTENTIONS_GAP)
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
        if input_ids is None and inputs_embeds is None:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        engine = self.engine
        lead = tuple(input_ids.shape[:-1]) if input_ids is not None else tuple(inputs_embeds.shape[:-2])
        seq = input_ids.shape[-1] if input_ids is not None else inputs_embeds.shape[-2]
        ids = input_ids.reshape(-1, seq) if input_ids is not None else None
        embeds = inputs_embeds.reshape(-1, seq, inputs_embeds.shape[-1]) if inputs_embeds is not None else None
        rows = (ids if ids is not None else embeds).shape[0]

        past = 0
        if past_key_values is not None:
            if not isinstance(past_key_values, StaticCacheHandle):
                raise ValueError(
                    f"past_key_values must be the past_key_values of this model's previous output, got {type(past_key_values).__name__}"
                )
            past_key_values.check_current(engine)
            past = past_key_values.length
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=engine.device).expand(rows, seq)
        else:
            position_ids = position_ids.reshape(-1, seq).expand(rows, seq)
        if token_type_ids is not None:
            token_type_ids = token_type_ids.reshape(-1, seq)
        if attention_mask is not None:
            attention_mask = attention_mask.reshape(rows, -1)

        chunk = rows if past else engine.cache.max_batch
        outputs = []
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            outputs.append(engine.prefill(
                ids[part] if ids is not None else None,
                attention_mask[part] if attention_mask is not None else None,
                token_type_ids=token_type_ids[part] if token_type_ids is not None else None,
                position_ids=position_ids[part],
                inputs_embeds=embeds[part] if embeds is not None else None,
                logits="all" if lm_logits else None,
                hidden=True,
                layer_inputs=bool(output_hidden_states),
                reset=not past,
            ))
        use_cache = self.config.use_cache if use_cache is None else use_cache
        handle = StaticCacheHandle.of(engine) if use_cache and len(outputs) == 1 else None

        def shaped(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(*lead, *t.shape[1:])

        last = shaped(torch.cat([o.hidden_states for o in outputs]))
        all_states = None
        if output_hidden_states:
            layers = zip(*(o.layer_inputs for o in outputs))
            all_states = tuple(shaped(torch.cat(list(layer))) for layer in layers) + (last,)
        logits = shaped(torch.cat([o.logits for o in outputs])) if lm_logits else None
        return BaseModelOutputWithPastAndCrossAttentions(last, handle, all_states), logits
