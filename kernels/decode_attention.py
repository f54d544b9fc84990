"""Decode attention: one new query per row against the KV cache, split across the context.

    out[b, h] = softmax_j(scale * q[b, h] . k[b, h, j]) @ v[b, h, j]
    over the slots j <= query_start[b] with key_mask[b, j] != 0

Flash-decoding: the S cache slots are cut into equal chunks; program (b*H + h, split) reduces its
chunk to a partial max, sum and un-normalised P @ V (float32, base 2); the last of a head's programs to
finish (an int32 counter per head, reset by that program) merges the partials in split order, so the
result does not depend on which program finished last. The split count depends on the cache's static
shape only, so a captured graph serves every length; chunks past a row's query do no loads. One query row is too thin for tl.dot (16 rows at
least), so the products are elementwise multiply-and-sum, which is what a memory-bound GEMV needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from .operands import CacheAccess
from .tiling import decode_splits, decode_tiles
from .validation import check_attention_inputs

LOG2_E = 1.4426950408889634


@triton.jit
def decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, start_ptr, mask_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, counters_ptr, out_ptr,
    stride_qb, stride_cb, stride_ch, stride_cs, stride_mb, stride_ob,
    n_head, n_slots, head_dim, chunk, n_splits, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
):
    pair = tl.program_id(0)
    split = tl.program_id(1)
    batch = pair // n_head
    head = pair % n_head
    dims = tl.arange(0, BLOCK_D)
    dim_in = dims < head_dim
    query_slot = tl.load(start_ptr + batch).to(tl.int32)
    q = tl.load(q_ptr + batch.to(tl.int64) * stride_qb + head * head_dim + dims, mask=dim_in, other=0.0)
    q = q.to(tl.float32) * qk_scale
    cache = batch.to(tl.int64) * stride_cb + head.to(tl.int64) * stride_ch
    first = split * chunk
    key_mask = mask_ptr + batch.to(tl.int64) * stride_mb
    # Only slots up to the query's are visible: a chunk past it runs no iteration and loads nothing.
    end = tl.minimum(tl.minimum(first + chunk, query_slot + 1), n_slots)

    part_max = tl.max(tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32), axis=0)
    part_sum = tl.sum(tl.zeros((BLOCK_N,), dtype=tl.float32), axis=0)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for block in range(first, end, BLOCK_N):
        cols = block + tl.arange(0, BLOCK_N)
        col_in = cols < end
        kv_at = cache + cols.to(tl.int64)[:, None] * stride_cs + dims[None, :]
        k = tl.load(k_ptr + kv_at, mask=col_in[:, None] & dim_in[None, :], other=0.0).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1)
        keep = tl.load(key_mask + cols, mask=col_in, other=0) != 0
        scores = tl.where(keep, scores, float("-inf"))
        new_max = tl.maximum(part_max, tl.max(scores, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2(part_max - shift)
        p = tl.exp2(scores - shift)
        part_sum = part_sum * rescale + tl.sum(p, axis=0)
        # Masked slots' V is not read: P is 0 there, but 0 * (whatever a padding slot holds) could be NaN.
        v = tl.load(v_ptr + kv_at, mask=keep[:, None] & dim_in[None, :], other=0.0)
        # P is rounded to V's dtype before P @ V, as in prefill and in transformers.
        acc = acc * rescale + tl.sum(p.to(v.dtype).to(tl.float32)[:, None] * v.to(tl.float32), axis=0)
        part_max = new_max
    part = pair * n_splits + split
    tl.store(part_max_ptr + part, part_max)
    tl.store(part_sum_ptr + part, part_sum)
    tl.store(part_acc_ptr + part.to(tl.int64) * head_dim + dims, acc, mask=dim_in)
    # Every thread's partial is stored before the counter says so (the atomic releases them).
    tl.debug_barrier()
    if tl.atomic_add(counters_ptr + pair, 1, sem="acq_rel") == n_splits - 1:
        tl.atomic_xchg(counters_ptr + pair, 0)
        merge_splits(part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr + batch.to(tl.int64) * stride_ob + head * head_dim,
                     pair, head_dim, n_splits, SPLITS, BLOCK_D)


@triton.jit
def merge_splits(part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr, pair, head_dim, n_splits,
                 SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[:head_dim] = the head's attention from its splits' partials (read from L2 with .cg: other
    programs wrote them)."""
    splits = tl.arange(0, SPLITS)
    dims = tl.arange(0, BLOCK_D)
    split_in = splits < n_splits
    dim_in = dims < head_dim
    parts = pair * n_splits + splits
    maxes = tl.load(part_max_ptr + parts, mask=split_in, other=float("-inf"), cache_modifier=".cg")
    sums = tl.load(part_sum_ptr + parts, mask=split_in, other=0.0, cache_modifier=".cg")
    top = tl.max(maxes, axis=0)
    weights = tl.exp2(maxes - tl.where(top == float("-inf"), 0.0, top))
    total = tl.sum(sums * weights, axis=0)
    accs = tl.load(
        part_acc_ptr + parts.to(tl.int64)[:, None] * head_dim + dims[None, :],
        mask=split_in[:, None] & dim_in[None, :],
        other=0.0,
        cache_modifier=".cg",
    )
    out = tl.sum(accs * weights[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + dims, out.to(out_ptr.dtype.element_ty), mask=dim_in)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, access: CacheAccess, scale: float
) -> torch.Tensor:
    """Attention of one query per row, q [B, C], over the caches [B_cache, H, S, D], the slots it
    sees given by `access` (its query sits at slot query_start[b]); returns [B, C] in q's dtype."""
    batch, n_head, slots, head_dim = check_attention_inputs(q, k_cache, v_cache, access, scale, q_ndim=2)
    tiles = decode_tiles(head_dim, q.element_size())
    splits = decode_splits(batch * n_head, slots, tiles.block_n)
    chunk = triton.cdiv(triton.cdiv(slots, splits), tiles.block_n) * tiles.block_n
    splits = triton.cdiv(slots, chunk)
    part_max = torch.empty(batch * n_head * splits, dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(batch * n_head * splits, head_dim, dtype=torch.float32, device=q.device)
    counters = access.semaphores
    if counters is None:
        counters = torch.zeros(batch * n_head, dtype=torch.int32, device=q.device)
    elif counters.numel() < batch * n_head:
        raise ValueError(f"{counters.numel()} semaphores are too few for {batch * n_head} heads")
    out = torch.empty_like(q)
    launch(
        decode_attention_kernel,
        (batch * n_head, splits),
        q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, start_ptr=access.query_start, mask_ptr=access.key_mask,
        part_max_ptr=part_max, part_sum_ptr=part_sum, part_acc_ptr=part_acc, counters_ptr=counters, out_ptr=out,
        stride_qb=q.stride(0), stride_cb=k_cache.stride(0), stride_ch=k_cache.stride(1), stride_cs=k_cache.stride(2),
        stride_mb=access.key_mask.stride(0), stride_ob=out.stride(0), n_head=n_head, n_slots=slots, head_dim=head_dim,
        chunk=chunk, n_splits=splits, qk_scale=scale * LOG2_E, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d,
        SPLITS=max(2, triton.next_power_of_2(splits)), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out
