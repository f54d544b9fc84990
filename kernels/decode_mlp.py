"""The MLP of a few rows (decode) in one launch: x + act(LN(x) @ W_fc + b_fc) @ W_proj + b_proj.

Two split-K products (matmul_parts.split_tile) share the grid. The first programs compute c_fc with
its activation into h; the rest compute the projection with the residual, once every column tile of
h is stored. A program's role follows the order programs start in (a ticket from a counter), not its
id: a projection program waits only for c_fc programs that started before it, and those never wait,
so the wait cannot deadlock however the GPU schedules programs (or the interpreter runs them in turn).
Counters, all zero between launches: [ticket, h tiles stored, projection programs past the wait,
c_fc tiles' arrivals..., projection tiles' arrivals...].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import activation_formula
from .launch import launch
from .linear import (
    check_rows,
    check_weight,
    device_operand,
    dtype_operand,
    linear_residual,
    ln_linear,
    normalized_input,
    split_tiles_for,
    weight_arguments,
)
from .matmul_parts import split_tile
from .operands import MOMENT_FIELDS, Residual
from .quantized_weight import QuantizedWeight
from .split_linear import split_partials
from .tiling import SPLIT_ROWS, register_cap
from .validation import check_residual, check_same_device, check_same_dtype

FIXED_COUNTERS = 3


# M is not specialized: a batch of one compiles the same code as any other (ptxas 12.8 spilled
# the M == 1 variant of some tiles).
@triton.jit(do_not_specialize=["M"])
def decode_mlp_kernel(
    x_ptr, moments_ptr, moment_blocks, ln_weight_ptr, ln_bias_ptr, eps, fc_w_ptr, stride_fk, stride_fn, fc_b_ptr,
    h_ptr, proj_w_ptr, stride_pk, stride_pn, proj_b_ptr, out_ptr, out_moments_ptr, M, width, inner,
    fc_k_per_split, fc_splits, proj_k_per_split, proj_splits, fc_partial_ptr, proj_partial_ptr, counters_ptr,
    fc_scale_ptr=None, fc_stride_sk=0, fc_stride_sn=0, fc_zero_ptr=None, fc_nested_ptr=None, fc_offset_ptr=None,
    fc_code_ptr=None, fc_groups=1, proj_scale_ptr=None, proj_stride_sk=0, proj_stride_sn=0, proj_zero_ptr=None,
    proj_nested_ptr=None, proj_offset_ptr=None, proj_code_ptr=None, proj_groups=1,
    ACTIVATION: tl.constexpr = "identity", DOT_PRECISION: tl.constexpr = "tf32", BLOCK_M: tl.constexpr = 16,
    FC_BLOCK_N: tl.constexpr = 64, FC_BLOCK_K: tl.constexpr = 64, PROJ_BLOCK_N: tl.constexpr = 64,
    PROJ_BLOCK_K: tl.constexpr = 64, BLOCK_MOMENTS: tl.constexpr = 1, FC_FORMAT: tl.constexpr = "float",
    PROJ_FORMAT: tl.constexpr = "float", FC_DEQUANT_K: tl.constexpr = None, PROJ_DEQUANT_K: tl.constexpr = None,
):
    fc_tiles = tl.cdiv(inner, FC_BLOCK_N)
    fc_programs = fc_tiles * fc_splits
    proj_programs = tl.cdiv(width, PROJ_BLOCK_N) * proj_splits
    ticket = tl.atomic_add(counters_ptr, 1, sem="relaxed")
    if ticket == fc_programs + proj_programs - 1:
        tl.atomic_xchg(counters_ptr, 0)
    if ticket < fc_programs:
        stored = split_tile(
            ticket, x_ptr, width, fc_w_ptr, stride_fk, stride_fn, h_ptr, inner, M, inner, width, fc_k_per_split,
            fc_splits, fc_partial_ptr, counters_ptr + 3, fc_b_ptr, ln_weight_ptr, ln_bias_ptr, eps, moments_ptr,
            moment_blocks, x_ptr, 0, out_moments_ptr, h_ptr, h_ptr, counters_ptr, 0, 0, 0, 0, 1, 1,
            fc_scale_ptr, fc_stride_sk, fc_stride_sn, fc_zero_ptr, fc_nested_ptr, fc_offset_ptr, fc_code_ptr, fc_groups,
            True, True, ACTIVATION, False, False, DOT_PRECISION, BLOCK_M, FC_BLOCK_N, FC_BLOCK_K, BLOCK_MOMENTS, "",
            FC_FORMAT, FC_DEQUANT_K,
        )
        if stored != 0:
            # Every thread's part of the h tile is stored before the counter says so.
            tl.debug_barrier()
            tl.atomic_add(counters_ptr + 1, 1, sem="release")
    else:
        seen = tl.atomic_add(counters_ptr + 1, 0, sem="acquire")
        while seen < fc_tiles:
            seen = tl.atomic_add(counters_ptr + 1, 0, sem="acquire")
        if tl.atomic_add(counters_ptr + 2, 1, sem="relaxed") == proj_programs - 1:
            tl.atomic_xchg(counters_ptr + 1, 0)
            tl.atomic_xchg(counters_ptr + 2, 0)
        split_tile(
            ticket - fc_programs, h_ptr, inner, proj_w_ptr, stride_pk, stride_pn, out_ptr, width, M, width, inner,
            proj_k_per_split, proj_splits, proj_partial_ptr, counters_ptr + 3 + fc_tiles, proj_b_ptr, ln_weight_ptr,
            ln_bias_ptr, eps, moments_ptr, moment_blocks, x_ptr, width, out_moments_ptr, h_ptr, h_ptr, counters_ptr,
            0, 0, 0, 0, 1, 1, proj_scale_ptr, proj_stride_sk, proj_stride_sn, proj_zero_ptr, proj_nested_ptr,
            proj_offset_ptr, proj_code_ptr, proj_groups,
            False, True, "identity", True, False, DOT_PRECISION, BLOCK_M, PROJ_BLOCK_N, PROJ_BLOCK_K, BLOCK_MOMENTS,
            ".cg", PROJ_FORMAT, PROJ_DEQUANT_K,
        )


def _named_weight(weight: torch.Tensor | QuantizedWeight, product: str, letter: str) -> dict:
    """weight_arguments under the kernel's names for one of its two products (fc_w_ptr, stride_fk, ...)."""
    names = {"w_ptr": f"{product}_w_ptr", "stride_wk": f"stride_{letter}k", "stride_wn": f"stride_{letter}n",
             "WEIGHT_FORMAT": f"{product.upper()}_FORMAT"}
    return {names.get(key, f"{product}_{key}"): value for key, value in weight_arguments(weight).items()}


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
    """x + act(LN(x) @ fc_weight + fc_bias) @ proj_weight + proj_bias for x [..., C] with its row
    moments, fc_weight [C, I], proj_weight [I, C]: the new residual stream with its moments. Up to
    SPLIT_ROWS rows in one launch; more as ln_linear then linear_residual."""
    rows = check_rows(x.values)
    if rows.shape[0] > SPLIT_ROWS:
        h = ln_linear(x, ln_weight, ln_bias, eps, fc_weight, fc_bias, activation)
        return linear_residual(h, proj_weight, proj_bias, x)
    options = normalized_input(x, ln_weight, ln_bias, eps)
    m, width = rows.shape
    inner = check_weight(fc_weight, fc_bias, width, "fc_weight")
    if check_weight(proj_weight, proj_bias, inner, "proj_weight") != width:
        raise ValueError(f"proj_weight has shape {tuple(proj_weight.shape)}; the MLP needs [{inner}, {width}]")
    check_residual("x", x)
    check_same_dtype(x=x.values, ln_weight=ln_weight, ln_bias=ln_bias, fc_weight=dtype_operand(fc_weight), fc_bias=fc_bias,
                     proj_weight=dtype_operand(proj_weight), proj_bias=proj_bias)
    check_same_device(x=x.values, moments=x.moments, ln_weight=ln_weight, ln_bias=ln_bias,
                      fc_weight=device_operand(fc_weight), fc_bias=fc_bias, proj_weight=device_operand(proj_weight),
                      proj_bias=proj_bias)
    if not rows.is_contiguous():
        raise ValueError(f"x must be contiguous rows, got strides {tuple(x.values.stride())}")
    fc_tiles = split_tiles_for(inner, width, rows.element_size(), fc_weight)
    proj_tiles = split_tiles_for(width, inner, rows.element_size(), proj_weight)
    counters_needed = FIXED_COUNTERS + triton.cdiv(inner, fc_tiles.block_n) + triton.cdiv(width, proj_tiles.block_n)
    counters = torch.zeros(counters_needed, dtype=torch.int32, device=rows.device) if semaphores is None else semaphores
    if counters.numel() < counters_needed:
        raise ValueError(f"{counters.numel()} semaphores are too few for the MLP's {counters_needed} counters")
    fc_partial = split_partials(m, inner, fc_tiles, rows.device)
    proj_partial = split_partials(m, width, proj_tiles, rows.device)
    h = torch.empty(m, inner, dtype=rows.dtype, device=rows.device)
    out = torch.empty_like(rows)
    moments = torch.empty(m, triton.cdiv(width, proj_tiles.block_n), MOMENT_FIELDS, dtype=torch.float32, device=rows.device)
    launch(
        decode_mlp_kernel,
        (fc_tiles.programs(inner) + proj_tiles.programs(width),),
        x_ptr=rows, moments_ptr=options["moments_ptr"], moment_blocks=options["moment_blocks"], ln_weight_ptr=ln_weight,
        ln_bias_ptr=ln_bias, eps=eps, fc_b_ptr=fc_bias, h_ptr=h, proj_b_ptr=proj_bias, out_ptr=out, out_moments_ptr=moments, M=m,
        width=width, inner=inner, fc_k_per_split=fc_tiles.k_per_split, fc_splits=fc_tiles.splits,
        proj_k_per_split=proj_tiles.k_per_split, proj_splits=proj_tiles.splits,
        # An unsplit product never touches its partials: any pointer stands in.
        fc_partial_ptr=h if fc_partial is None else fc_partial, proj_partial_ptr=out if proj_partial is None else proj_partial,
        counters_ptr=counters, ACTIVATION=activation_formula(activation),
        # float32 must match a float32 reference; the GPU default for it would be tf32.
        DOT_PRECISION="ieee" if rows.dtype == torch.float32 else "tf32", BLOCK_M=SPLIT_ROWS,
        FC_BLOCK_N=fc_tiles.block_n, FC_BLOCK_K=fc_tiles.block_k, PROJ_BLOCK_N=proj_tiles.block_n,
        PROJ_BLOCK_K=proj_tiles.block_k, FC_DEQUANT_K=fc_tiles.dequant_k, PROJ_DEQUANT_K=proj_tiles.dequant_k,
        BLOCK_MOMENTS=options["BLOCK_MOMENTS"],
        num_warps=fc_tiles.num_warps, num_stages=fc_tiles.num_stages,
        max_registers=register_cap(fc_tiles, proj_tiles),
        **_named_weight(fc_weight, "fc", "f"), **_named_weight(proj_weight, "proj", "p"),
    )
    lead = x.values.shape[:-1]
    return Residual(out.view(*lead, width), moments.view(*lead, moments.shape[1], MOMENT_FIELDS))
