"""The torch backend: the fused operations in PyTorch ops, arranged for a CPU.

Same functions and signatures as the Triton launchers (launchers.py), the same math as reference.py,
against which the tests hold it. On a CPU each op costs microseconds of dispatch, so the step does as
few as it can: `cache_access` works out once per step which slots are written, how many are in use
(attention looks at those only: the host reads that count, which costs nothing here) and which each
query sees; a weight oneDNN packed once (the engine's own float32 and native bfloat16 weights) runs
oneDNN's linear at every row count, a plain one oneDNN's linear for batches and a single row split
across threads by columns (cpu_matmul.py), and a quantized weight takes the route cpu_quantized.py
measured fastest for its format and dtype;
attention is torch's fused SDPA (its CPU kernel keeps float32 scores and softmax, and in half
precision multiplies V by P rounded to V's dtype, as the reference does; the tests hold it there),
but for a half-precision decode of enough rows and slots (`batched_decode`), the same math as batched ops.
Unlike the kernels it reads the masked slots below the last query (P is 0 there), as transformers
does: the engine fills them with the request's own padding tokens. Row moments are a kernel device: None here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .activations import activation_formula
from .cpu_matmul import BFLOAT16_GEMM, addmm_rows, bfloat16_linear, bfloat16_linear_runs, packed_linear
from .cpu_quantized import gather_rows, quantized_matmul
from .operands import CacheAccess, Residual
from .packed_weight import PackedWeight, is_packed
from .quantized_weight import QuantizedWeight, is_quantized


_ACTIVATIONS = {
    "identity": lambda x: x,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_erf": F.gelu,
    "gelu_erf_clip10": lambda x: F.gelu(x).clamp_(-10.0, 10.0),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square_(),
    "relu6": F.relu6,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "mish": F.mish,
    "hardswish": F.hardswish,
    "laplace": lambda x: 0.5 * (1.0 + torch.erf((x - 0.707107) / (0.282095 * 2.0**0.5))),
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt_(),
}


def activation_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' ACT2FN[name] (any name activations.ACTIVATIONS knows) as a torch function."""
    return _ACTIVATIONS[activation_formula(name)]


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in the dtype the math runs in: float32, or float64 as given (tests build float64 oracles)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


@dataclass(frozen=True)
class _Prepared:
    window: int  # attention looks at slots [0, window): every slot any query of the step can see
    visible: torch.Tensor  # [B, 1, T, window] bool
    # The same as 0 / -inf, made once per step: SDPA would otherwise convert a bool mask every layer.
    bias: torch.Tensor
    blind: bool  # some query sees no slot at all (left padding): its output must be zeros, not NaN
    write_rows: torch.Tensor  # the (row, slot) of every token written, in token order ...
    write_slots: torch.Tensor
    written: torch.Tensor | None  # ... and which tokens those are, [B * T] flat; None when all of them
    half_biases: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # bias in a half-precision q's dtype

    def bias_for(self, dtype: torch.dtype) -> torch.Tensor:
        """The 0 / -inf bias in q's dtype (SDPA wants a float mask in the query's dtype), cast once a step."""
        if dtype == self.bias.dtype:
            return self.bias
        if dtype not in self.half_biases:
            self.half_biases[dtype] = self.bias.to(dtype)
        return self.half_biases[dtype]


def cache_access(
    slots: torch.Tensor, query_start: torch.Tensor, key_mask: torch.Tensor, semaphores: torch.Tensor | None = None
) -> CacheAccess:
    batch, queries = slots.shape
    n_slots = key_mask.shape[1]
    window = min(n_slots, int(query_start.max()) + queries)
    if queries == 1:
        query_slot = query_start[:, None, None]  # [B, 1, 1]
    else:
        query_slot = (query_start[:, None] + torch.arange(queries, device=slots.device))[:, :, None]  # [B, T, 1]
    visible = (torch.arange(window, device=slots.device) <= query_slot) & (key_mask[:batch, None, :window] != 0)
    blind = not bool(visible.any(-1).all())
    rows = torch.arange(batch, device=slots.device)[:, None].expand(batch, queries).reshape(-1)
    flat_slots = slots.reshape(-1)
    low, high = torch.aminmax(flat_slots)
    visible = visible[:, None]
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=slots.device).masked_fill_(~visible, float("-inf"))
    if int(low) >= 0 and int(high) < n_slots:
        prepared = _Prepared(window, visible, bias, blind, rows, flat_slots, None)
    else:
        written = ((flat_slots >= 0) & (flat_slots < n_slots)).nonzero().squeeze(1)
        prepared = _Prepared(window, visible, bias, blind, rows[written], flat_slots[written], written)
    return CacheAccess(slots, query_start, key_mask, prepared, semaphores)


def _token_rows(ids: torch.Tensor, wte: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """wte[ids], wide; a quantized wte (the LM head's weight [C, vocab]) has its columns `ids`
    dequantized and rounded to the activations' dtype, as the reference does."""
    if is_quantized(wte):
        return _wide(gather_rows(wte, ids).to(dtype))
    return _wide(F.embedding(ids, wte))


def embedding(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    wte: torch.Tensor | QuantizedWeight,
    wpe: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> Residual:
    dtype = wpe.dtype if is_quantized(wte) else wte.dtype
    tokens = _wide(inputs_embeds) if inputs_embeds is not None else _token_rows(input_ids, wte, dtype)
    x = tokens + _wide(F.embedding(position_ids, wpe))
    if token_type_ids is not None:
        x = x + _token_rows(token_type_ids, wte, dtype)
    return Residual(x.to(dtype))


def decode_embedding(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    wte: torch.Tensor | QuantizedWeight,
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
) -> tuple[Residual, torch.Tensor]:
    batch = attention_mask.shape[0]
    slots = lengths[:batch, None].clone()
    key_mask[:batch].scatter_(1, slots, attention_mask)
    if position_ids is None:
        position_ids = slots if slot_positions else next_position[:batch, None].masked_fill(attention_mask == 0, 1)
    x = embedding(input_ids, position_ids, wte, wpe, token_type_ids, inputs_embeds)
    lengths[:batch].add_(new_tokens)
    next_position[:batch].add_(attention_mask[:, 0])
    return x, slots


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(_wide(x), (x.shape[-1],), _wide(weight), _wide(bias), eps).to(x.dtype)


def _product(rows: torch.Tensor, weight: torch.Tensor | PackedWeight | QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """rows [M, K] @ weight (+ bias): float32 (float64 as given), or bfloat16 where a native
    bfloat16 kernel runs it (a bfloat16 weight where the CPU has one, packed or not, cpu_matmul.py;
    a quantized weight's route, cpu_quantized.py), which takes the activations in their own dtype:
    there the product is rounded to bfloat16 with the bias, before the activation or residual."""
    if is_quantized(weight):
        return quantized_matmul(rows, weight, bias)
    if is_packed(weight):
        return packed_linear(rows, weight, bias)
    if bfloat16_linear_runs(rows, weight, bias):
        return bfloat16_linear(rows, weight, bias)
    return addmm_rows(_wide(rows), _wide(weight), None if bias is None else _wide(bias))


def ln_linear(
    x: Residual,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor | QuantizedWeight,
    bias: torch.Tensor | None = None,
    activation: str = "linear",
    *,
    semaphores: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernels' counters (`semaphores`) serve nothing here, as in linear_residual and mlp."""
    values = x.values
    # The normalized row is rounded to the weight's dtype (a quantized weight's: the activations')
    # before the product, as the kernels feed it.
    dtype = values.dtype if is_quantized(weight) else weight.dtype
    if values.dtype == ln_weight.dtype == ln_bias.dtype == dtype:
        # torch's CPU LayerNorm keeps float32 statistics for half-precision rows and rounds once: no casts needed.
        h = F.layer_norm(values, (values.shape[-1],), ln_weight, ln_bias, eps)
    else:
        h = F.layer_norm(_wide(values), (values.shape[-1],), _wide(ln_weight), _wide(ln_bias), eps).to(dtype)
    y = _product(h.reshape(-1, h.shape[-1]), weight, bias)
    y = activation_function(activation)(y)
    return y.to(values.dtype).view(*values.shape[:-1], weight.shape[1])


def linear_residual(
    x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor, residual: Residual, *,
    semaphores: torch.Tensor | None = None,
) -> Residual:
    y = _product(x.reshape(-1, x.shape[-1]), weight, bias)
    y = y.view(*x.shape[:-1], weight.shape[1]).add_(residual.values)  # in place: the residual's dtype needs no cast
    return Residual(y.to(x.dtype))


def mlp(
    x: Residual,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    fc_weight: torch.Tensor | QuantizedWeight,
    fc_bias: torch.Tensor,
    activation: str,
    proj_weight: torch.Tensor | QuantizedWeight,
    proj_bias: torch.Tensor,
    *,
    semaphores: torch.Tensor | None = None,
) -> Residual:
    h = ln_linear(x, ln_weight, ln_bias, eps, fc_weight, fc_bias, activation)
    return linear_residual(h, proj_weight, proj_bias, x)


def ln_qkv_projection(
    x: Residual,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor | QuantizedWeight,
    bias: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    access: CacheAccess,
) -> torch.Tensor:
    batch, seq, width = x.values.shape
    n_head, head_dim = k_cache.shape[1], k_cache.shape[3]
    q, k, v = ln_linear(x, ln_weight, ln_bias, eps, weight, bias).split(width, dim=-1)
    plan: _Prepared = access.prepared
    for new, cache in ((k, k_cache), (v, v_cache)):
        tokens = new.reshape(batch * seq, n_head, head_dim)
        if plan.written is not None:
            tokens = tokens[plan.written]
        # Through a [B, S, H, D] view, (row, slot) picks one token's [H, D] block.
        cache.transpose(1, 2).index_put_((plan.write_rows, plan.write_slots), tokens.to(cache.dtype))
    return q


# Decode (one query a row) in float16, or bfloat16 where the CPU multiplies it natively, runs as
# batched ops rather than torch's CPU SDPA once rows x slots in use reach BATCHED_DECODE_SLOTS. SDPA
# runs each (row, head) as gemms of its own, at about 0.75 us a slot a row for gpt2's 12 heads in
# bfloat16; the batched ops cost about 70 us a layer fixed and 0.25 us a slot a row (a 2-core Zen 4
# EPYC, the cache streamed from memory as in a step). One row: SDPA 46 against 80 us a layer at 50
# slots, 75 against 92 at 100, then 112-180 against 98-118 at 160 and 383 against 190 at 512; a
# gpt2 int8 decode step at 900 slots 19-22 -> 15 ms, at 50-122 slots 0.8 ms slower (so not there).
# Two rows: on a par at 50 slots, 375 against 195 us at 256. 16 rows of 90 slots: 0.74-0.97
# against 1.3-1.45 ms a layer (float16 1.4-2x); 11.8-12.4 -> 5.1-7.2 ms of a 16-row bfloat16 step.
# With oneDNN held to AVX2 the bfloat16 product of P and V is emulated and the batched ops were
# slower. float32's SDPA reads the cache at memory speed already.
BATCHED_DECODE_SLOTS = 128


def batched_decode(rows: int, window: int, dtype: torch.dtype) -> bool:
    """Whether a decode of `rows` rows over `window` slots runs as batched ops rather than SDPA."""
    native = dtype == torch.float16 or (dtype == torch.bfloat16 and BFLOAT16_GEMM)
    return native and rows * window >= BATCHED_DECODE_SLOTS


def _attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, access: CacheAccess, scale: float) -> torch.Tensor:
    """q [B, T, C] -> [B, T, C] over the slots in use."""
    batch, seq, width = q.shape
    n_head, head_dim = k_cache.shape[1], k_cache.shape[3]
    plan: _Prepared = access.prepared
    qh = q.view(batch, seq, n_head, head_dim).transpose(1, 2)  # [B, H, T, D]
    k, v = k_cache[:batch, :, :plan.window], v_cache[:batch, :, :plan.window]
    if seq == 1 and batched_decode(batch, plan.window, q.dtype):
        # The reference's math as batched ops: float32 scores and softmax, P rounded to V's dtype.
        scores = torch.matmul(qh.float(), k.float().transpose(-1, -2)).mul_(scale).add_(plan.bias)
        out = torch.matmul(torch.softmax(scores, -1).to(v.dtype), v)
    elif q.dtype == torch.float64:
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=plan.visible, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=plan.bias_for(q.dtype), scale=scale)
    if plan.blind:
        out = out.masked_fill(~plan.visible.any(-1, keepdim=True), 0.0)
    return out.transpose(1, 2).reshape(batch, seq, width).to(q.dtype)


def flash_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, access: CacheAccess, scale: float
) -> torch.Tensor:
    return _attention(q, k_cache, v_cache, access, scale)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, access: CacheAccess, scale: float
) -> torch.Tensor:
    return _attention(q.unsqueeze(1), k_cache, v_cache, access, scale).squeeze(1)
