"""GPT-2's math in plain PyTorch, written to be read: the oracle of every test, never tuned for speed.

One function per fused operation of the backends (same names, plain tensors in and out), computing in
float32 (float64 when given float64, so tests can build a float64 oracle) and rounding to the input
dtype once, at the end, as the kernels do. Shapes:
  B batch, T new tokens per row, C = H * D model width, S cache slots, N output features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .activations import activation_formula
from .quantized_weight import NF4_BLOCK, NF4_CODE, NESTED_BLOCK, QuantizedWeight, is_quantized


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


_FORMULAS = {
    "identity": lambda x: x,
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
    "gelu_erf": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_erf_clip10": lambda x: (0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))).clamp(-10.0, 10.0),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": lambda x: x.clamp(min=0.0),
    "relu2": lambda x: x.clamp(min=0.0) ** 2,
    "relu6": lambda x: x.clamp(0.0, 6.0),
    "leaky_relu": lambda x: torch.where(x >= 0, x, 0.01 * x),
    "silu": lambda x: x * torch.sigmoid(x),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "mish": lambda x: x * torch.tanh(F.softplus(x)),
    "hardswish": lambda x: x * (x + 3.0).clamp(0.0, 6.0) / 6.0,
    "laplace": lambda x: 0.5 * (1.0 + torch.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
}


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """transformers' ACT2FN[name](x), for every name that `activations.ACTIVATIONS` knows."""
    return _FORMULAS[activation_formula(name)](x)


def _unpack(data: torch.Tensor) -> torch.Tensor:
    """Packed 4-bit values [K // 2, N] -> [K, N]: row 2j from the high nibble of byte j, 2j + 1 from the low."""
    high, low = data >> 4, data & 15
    return torch.stack([high, low], dim=1).reshape(2 * data.shape[0], data.shape[1])


def nf4_absmax(w: QuantizedWeight) -> torch.Tensor:
    """An nf4 weight's absmax [K // 64, N] float32, decoded from its 8-bit codes under double quantization."""
    if not w.double_quant:
        return w.scale
    groups, n = w.scale.shape
    block = (torch.arange(n, device=w.device)[None, :] * groups + torch.arange(groups, device=w.device)[:, None]) // NESTED_BLOCK
    return w.code[w.scale.long()] * w.nested_absmax[block] + w.nested_offset


def dequantize(w: QuantizedWeight) -> torch.Tensor:
    """The float32 matrix W [K, N] a quantized weight stands for (its formulas: quantized_weight.py)."""
    if w.format == "int8":
        return w.data.float() * w.scale
    q = _unpack(w.data).float()
    if w.format == "int4":
        return (q - w.zero.float().repeat_interleave(w.group_size, 0)) * w.scale.repeat_interleave(w.group_size, 0)
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
    return code[q.long()] * nf4_absmax(w).repeat_interleave(NF4_BLOCK, 0)


def matrix(weight: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """A product's weight [K, N] as the activations of `dtype` meet it: a float weight as it is, a
    quantized one dequantized and rounded to `dtype` (plain quantize-then-dequantize)."""
    return dequantize(weight).to(dtype) if is_quantized(weight) else weight


def embedding_table(wte: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """wte [vocab, C]; a quantized one is stored as the LM head's weight [C, vocab]."""
    return matrix(wte, dtype).T if is_quantized(wte) else wte


def embedding(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    wte: torch.Tensor,
    wpe: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """(inputs_embeds or wte[ids]) + wpe[pos] (+ wte[token_type_ids]): [...] int -> [..., C]. A
    quantized wte's rows are dequantized and rounded to wpe's dtype."""
    wte = embedding_table(wte, wpe.dtype)
    dtype = _compute_dtype(wte)
    tokens = inputs_embeds if inputs_embeds is not None else wte[input_ids]
    x = tokens.to(dtype) + wpe[position_ids].to(dtype)
    if token_type_ids is not None:
        x = x + wte[token_type_ids].to(dtype)
    return x.to(wte.dtype)


def decode_embedding(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    wte: torch.Tensor,
    wpe: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor,
    new_tokens: torch.Tensor,
    lengths: torch.Tensor,
    next_position: torch.Tensor,
    key_mask: torch.Tensor,
    slot_positions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """embedding() of one token per row, inputs [B, 1], taking the step's cache bookkeeping too.

    Row b's token goes to slot lengths[b] (inside the cache), where key_mask[b, slot] becomes
    attention_mask[b]; its position, unless given, is that slot when slot_positions (transformers'
    forward: past + arange(T)), else next_position[b] for a real token and 1 for padding (what
    generate derives from the mask). Then lengths[b] advance by new_tokens and next_position[b] by
    the mask. Returns the embeddings [B, 1, C] and the slots [B, 1] (the lengths before the step)."""
    batch = attention_mask.shape[0]
    slots = lengths[:batch, None].clone()
    positions = torch.empty_like(slots)
    for b in range(batch):
        slot, real = int(slots[b, 0]), int(attention_mask[b, 0])
        key_mask[b, slot] = real
        if position_ids is not None:
            positions[b, 0] = position_ids[b, 0]
        elif slot_positions:
            positions[b, 0] = slot
        else:
            positions[b, 0] = next_position[b] if real else 1
        lengths[b] += new_tokens[0]
        next_position[b] += real
    return embedding(input_ids, positions, wte, wpe, token_type_ids, inputs_embeds), slots


def _normalized(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.to(_compute_dtype(x))
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * weight.to(x.dtype) + bias.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension: [..., C] -> [..., C]."""
    return _normalized(x, weight, bias, eps).to(x.dtype)


def ln_linear(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor | QuantizedWeight,
    bias: torch.Tensor | None = None,
    activation: str = "linear",
) -> torch.Tensor:
    """act(LN(x) @ weight + bias): [..., K] -> [..., N]. weight is [K, N] (the LM head passes wte.T).
    The normalized row is rounded to the weight's dtype before the product, as the kernels feed it."""
    dtype = _compute_dtype(x)
    weight = matrix(weight, x.dtype)
    h = _normalized(x, ln_weight, ln_bias, eps).to(weight.dtype).to(dtype)
    y = h @ weight.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return apply_activation(y, activation).to(x.dtype)


def linear_residual(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + x @ weight + bias: [..., K] -> [..., N]."""
    dtype = _compute_dtype(x)
    weight = matrix(weight, x.dtype)
    return (residual.to(dtype) + x.to(dtype) @ weight.to(dtype) + bias.to(dtype)).to(x.dtype)


def mlp(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    fc_weight: torch.Tensor | QuantizedWeight,
    fc_bias: torch.Tensor,
    activation: str,
    proj_weight: torch.Tensor | QuantizedWeight,
    proj_bias: torch.Tensor,
) -> torch.Tensor:
    """x + act(LN(x) @ fc_weight + fc_bias) @ proj_weight + proj_bias, h rounded to x's dtype between."""
    h = ln_linear(x, ln_weight, ln_bias, eps, fc_weight, fc_bias, activation)
    return linear_residual(h, proj_weight, proj_bias, x)


def ln_qkv_projection(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor | QuantizedWeight,
    bias: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_slots: torch.Tensor,
) -> torch.Tensor:
    """LN(x) @ W_attn + b_attn for x [B, T, C], split q | k | v. K and V go into the caches
    [B_cache, H, S, D] at row b, slot cache_slots[b, t] (slots outside [0, S) are not written);
    q is returned as [B, T, C], heads contiguous along C."""
    batch, seq, width = x.shape
    n_head, n_slots, head_dim = k_cache.shape[1:]
    q, k, v = ln_linear(x, ln_weight, ln_bias, eps, weight, bias).split(width, dim=-1)
    for b in range(batch):
        for t in range(seq):
            slot = int(cache_slots[b, t])
            if 0 <= slot < n_slots:
                k_cache[b, :, slot] = k[b, t].view(n_head, head_dim).to(k_cache.dtype)
                v_cache[b, :, slot] = v[b, t].view(n_head, head_dim).to(v_cache.dtype)
    return q.contiguous()


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of q [B, T, C] against the caches [B_cache, H, S, D].

    Query t of row b sits at slot query_start[b] + t and sees slot j when j <= its slot and
    key_mask[b, j] != 0. Scores and softmax are float32; the probabilities are rounded to V's dtype
    before P @ V, as transformers does; a query that sees no slot gets zeros. Returns [B, T, C]."""
    batch, seq, width = q.shape
    n_head, n_slots, head_dim = k_cache.shape[1:]
    dtype = _compute_dtype(q)
    qh = q.view(batch, seq, n_head, head_dim).transpose(1, 2).to(dtype)  # [B, H, T, D]
    k, v = k_cache[:batch].to(dtype), v_cache[:batch]
    scores = (qh @ k.transpose(-1, -2)) * scale  # [B, H, T, S]
    query_slot = query_start.view(batch, 1, 1) + torch.arange(seq, device=q.device).view(1, seq, 1)  # [B, T, 1]
    visible = (torch.arange(n_slots, device=q.device) <= query_slot) & (key_mask[:batch] != 0).unsqueeze(1)  # [B, T, S]
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row of -inf (sees nothing): NaN -> 0
    out = probs.to(v.dtype).to(dtype) @ v.to(dtype)  # [B, H, T, D]
    return out.transpose(1, 2).reshape(batch, seq, width).to(q.dtype)


def row_moments(x: torch.Tensor, block: int) -> torch.Tensor:
    """The row moments a kernel stores with the residual stream x [..., C]: for each run of `block`
    columns, (count, mean, M2), [..., ceil(C / block), 3] float32."""
    moments = []
    for start in range(0, x.shape[-1], block):
        part = x[..., start:start + block].to(_compute_dtype(x))
        mean = part.mean(-1)
        m2 = ((part - mean.unsqueeze(-1)) ** 2).sum(-1)
        moments.append(torch.stack([torch.full_like(mean, part.shape[-1]), mean, m2], dim=-1))
    return torch.stack(moments, dim=-2).float()
