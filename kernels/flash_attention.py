"""Causal flash attention for prefill, over the KV cache.

    out[b, t, h] = softmax_j(scale * q[b, t, h] . k[b, h, j]) @ v[b, h, j]
    over the slots j <= query_start[b] + t with key_mask[b, j] != 0

Online softmax (flash-attention 2): scores, running max and sum in float32, in base 2 (scale folded
with log2(e)); P is rounded to V's dtype before P @ V, as transformers does. A query that sees no slot
(a left-padding position) gets zeros, never NaN. Program (query block, b * H + h) walks the key blocks
from slot 0 to the last slot its queries can see, so slots past the prompt are never read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from .operands import CacheAccess
from .tiling import attention_tiles
from .validation import check_attention_inputs

LOG2_E = 1.4426950408889634


@triton.jit
def flash_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, start_ptr, mask_ptr,
    stride_qb, stride_qt, stride_cb, stride_ch, stride_cs, stride_mb,
    seq_len, n_slots, n_head, head_dim, qk_scale,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0)
    batch = tl.program_id(1) // n_head
    head = tl.program_id(1) % n_head
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_in = rows < seq_len
    dim_in = dims < head_dim
    start = tl.load(start_ptr + batch).to(tl.int32)
    query_slot = start + rows

    q_at = batch.to(tl.int64) * stride_qb + rows.to(tl.int64)[:, None] * stride_qt + head * head_dim + dims[None, :]
    q = tl.load(q_ptr + q_at, mask=row_in[:, None] & dim_in[None, :], other=0.0)
    cache = batch.to(tl.int64) * stride_cb + head.to(tl.int64) * stride_ch
    key_mask = mask_ptr + batch.to(tl.int64) * stride_mb
    # Keys past the block's last query are never visible: stop there (causal skipping).
    end = tl.minimum(start + tl.minimum(seq_len, (block + 1) * BLOCK_M), n_slots)

    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for first in range(0, end, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        col_in = cols < end
        kv_at = cache + cols.to(tl.int64)[:, None] * stride_cs + dims[None, :]
        k = tl.load(k_ptr + kv_at, mask=col_in[:, None] & dim_in[None, :], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        keep = tl.load(key_mask + cols, mask=col_in, other=0) != 0
        visible = (cols[None, :] <= query_slot[:, None]) & keep[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # Rows that have seen nothing yet keep a max of -inf; subtract 0 there so exp2 gives 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2(row_max - shift)
        p = tl.exp2(scores - shift[:, None])
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        # Masked slots' V is not read: P is 0 there, but 0 * (whatever a padding slot holds) could be NaN.
        v = tl.load(v_ptr + kv_at, mask=keep[:, None] & dim_in[None, :], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max
    out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    tl.store(out_ptr + q_at, out.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & dim_in[None, :])


def flash_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, access: CacheAccess, scale: float
) -> torch.Tensor:
    """Attention of q [B, T, C] over the caches [B_cache, H, S, D], the slots each query sees given by
    `access`; returns [B, T, C] in q's dtype."""
    batch, n_head, slots, head_dim = check_attention_inputs(q, k_cache, v_cache, access, scale, q_ndim=3)
    seq = q.shape[1]
    out = torch.empty_like(q)
    tiles = attention_tiles(seq, head_dim, q.element_size())
    launch(
        flash_attention_kernel,
        (triton.cdiv(seq, tiles.block_m), batch * n_head),
        q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, out_ptr=out, start_ptr=access.query_start,
        mask_ptr=access.key_mask, stride_qb=q.stride(0), stride_qt=q.stride(1), stride_cb=k_cache.stride(0),
        stride_ch=k_cache.stride(1), stride_cs=k_cache.stride(2), stride_mb=access.key_mask.stride(0),
        seq_len=seq, n_slots=slots, n_head=n_head, head_dim=head_dim, qk_scale=scale * LOG2_E,
        # float32 must match a float32 reference; the GPU default for it would be tf32.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
