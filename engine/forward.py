"""One GPT-2 step over the static cache, written once against an ops module (kernels or reference).

The step reads no device value on the host and takes every shape from its inputs, so the same code
runs eagerly, under Triton's interpreter, and inside a captured CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import torch

from .config import GPT2Config
from .kv_cache import StaticKVCache
from .weights import GPT2Weights

LOGITS_MODES = ("last", "all", None)


@dataclass
class StepOutput:
    hidden_states: torch.Tensor | None  # [B, T, C], after ln_f
    logits: torch.Tensor | None  # [B, V] for "last" (each row's last real token), [B, T, V] for "all"
    layer_inputs: list[torch.Tensor] = field(default_factory=list)  # the residual stream entering each layer


def positions_from_mask(next_position: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' generate derives them: count real tokens, padding gets 1.
    (A decode step's are derived inside the backend's decode_embedding.)"""
    positions = next_position[:, None] + attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def gpt2_step(
    ops: ModuleType,
    config: GPT2Config,
    weights: GPT2Weights,
    cache: StaticKVCache,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    new_tokens: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    logits: str | None = "last",
    hidden: bool = False,
    layer_inputs: bool = False,
    head_scale: torch.Tensor | None = None,
    slot_positions: bool = False,
) -> StepOutput:
    """Run input_ids [B, T] (or inputs_embeds [B, T, C]) through the model, appending to the cache
    at each row's length.

    attention_mask [B, T] marks real tokens (1) and padding (0); new_tokens [1] is how far the
    rows' lengths advance (T, or fewer when T was padded up to a graph bucket). T == 1 is a decode
    step (split-KV attention), T > 1 a prefill (flash attention). head_scale [n_layer, n_head], when
    given, multiplies each head's attention output (transformers' head_mask). Positions, unless
    given, are derived from the mask as generate does, or are the slots (past + arange(T), as
    transformers' forward does) when slot_positions."""
    batch, seq = attention_mask.shape
    if seq == 1:
        # Decode: one launch embeds the tokens and does the cache bookkeeping (slots, key mask,
        # positions, lengths): small launches are a large part of a decode step on a GPU. The
        # layers read the slots it returns, since the cache's lengths have already advanced.
        x, slots = ops.decode_embedding(
            input_ids, position_ids, weights.wte, weights.wpe, token_type_ids, inputs_embeds,
            attention_mask=attention_mask, new_tokens=new_tokens, lengths=cache.lengths,
            next_position=cache.next_position, key_mask=cache.key_mask, slot_positions=slot_positions,
        )  # [B, 1, C], [B, 1]
        start = slots[:, 0]
    else:
        start = cache.lengths[:batch]
        slots = start[:, None] + torch.arange(seq, device=attention_mask.device)
        cache.key_mask[:batch].scatter_(1, slots, attention_mask.to(torch.int32))
        if position_ids is None:
            position_ids = slots if slot_positions else positions_from_mask(cache.next_position[:batch], attention_mask)
        x = ops.embedding(input_ids, position_ids, weights.wte, weights.wpe, token_type_ids, inputs_embeds)  # [B, T, C]
    access = ops.cache_access(slots, start, cache.key_mask, cache.semaphores)
    eps, width = config.layer_norm_epsilon, config.n_embd
    collected = []
    for i, layer in enumerate(weights.layers):
        if layer_inputs:
            collected.append(x.values)
        keys, values = cache.keys[i], cache.values[i]
        q = ops.ln_qkv_projection(
            x, layer.ln_1_weight, layer.ln_1_bias, eps, layer.attn_weight, layer.attn_bias, keys, values, access
        )
        scale = config.attention_scale(i)
        if seq == 1:
            attn = ops.decode_attention(q.view(batch, width), keys, values, access, scale).view(batch, 1, width)
        else:
            attn = ops.flash_attention(q, keys, values, access, scale)
        if head_scale is not None:
            attn = (attn.view(batch, seq, config.n_head, -1) * head_scale[i, :, None]).view(batch, seq, width)
        x = ops.linear_residual(attn, layer.attn_proj_weight, layer.attn_proj_bias, x, semaphores=access.semaphores)
        x = ops.mlp(
            x, layer.ln_2_weight, layer.ln_2_bias, eps, layer.fc_weight, layer.fc_bias, config.activation_function,
            layer.mlp_proj_weight, layer.mlp_proj_bias, semaphores=access.semaphores,
        )

    if seq > 1:
        cache.lengths[:batch].add_(new_tokens)
        cache.next_position[:batch].add_(attention_mask.sum(-1))

    hidden_states = ops.layer_norm(x.values, weights.ln_f_weight, weights.ln_f_bias, eps) if hidden else None
    out_logits = None
    if logits == "last":
        if seq == 1:
            final = x.rows((slice(None), 0))
        else:
            # Each row's last real token: the first 1 of the mask read from the end.
            last = seq - 1 - attention_mask.flip(-1).long().argmax(-1)
            final = x.rows((torch.arange(batch, device=attention_mask.device), last))  # [B, C]
        out_logits = ops.ln_linear(
            final, weights.ln_f_weight, weights.ln_f_bias, eps, weights.head_weight, semaphores=access.semaphores
        )
    elif logits == "all":
        out_logits = ops.ln_linear(x, weights.ln_f_weight, weights.ln_f_bias, eps, weights.head_weight, semaphores=access.semaphores)
    return StepOutput(hidden_states, out_logits, collected)
