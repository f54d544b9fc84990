"""The fused linear layer of every GPT-2 matmul: y = epilogue(prologue(x) @ W + b).

    prologue  LayerNorm of each row (NORMALIZE), rounded to W's dtype before the product
    epilogue  + bias (HAS_BIAS), activation (ACTIVATION), + residual (HAS_RESIDUAL), then either a
              plain row-major store or, for c_attn (QKV), q to [B, T, C] and k, v into the KV cache
              [B_cache, H, S, D] at each row's slot.

W is [K, N] with any strides, so the LM head reads wte [N, K] as wte.T without a copy. Accumulation is
float32. The LayerNorm statistics come from one pass over the row in BLOCK_K chunks merged with
Chan's formula, which stays exact when the mean is large next to the spread (GPT-2's residual stream
has such outlier features) at no extra read of x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import activation_formula
from .launch import launch
from .tiling import matmul_tiles
from .validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_finite,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)


@triton.jit
def _tanh(x):
    # The interpreter has no libdevice tanh.
    # 2*sigmoid(2x) - 1: exp overflows to inf for large -x, which gives -1 exactly, never NaN.
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _softplus(x):
    # torch's softplus returns x itself above 20.
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def apply_activation(x, FORMULA: tl.constexpr):
    """x is float32; FORMULA is a value of ACTIVATIONS."""
    if FORMULA == "gelu_tanh":
        x = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif FORMULA == "gelu_erf":
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif FORMULA == "gelu_erf_clip10":
        x = tl.minimum(tl.maximum(0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476)), -10.0), 10.0)
    elif FORMULA == "quick_gelu":
        x = x / (1.0 + tl.exp(-1.702 * x))
    elif FORMULA == "relu":
        x = tl.maximum(x, 0.0)
    elif FORMULA == "relu2":
        x = tl.maximum(x, 0.0)
        x = x * x
    elif FORMULA == "relu6":
        x = tl.minimum(tl.maximum(x, 0.0), 6.0)
    elif FORMULA == "leaky_relu":
        x = tl.where(x >= 0.0, x, 0.01 * x)
    elif FORMULA == "silu":
        x = x / (1.0 + tl.exp(-x))
    elif FORMULA == "sigmoid":
        x = 1.0 / (1.0 + tl.exp(-x))
    elif FORMULA == "tanh":
        x = _tanh(x)
    elif FORMULA == "mish":
        x = x * _tanh(_softplus(x))
    elif FORMULA == "hardswish":
        x = x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    elif FORMULA == "laplace":
        x = 0.5 * (1.0 + tl.math.erf((x - 0.707107) / (0.282095 * 1.4142135623730951)))
    elif FORMULA == "sqrtsoftplus":
        x = tl.sqrt(_softplus(x))
    return x


@triton.jit
def linear_kernel(
    x_ptr, stride_xm, ln_w_ptr, ln_b_ptr, eps,
    w_ptr, stride_wk, stride_wn, bias_ptr,
    res_ptr, stride_rm, out_ptr, stride_om,
    k_cache_ptr, v_cache_ptr, slots_ptr, stride_cb, stride_ch, stride_cs, n_slots, seq_len, width, head_dim,
    M, N, K,
    NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    QKV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < M
    col_in = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm

    if NORMALIZE:
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        n_seen = 0.0
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_in = ks < K
            a = tl.load(x_rows + ks[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0).to(tl.float32)
            n_chunk = tl.sum(k_in.to(tl.float32), axis=0)
            chunk_mean = tl.sum(a, axis=1) / n_chunk
            centered = tl.where(k_in[None, :], a - chunk_mean[:, None], 0.0)
            delta = chunk_mean - mean
            total = n_seen + n_chunk
            mean += delta * (n_chunk / total)
            m2 += tl.sum(centered * centered, axis=1) + delta * delta * (n_seen * n_chunk / total)
            n_seen = total
        rstd = 1.0 / tl.sqrt(m2 / K + eps)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_in = ks < K
        a = tl.load(x_rows + ks[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0)
        if NORMALIZE:
            gamma = tl.load(ln_w_ptr + ks, mask=k_in, other=0.0).to(tl.float32)
            beta = tl.load(ln_b_ptr + ks, mask=k_in, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
        w = tl.load(
            w_ptr + ks.to(tl.int64)[:, None] * stride_wk + cols.to(tl.int64)[None, :] * stride_wn,
            mask=k_in[:, None] & col_in[None, :],
            other=0.0,
        )
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    acc = apply_activation(acc, ACTIVATION)
    inside = row_in[:, None] & col_in[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + rows.to(tl.int64)[:, None] * stride_rm + cols[None, :], mask=inside, other=0.0).to(
            tl.float32
        )
    y = acc.to(out_ptr.dtype.element_ty)

    if QKV:
        part = cols // width
        channel = cols % width
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + channel[None, :], y, mask=inside & (part == 0)[None, :])
        slot = tl.load(slots_ptr + rows, mask=row_in, other=-1).to(tl.int64)
        # A slot outside the cache is dropped rather than written out of bounds; the engine checks slots.
        slot_in = (slot >= 0) & (slot < n_slots)
        batch = (rows // seq_len).to(tl.int64)
        cache_at = (
            batch[:, None] * stride_cb
            + (channel // head_dim).to(tl.int64)[None, :] * stride_ch
            + slot[:, None] * stride_cs
            + (channel % head_dim)[None, :]
        )
        kv_inside = inside & slot_in[:, None]
        tl.store(k_cache_ptr + cache_at, y, mask=kv_inside & (part == 1)[None, :])
        tl.store(v_cache_ptr + cache_at, y, mask=kv_inside & (part == 2)[None, :])
    else:
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], y, mask=inside)


def _check_weight(weight: torch.Tensor, bias: torch.Tensor | None, in_features: int) -> int:
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2, contiguous=False)
    if weight.shape[0] != in_features:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected [{in_features}, N] (Conv1D layout)")
    if 1 not in weight.stride():
        raise ValueError(f"weight needs a unit stride in one dimension, got strides {weight.stride()}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
        check_shape("bias", bias, (weight.shape[1],))
    return weight.shape[1]


def _check_rows(x: torch.Tensor) -> torch.Tensor:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty tensor of rows [..., K], got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])


def _check_layer_norm(ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, width: int) -> None:
    check_tensor("ln_weight", ln_weight, dtypes=FLOAT_DTYPES, ndim=1)
    check_tensor("ln_bias", ln_bias, dtypes=FLOAT_DTYPES, ndim=1)
    check_shape("ln_weight", ln_weight, (width,))
    check_shape("ln_bias", ln_bias, (width,))
    check_finite("eps", eps)


def _run(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    *,
    layer_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    residual: torch.Tensor | None = None,
    activation: str = "linear",
    kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
) -> None:
    m, k = rows.shape
    n = weight.shape[1]
    tiles = matmul_tiles(m, n, k, rows.element_size())
    ln_w, ln_b, eps = layer_norm if layer_norm is not None else (None, None, 0.0)
    if kv_cache is not None:
        k_cache, v_cache, slots, seq_len = kv_cache
        cache_args = (k_cache, v_cache, slots, *k_cache.stride()[:3], k_cache.shape[2], seq_len, n // 3, k_cache.shape[3])
    else:
        cache_args = (None, None, None, 0, 0, 0, 1, 1, 1, 1)
    launch(
        linear_kernel,
        (triton.cdiv(m, tiles.block_m), triton.cdiv(n, tiles.block_n)),
        rows, rows.stride(0), ln_w, ln_b, eps,
        weight, weight.stride(0), weight.stride(1), bias,
        residual, residual.stride(0) if residual is not None else 0, out, out.stride(0),
        *cache_args,
        m, n, k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        NORMALIZE=layer_norm is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        ACTIVATION=activation_formula(activation), QKV=kv_cache is not None,
        DOT_PRECISION="ieee" if rows.dtype == torch.float32 else "tf32",
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
    )


def ln_linear(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "linear",
) -> torch.Tensor:
    """act(LN(x) @ weight + bias) for x [..., K], weight [K, N]: c_fc with its activation, or the LM
    head with ln_f folded in (weight = wte.T, no bias). Returns [..., N] in x's dtype."""
    rows = _check_rows(x)
    n = _check_weight(weight, bias, rows.shape[1])
    _check_layer_norm(ln_weight, ln_bias, eps, rows.shape[1])
    check_same_dtype(x=x, ln_weight=ln_weight, ln_bias=ln_bias, weight=weight, bias=bias)
    check_same_device(x=x, ln_weight=ln_weight, ln_bias=ln_bias, weight=weight, bias=bias)
    activation_formula(activation)
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    _run(rows, weight, bias, out, layer_norm=(ln_weight, ln_bias, eps), activation=activation)
    return out.view(*x.shape[:-1], n)


def linear_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + x @ weight + bias for x [..., K], weight [K, N], residual [..., N]: the c_proj of
    attention and of the MLP. Returns [..., N] in x's dtype."""
    rows = _check_rows(x)
    n = _check_weight(weight, bias, rows.shape[1])
    check_tensor("residual", residual, dtypes=FLOAT_DTYPES)
    check_shape("residual", residual, (*x.shape[:-1], n))
    check_same_dtype(x=x, weight=weight, bias=bias, residual=residual)
    check_same_device(x=x, weight=weight, bias=bias, residual=residual)
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    _run(rows, weight, bias, out, residual=residual.reshape(-1, n))
    return out.view(*x.shape[:-1], n)


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
    """c_attn: LN(x) @ W + b for x [B, T, C], W [C, 3C], split q | k | v. k and v are written into
    the caches [B_cache, H, S, D] at row b, slot cache_slots[b, t]; q is returned as [B, T, C]."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=3)
    batch, seq, width = x.shape
    rows = _check_rows(x)
    n = _check_weight(weight, bias, width)
    if n != 3 * width:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; c_attn needs [{width}, {3 * width}]")
    _check_layer_norm(ln_weight, ln_bias, eps, width)
    check_tensor("k_cache", k_cache, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("v_cache", v_cache, dtypes=FLOAT_DTYPES, ndim=4)
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    cache_batch, n_head, _, head_dim = k_cache.shape
    if n_head * head_dim != width:
        raise ValueError(f"k_cache has {n_head} heads of {head_dim}, which does not make x's width {width}")
    if batch > cache_batch:
        raise ValueError(f"batch {batch} is larger than the cache's {cache_batch} rows")
    check_tensor("cache_slots", cache_slots, dtypes=INDEX_DTYPES)
    check_shape("cache_slots", cache_slots, (batch, seq))
    check_same_dtype(x=x, ln_weight=ln_weight, ln_bias=ln_bias, weight=weight, bias=bias, k_cache=k_cache, v_cache=v_cache)
    check_same_device(
        x=x, ln_weight=ln_weight, ln_bias=ln_bias, weight=weight, bias=bias,
        k_cache=k_cache, v_cache=v_cache, cache_slots=cache_slots,
    )
    q = torch.empty(batch, seq, width, dtype=x.dtype, device=x.device)
    _run(
        rows, weight, bias, q.view(-1, width),
        layer_norm=(ln_weight, ln_bias, eps), kv_cache=(k_cache, v_cache, cache_slots, seq),
    )
    return q
