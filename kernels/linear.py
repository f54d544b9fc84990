"""The fused linear layer of every GPT-2 matmul: y = epilogue(prologue(x) @ W + b).

    prologue  LayerNorm of each row (NORMALIZE), rounded to W's dtype before the product. The row's
              mean and 1/std are merged from the moments its writer stored (moments.py): a few
              numbers per row, so x is read once, by the product itself.
    epilogue  + bias (HAS_BIAS), activation (ACTIVATION), + residual (HAS_RESIDUAL, which also stores
              the output's row moments for the next LayerNorm), then either a plain row-major store
              or, for c_attn (QKV), q to [B, T, C] and k, v into the KV cache at each row's slot.

W is [K, N] with any strides, so the LM head reads wte [N, K] as wte.T without a copy, or a
QuantizedWeight (int8, int4, nf4), dequantized tile by tile in registers (matmul_parts.accumulate).
Accumulation is float32. Program (i, j) computes rows i * BLOCK_M.. and columns j * BLOCK_N..; each reads its rows of
x once per K step and its columns of W once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import activation_formula
from .launch import launch
from .matmul_parts import accumulate, channel_scaled, linear_epilogue
from .moments import merged_row_statistics
from .operands import MOMENT_FIELDS, CacheAccess, Residual
from .quantized_weight import QuantizedWeight, is_quantized
from .split_linear import run_split_linear
from .tiling import SPLIT_ROWS, MatmulTiles, SplitTiles, matmul_tiles, quantized_matmul_tiles, quantized_split_tiles, split_tiles
from .validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_finite,
    check_quantized_weight,
    check_residual,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)


@triton.jit
def linear_kernel(
    x_ptr, stride_xm, w_ptr, stride_wk, stride_wn, out_ptr, stride_om, M, N, K,
    bias_ptr=None,
    ln_weight_ptr=None, ln_bias_ptr=None, eps=0.0, moments_ptr=None, moment_blocks=1,
    residual_ptr=None, stride_rm=0, out_moments_ptr=None,
    k_cache_ptr=None, v_cache_ptr=None, slots_ptr=None, stride_cb=0, stride_ch=0, stride_cs=0, n_slots=0, seq_len=1,
    head_dim=1,
    scale_ptr=None, stride_sk=0, stride_sn=0, zero_ptr=None, nested_ptr=None, offset_ptr=None, code_ptr=None, groups=1,
    NORMALIZE: tl.constexpr = False, HAS_BIAS: tl.constexpr = False, ACTIVATION: tl.constexpr = "identity",
    HAS_RESIDUAL: tl.constexpr = False, QKV: tl.constexpr = False, DOT_PRECISION: tl.constexpr = "tf32",
    BLOCK_M: tl.constexpr = 16, BLOCK_N: tl.constexpr = 64, BLOCK_K: tl.constexpr = 64,
    BLOCK_MOMENTS: tl.constexpr = 1, WEIGHT_FORMAT: tl.constexpr = "float",
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < M
    col_in = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm

    if NORMALIZE:
        mean, rstd = merged_row_statistics(moments_ptr, moment_blocks, rows, row_in, K, eps, BLOCK_MOMENTS)
    else:
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        rstd = mean
    acc = accumulate(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_rows, row_in, 0, K, w_ptr, stride_wk, stride_wn, cols, col_in,
        ln_weight_ptr, ln_bias_ptr, mean, rstd, scale_ptr, stride_sk, stride_sn, zero_ptr, nested_ptr, offset_ptr,
        code_ptr, groups, NORMALIZE, DOT_PRECISION, BLOCK_K, "", WEIGHT_FORMAT,
    )
    acc = channel_scaled(acc, cols, col_in, scale_ptr, stride_sn, WEIGHT_FORMAT)
    linear_epilogue(
        acc, rows, cols, row_in, col_in, out_ptr, stride_om, bias_ptr, residual_ptr, stride_rm, out_moments_ptr,
        tl.program_id(1), tl.num_programs(1), k_cache_ptr, v_cache_ptr, slots_ptr, stride_cb, stride_ch, stride_cs,
        n_slots, seq_len, head_dim, N, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, QKV,
    )


# Blocks of row moments a LayerNorm prologue merges per step: 8 x 3 floats per row stay in registers
# beside a 64-row tile without spilling.
MOMENTS_PER_STEP = 8


def check_weight(weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None, in_features: int, name: str = "weight") -> int:
    if is_quantized(weight):
        check_quantized_weight(name, weight)
    else:
        check_tensor(name, weight, dtypes=FLOAT_DTYPES, ndim=2, contiguous=False)
        if 1 not in weight.stride():
            raise ValueError(f"{name} needs a unit stride in one dimension, got strides {weight.stride()}")
    if weight.shape[0] != in_features:
        raise ValueError(f"{name} has shape {tuple(weight.shape)}; expected [{in_features}, N] (Conv1D layout)")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
        check_shape("bias", bias, (weight.shape[1],))
    return weight.shape[1]


def dtype_operand(weight: torch.Tensor | QuantizedWeight) -> torch.Tensor | None:
    """The weight where dtypes must match the activations': a quantized one has none of its own."""
    return None if is_quantized(weight) else weight


def device_operand(weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    return weight.data if is_quantized(weight) else weight


def weight_format(weight: torch.Tensor | QuantizedWeight) -> str:
    """The kernels' WEIGHT_FORMAT: float, int8, int4, nf4, or nf4dq (nf4 with double quantization)."""
    if not is_quantized(weight):
        return "float"
    return "nf4dq" if weight.double_quant else weight.format


def weight_arguments(weight: torch.Tensor | QuantizedWeight) -> dict:
    """A product's weight as kernel arguments: its pointer and strides, and a quantized one's scales."""
    if not is_quantized(weight):
        return dict(w_ptr=weight, stride_wk=weight.stride(0), stride_wn=weight.stride(1), WEIGHT_FORMAT="float")
    return dict(
        w_ptr=weight.data, stride_wk=weight.data.stride(0), stride_wn=weight.data.stride(1), scale_ptr=weight.scale,
        stride_sk=weight.scale.stride(0), stride_sn=weight.scale.stride(1), zero_ptr=weight.zero,
        nested_ptr=weight.nested_absmax, offset_ptr=weight.nested_offset, code_ptr=weight.code,
        groups=weight.scale.shape[0], WEIGHT_FORMAT=weight_format(weight),
    )


def weight_label(weight: QuantizedWeight) -> str:
    """The format and group that decide a quantized product's tiles: int8, int4g32, nf4dqg64, ..."""
    return weight_format(weight) + (f"g{weight.group_size}" if weight.bits == 4 else "")


def _group_block(weight: QuantizedWeight) -> int | None:
    """The block_k a quantized weight's tiles need: a 4-bit weight's K group; None (any) for int8."""
    return weight.group_size if weight.bits == 4 else None


def split_tiles_for(n: int, k: int, element_size: int, weight: torch.Tensor | QuantizedWeight) -> SplitTiles:
    if is_quantized(weight):
        return quantized_split_tiles(n, k, element_size, _group_block(weight), weight_label(weight))
    return split_tiles(n, k, element_size)


def product_tiles(m: int, n: int, k: int, element_size: int, weight: torch.Tensor | QuantizedWeight) -> SplitTiles | MatmulTiles:
    """The tiles a product of this shape and weight runs with: split-K up to SPLIT_ROWS rows, else tiled."""
    if m <= SPLIT_ROWS:
        return split_tiles_for(n, k, element_size, weight)
    if is_quantized(weight):
        return quantized_matmul_tiles(m, n, k, element_size, _group_block(weight))
    return matmul_tiles(m, n, k, element_size)


def check_rows(x: torch.Tensor) -> torch.Tensor:
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


def normalized_input(x: Residual, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float) -> dict:
    """The prologue's arguments for a LayerNorm of x.values from its row moments."""
    moments = check_residual("x", x, needs_moments=True)
    _check_layer_norm(ln_weight, ln_bias, eps, x.values.shape[-1])
    blocks = moments.shape[-2]
    return dict(
        NORMALIZE=True, ln_weight_ptr=ln_weight, ln_bias_ptr=ln_bias, eps=eps, moments_ptr=moments,
        moment_blocks=blocks, BLOCK_MOMENTS=min(MOMENTS_PER_STEP, triton.next_power_of_2(blocks)),
    )


def _run(
    rows: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None, out: torch.Tensor,
    semaphores: torch.Tensor | None, **options,
) -> None:
    m, k = rows.shape
    n = weight.shape[1]
    # float32 must match a float32 reference; the GPU default for it would be tf32.
    options.update(bias_ptr=bias, HAS_BIAS=bias is not None, DOT_PRECISION="ieee" if rows.dtype == torch.float32 else "tf32")
    options.update(weight_arguments(weight))
    tiles = product_tiles(m, n, k, rows.element_size(), weight)
    if m <= SPLIT_ROWS:
        run_split_linear(rows, n, out, tiles, semaphores, **options)
        return
    launch(
        linear_kernel,
        (triton.cdiv(m, tiles.block_m), triton.cdiv(n, tiles.block_n)),
        x_ptr=rows, stride_xm=rows.stride(0), out_ptr=out, stride_om=out.stride(0), M=m, N=n, K=k,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, max_registers=tiles.max_registers,
        **options,
    )


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
    """act(LN(x) @ weight + bias) for x [..., K] with its row moments, weight [K, N]: c_fc with its
    activation, or the LM head with ln_f folded in (weight = wte.T, no bias). [..., N] in x's dtype.
    `semaphores` (zeroed int32, the caller's) serve a split product of a few rows."""
    options = normalized_input(x, ln_weight, ln_bias, eps)
    rows = check_rows(x.values)
    n = check_weight(weight, bias, rows.shape[1])
    check_same_dtype(x=x.values, ln_weight=ln_weight, ln_bias=ln_bias, weight=dtype_operand(weight), bias=bias)
    check_same_device(x=x.values, moments=x.moments, ln_weight=ln_weight, ln_bias=ln_bias, weight=device_operand(weight),
                      bias=bias)
    out = torch.empty(rows.shape[0], n, dtype=x.values.dtype, device=x.values.device)
    _run(rows, weight, bias, out, semaphores, ACTIVATION=activation_formula(activation), **options)
    return out.view(*x.values.shape[:-1], n)


def linear_residual(
    x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor, residual: Residual, *, semaphores: torch.Tensor | None = None
) -> Residual:
    """residual + x @ weight + bias for x [..., K], weight [K, N], residual [..., N]: the c_proj of
    attention and of the MLP. Returns the new residual stream [..., N] in x's dtype, with its moments."""
    rows = check_rows(x)
    n = check_weight(weight, bias, rows.shape[1])
    check_residual("residual", residual)
    check_shape("residual", residual.values, (*x.shape[:-1], n))
    check_same_dtype(x=x, weight=dtype_operand(weight), bias=bias, residual=residual.values)
    check_same_device(x=x, weight=device_operand(weight), bias=bias, residual=residual.values)
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    blocks = triton.cdiv(n, product_tiles(rows.shape[0], n, rows.shape[1], rows.element_size(), weight).block_n)
    moments = torch.empty(rows.shape[0], blocks, MOMENT_FIELDS, dtype=torch.float32, device=x.device)
    source = residual.values.reshape(-1, n)
    _run(
        rows, weight, bias, out, semaphores, HAS_RESIDUAL=True, residual_ptr=source, stride_rm=source.stride(0),
        out_moments_ptr=moments,
    )
    lead = x.shape[:-1]
    return Residual(out.view(*lead, n), moments.view(*lead, blocks, MOMENT_FIELDS))


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
    """c_attn: LN(x) @ W + b for x [B, T, C] (with its row moments), W [C, 3C], split q | k | v. k and
    v are written into the caches [B_cache, H, S, D] at row b, slot access.slots[b, t]; q is returned
    as [B, T, C]."""
    options = normalized_input(x, ln_weight, ln_bias, eps)
    check_tensor("x", x.values, dtypes=FLOAT_DTYPES, ndim=3)
    batch, seq, width = x.values.shape
    rows = check_rows(x.values)
    n = check_weight(weight, bias, width)
    if n != 3 * width:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; c_attn needs [{width}, {3 * width}]")
    check_tensor("k_cache", k_cache, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("v_cache", v_cache, dtypes=FLOAT_DTYPES, ndim=4)
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    cache_batch, n_head, n_slots, head_dim = k_cache.shape
    if n_head * head_dim != width:
        raise ValueError(f"k_cache has {n_head} heads of {head_dim}, which does not make x's width {width}")
    if batch > cache_batch:
        raise ValueError(f"batch {batch} is larger than the cache's {cache_batch} rows")
    if not isinstance(access, CacheAccess):
        raise ValueError(f"access must be a CacheAccess, got {type(access).__name__}")
    cache_slots = access.slots
    check_tensor("cache_slots", cache_slots, dtypes=INDEX_DTYPES)
    check_shape("cache_slots", cache_slots, (batch, seq))
    check_same_dtype(x=x.values, ln_weight=ln_weight, ln_bias=ln_bias, weight=dtype_operand(weight), bias=bias,
                     k_cache=k_cache, v_cache=v_cache)
    check_same_device(
        x=x.values, moments=x.moments, ln_weight=ln_weight, ln_bias=ln_bias, weight=device_operand(weight), bias=bias,
        k_cache=k_cache, v_cache=v_cache, cache_slots=cache_slots,
    )
    q = torch.empty(batch, seq, width, dtype=x.values.dtype, device=x.values.device)
    stride_cb, stride_ch, stride_cs = k_cache.stride()[:3]
    _run(
        rows, weight, bias, q.view(-1, width), access.semaphores, QKV=True, k_cache_ptr=k_cache, v_cache_ptr=v_cache, slots_ptr=cache_slots,
        stride_cb=stride_cb, stride_ch=stride_ch, stride_cs=stride_cs, n_slots=n_slots, seq_len=seq, head_dim=head_dim,
        **options,
    )
    return q
