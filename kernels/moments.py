"""Row moments in kernels: how a kernel that writes the residual stream describes each row's values,
and how a LayerNorm consumer merges those descriptions into the row's mean and 1/std.

A row is written in blocks of columns (one per program along N); each block stores (count, mean, M2)
of its stored (already rounded) values, M2 being the sum of squared deviations from the block's mean.
Merging in parallel form, mean = sum(c_b m_b) / K and M2 = sum(M2_b) + sum(c_b (m_b - mean)^2), stays
exact when the mean is large next to the spread (GPT-2's residual stream has outlier features),
unlike sum(x^2) - K mean^2.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_block_moments(moments_ptr, block, n_blocks, rows, row_in, values, inside):
    """values [BLOCK_M, BLOCK_N] float32, inside marks the real elements: write each row's
    (count, mean, M2) at moments[row, block]."""
    count = tl.sum(inside.to(tl.float32), axis=1)
    mean = tl.sum(tl.where(inside, values, 0.0), axis=1) / tl.maximum(count, 1.0)
    centered = tl.where(inside, values - mean[:, None], 0.0)
    m2 = tl.sum(centered * centered, axis=1)
    at = moments_ptr + (rows.to(tl.int64) * n_blocks + block) * 3
    tl.store(at, count, mask=row_in)
    tl.store(at + 1, mean, mask=row_in)
    tl.store(at + 2, m2, mask=row_in)


@triton.jit
def merged_row_statistics(moments_ptr, n_blocks, rows, row_in, width, eps, BLOCK_B: tl.constexpr):
    """(mean, 1/sqrt(var + eps)) of each row from its blocks' moments; width is the row's length.
    Two short passes over the blocks, BLOCK_B at a time (the mean first, then the M2 about it), so a
    wide row's many blocks never sit in registers at once."""
    row_at = moments_ptr + rows.to(tl.int64)[:, None] * n_blocks * 3
    total = tl.zeros((rows.shape[0],), dtype=tl.float32)
    for first in range(0, n_blocks, BLOCK_B):
        blocks = first + tl.arange(0, BLOCK_B)
        inside = row_in[:, None] & (blocks < n_blocks)[None, :]
        at = row_at + blocks[None, :] * 3
        total += tl.sum(tl.load(at, mask=inside, other=0.0) * tl.load(at + 1, mask=inside, other=0.0), axis=1)
    mean = total / width
    m2 = tl.zeros((rows.shape[0],), dtype=tl.float32)
    for first in range(0, n_blocks, BLOCK_B):
        blocks = first + tl.arange(0, BLOCK_B)
        inside = row_in[:, None] & (blocks < n_blocks)[None, :]
        at = row_at + blocks[None, :] * 3
        spread = tl.load(at + 1, mask=inside, other=0.0) - mean[:, None]
        m2 += tl.sum(tl.load(at + 2, mask=inside, other=0.0) + tl.load(at, mask=inside, other=0.0) * spread * spread, axis=1)
    return mean, 1.0 / tl.sqrt(m2 / width + eps)
