"""The math of every fused kernel, in plain PyTorch: the ``torch`` backend and the oracle of the tests.

Each function has the same name and signature as its launcher in ``launchers.py``. Arithmetic runs in
float32 (float64 when given float64, so tests can build a float64 oracle) and is rounded to the input
dtype once, at the end, as the kernels do; attention probabilities are rounded to V's dtype before
P @ V, as transformers does. Shapes:
  B batch, T new tokens per row, C = H * D model width, S cache slots, N output features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .activations import activation_formula
from .cpu_matmul import addmm_rows


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


_FORMULAS = {
    "identity": lambda x: x,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_erf": lambda x: F.gelu(x),
    "gelu_erf_clip10": lambda x: F.gelu(x).clamp(-10.0, 10.0),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "relu6": F.relu6,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "mish": lambda x: x * torch.tanh(F.softplus(x)),
    "hardswish": F.hardswish,
    "laplace": lambda x: 0.5 * (1.0 + torch.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
}


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """transformers' ACT2FN[name](x), for every name that `activations.ACTIVATIONS` knows."""
    return _FORMULAS[activation_formula(name)](x)


def embedding(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    wte: torch.Tensor,
    wpe: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """(inputs_embeds or wte[ids]) + wpe[pos] (+ wte[token_type_ids]): [...] int -> [..., C]."""
    tokens = inputs_embeds if inputs_embeds is not None else wte[input_ids]
    acc = tokens.to(_compute_dtype(wte)) + wpe[position_ids].to(_compute_dtype(wte))
    if token_type_ids is not None:
        acc = acc + wte[token_type_ids].to(_compute_dtype(wte))
    return acc.to(wte.dtype)


def _normalize(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = _compute_dtype(x)
    return F.layer_norm(x.to(dtype), (x.shape[-1],), weight.to(dtype), bias.to(dtype), eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension: [..., C] -> [..., C]."""
    return _normalize(x, weight, bias, eps).to(x.dtype)


def ln_linear(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "linear",
) -> torch.Tensor:
    """act(LN(x) @ weight + bias): [..., K] -> [..., N]. weight is [K, N] (a transposed view works:
    the LM head passes wte.T). The normalized row is rounded to the weight dtype before the matmul."""
    h = _normalize(x, ln_weight, ln_bias, eps).to(weight.dtype).to(_compute_dtype(x))
    rows = h.reshape(-1, h.shape[-1])
    w = weight.to(h.dtype)
    y = addmm_rows(rows, w, None if bias is None else bias.to(h.dtype))
    y = _FORMULAS[activation_formula(activation)](y).to(x.dtype)
    return y.view(*x.shape[:-1], weight.shape[1])


def linear_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + x @ weight + bias: [..., K] -> [..., N]."""
    dtype = _compute_dtype(x)
    rows = x.to(dtype).reshape(-1, x.shape[-1])
    y = addmm_rows(rows, weight.to(dtype), bias.to(dtype)).view(*x.shape[:-1], weight.shape[1])
    return y.add_(residual.to(dtype)).to(x.dtype)


def ln_qkv_projection(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_slots: torch.Tensor,
) -> torch.Tensor:
    """LN(x) @ W_attn + b_attn for x [B, T, C], split q | k | v. K and V go into the caches
    [B_cache, H, S, D] at row b, slot cache_slots[b, t] (slots outside [0, S) are not written);
    q is returned as [B, T, C], heads contiguous along C."""
    width = x.shape[-1]
    n_head, head_dim = k_cache.shape[1], k_cache.shape[3]
    qkv = ln_linear(x, ln_weight, ln_bias, eps, weight, bias)
    q, k, v = qkv.split(width, dim=-1)
    rows, tokens = ((cache_slots >= 0) & (cache_slots < k_cache.shape[2])).nonzero(as_tuple=True)
    slots = cache_slots[rows, tokens].long()
    # Through a [B, S, H, D] view, (row, slot) picks one token's [H, D] block.
    k_cache.transpose(1, 2).index_put_((rows, slots), k[rows, tokens].view(-1, n_head, head_dim).to(k_cache.dtype))
    v_cache.transpose(1, 2).index_put_((rows, slots), v[rows, tokens].view(-1, n_head, head_dim).to(v_cache.dtype))
    return q.contiguous()


def flash_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of q [B, T, C] against the caches [B_cache, H, S, D].

    Query t of row b sits at slot query_start[b] + t and sees slot j when j <= its slot and
    key_mask[b, j] != 0. Scores and softmax are float32; a query that sees no slot gets zeros.
    Returns [B, T, C]."""
    batch, seq, width = q.shape
    n_head, slots, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    dtype = _compute_dtype(q)
    qh = q.reshape(batch, seq, n_head, head_dim).transpose(1, 2).to(dtype)  # [B, H, T, D]
    k, v = k_cache[:batch].to(dtype), v_cache[:batch]
    query_slot = query_start.view(batch, 1, 1) + torch.arange(seq, device=q.device).view(1, seq, 1)  # [B, T, 1]
    visible = (torch.arange(slots, device=q.device) <= query_slot) & (key_mask[:batch] != 0).unsqueeze(1)
    visible = visible.unsqueeze(1)  # [B, 1, T, S]
    if v.dtype == dtype:
        # Rounding P to V's dtype is a no-op here, so torch's fused attention computes the same math.
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=visible, scale=scale)
    else:
        # The scale is applied to q (T x D numbers) rather than to the scores (T x S); both are float32.
        scores = (qh * scale) @ k.transpose(-1, -2)  # [B, H, T, S]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out = probs.to(v.dtype).to(dtype) @ v.to(dtype)  # [B, H, T, D]
    out = out.masked_fill(~visible.any(-1, keepdim=True), 0.0)  # a query that sees no slot: NaN until here
    return out.transpose(1, 2).reshape(batch, seq, width).to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per row: q [B, C] at slot query_start[b], attending as in flash_attention. [B, C]."""
    return flash_attention(q.unsqueeze(1), k_cache, v_cache, query_start, key_mask, scale).squeeze(1)
