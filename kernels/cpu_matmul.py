"""rows @ weight (+ bias) for the torch backend, with the weight's columns split across the CPU's threads.

With few rows the matmul is bound by reading the weight, and PyTorch's CPU BLAS call streams it from
one core for some layouts (the LM head's wte.T: a single-threaded gemv) and leaves bandwidth unused
for others. One bmm over per-thread column blocks gives every core its own share of the weight to
stream. Measured on a 2-core EPYC in float32: 1.1-1.2x on gpt2's layer weights at 1 row, 1.2-1.5x at
16 rows, 1.05-1.1x at 128 rows, 1.8x on the LM head at 1 row; no gain past a few hundred rows, where
the BLAS call is compute-bound and already threaded. Each output is still one dot product over K.
"""

from __future__ import annotations

import torch

MAX_BLOCKED_ROWS = 256
MIN_BLOCK_COLUMNS = 256


def addmm_rows(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """rows [M, K] @ weight [K, N] (+ bias [N]) -> [M, N], for any strides of weight."""
    count, (depth, width) = rows.shape[0], weight.shape
    blocks = torch.get_num_threads()
    block_width = width // blocks
    if rows.device.type != "cpu" or blocks < 2 or count > MAX_BLOCKED_ROWS or block_width < MIN_BLOCK_COLUMNS:
        return rows @ weight if bias is None else torch.addmm(bias, rows, weight)
    split = blocks * block_width
    tiles = weight[:, :split].unflatten(1, (blocks, block_width)).transpose(0, 1)  # [blocks, K, N / blocks], a view
    shared = rows.expand(blocks, count, depth)
    if bias is None:
        out = torch.bmm(shared, tiles)
    else:
        out = torch.baddbmm(bias[:split].view(blocks, 1, block_width), shared, tiles)
    out = out.transpose(0, 1).reshape(count, split)
    if split == width:
        return out
    rest = weight[:, split:]
    tail = rows @ rest if bias is None else torch.addmm(bias[split:], rows, rest)
    return torch.cat([out, tail], dim=1)
