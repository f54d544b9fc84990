"""The linear layer of a few rows (decode), split along K so that a batch of one still streams its
weight through every SM: y = epilogue(prologue(x) @ W + b), as linear.py computes it for many rows.

Program p computes column tile p // splits over the K range p % splits; the last program of a column
tile to finish adds the float32 partials in a fixed order and runs the epilogue (matmul_parts.split_tile).
The counters it arrives on are int32, zero between launches (each tile's last program resets its own),
and belong to the caller: launches that share them must not run at the same time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from .matmul_parts import split_tile
from .tiling import SPLIT_ROWS, SplitTiles


# M is not specialized: a batch of one compiles the same code as any other (ptxas 12.8 spilled
# the M == 1 variant of some tiles).
@triton.jit(do_not_specialize=["M"])
def split_linear_kernel(
    x_ptr, stride_xm, w_ptr, stride_wk, stride_wn, out_ptr, stride_om, M, N, K, k_per_split, n_splits,
    partial_ptr=None, counters_ptr=None,
    bias_ptr=None,
    ln_weight_ptr=None, ln_bias_ptr=None, eps=0.0, moments_ptr=None, moment_blocks=1,
    residual_ptr=None, stride_rm=0, out_moments_ptr=None,
    k_cache_ptr=None, v_cache_ptr=None, slots_ptr=None, stride_cb=0, stride_ch=0, stride_cs=0, n_slots=0, seq_len=1,
    head_dim=1,
    scale_ptr=None, stride_sk=0, stride_sn=0, zero_ptr=None, nested_ptr=None, offset_ptr=None, code_ptr=None, groups=1,
    NORMALIZE: tl.constexpr = False, HAS_BIAS: tl.constexpr = False, ACTIVATION: tl.constexpr = "identity",
    HAS_RESIDUAL: tl.constexpr = False, QKV: tl.constexpr = False, DOT_PRECISION: tl.constexpr = "tf32",
    BLOCK_M: tl.constexpr = 16, BLOCK_N: tl.constexpr = 64, BLOCK_K: tl.constexpr = 64,
    BLOCK_MOMENTS: tl.constexpr = 1, WEIGHT_FORMAT: tl.constexpr = "float", DEQUANT_K: tl.constexpr = None,
):
    split_tile(
        tl.program_id(0), x_ptr, stride_xm, w_ptr, stride_wk, stride_wn, out_ptr, stride_om, M, N, K, k_per_split,
        n_splits, partial_ptr, counters_ptr, bias_ptr, ln_weight_ptr, ln_bias_ptr, eps, moments_ptr, moment_blocks,
        residual_ptr, stride_rm, out_moments_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, stride_cb, stride_ch, stride_cs,
        n_slots, seq_len, head_dim, scale_ptr, stride_sk, stride_sn, zero_ptr, nested_ptr, offset_ptr, code_ptr, groups,
        NORMALIZE, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, QKV, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_MOMENTS, "",
        WEIGHT_FORMAT, DEQUANT_K,
    )


def split_partials(m: int, n: int, tiles: SplitTiles, device: torch.device) -> torch.Tensor | None:
    """The float32 partials [splits, m, n] of a split product; None when K is not split."""
    return None if tiles.splits == 1 else torch.empty(tiles.splits, m, n, dtype=torch.float32, device=device)


def split_scratch(m: int, n: int, tiles: SplitTiles, semaphores: torch.Tensor | None, device: torch.device) -> dict:
    """The partials and counters a split product of [m, n] needs, as kernel arguments. Without the
    caller's semaphores, zeroed counters of its own (one more launch)."""
    partial = split_partials(m, n, tiles, device)
    if partial is None:
        return {}
    column_tiles = triton.cdiv(n, tiles.block_n)
    counters = torch.zeros(column_tiles, dtype=torch.int32, device=device) if semaphores is None else semaphores
    if counters.numel() < column_tiles:
        raise ValueError(f"{counters.numel()} semaphores are too few for {column_tiles} column tiles")
    return dict(partial_ptr=partial, counters_ptr=counters)


def run_split_linear(
    rows: torch.Tensor, n: int, out: torch.Tensor, tiles: SplitTiles, semaphores: torch.Tensor | None, **options,
) -> None:
    """out = epilogue(prologue(rows) @ W) for rows [m <= SPLIT_ROWS, k] and W [k, n]; `options` are the
    weight's (w_ptr, its strides, a quantized weight's scales and WEIGHT_FORMAT), the prologue's and the
    epilogue's kernel arguments."""
    m, k = rows.shape
    if m > SPLIT_ROWS:
        raise ValueError(f"a split product takes at most {SPLIT_ROWS} rows, got {m}")
    launch(
        split_linear_kernel,
        (tiles.programs(n),),
        x_ptr=rows, stride_xm=rows.stride(0), out_ptr=out, stride_om=out.stride(0), M=m, N=n, K=k, k_per_split=tiles.k_per_split, n_splits=tiles.splits,
        BLOCK_M=SPLIT_ROWS, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, DEQUANT_K=tiles.dequant_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, max_registers=tiles.max_registers,
        **split_scratch(m, n, tiles, semaphores, rows.device), **options,
    )
