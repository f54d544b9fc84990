"""rows @ weight (+ bias) for the torch backend: oneDNN's matmul for float32 batches, and the weight's
columns split across the CPU's threads for a single row.

Measured on a 2-core EPYC (AVX-512) in float32, against torch.addmm on the [K, N] weight:
- from 2 rows up, oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, which reads the weight's
  transpose as it is stored, no copy) runs gpt2's layer weights 1.5-2x faster at 2-64 rows and
  1.2-1.5x at 256-1024, and the LM head 1.7x at 16 rows; BLAS's small-M gemm reaches about half of
  what oneDNN does there;
- at 1 row the matmul is bound by reading the weight, and PyTorch's BLAS call streams it from one core
  for some layouts (the LM head's wte.T: a single-threaded gemv). One bmm over per-thread column
  blocks gives every core its own share of the weight to stream: 1.1-1.2x on the layer weights, 1.8x
  on the LM head, where oneDNN is no faster than addmm.
Each output is still one dot product over K, in float32. oneDNN gives a row the same bits in any
batch of 2 rows or more; addmm does not (K = 3072, the LM head at 2-15 rows).

bfloat16 rows and weight, where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), take
oneDNN's bfloat16 linear at any row count: float32 sums, rounded to bfloat16 once with the bias. The
float32 route before it converted the whole weight to float32 at every product: on a 2-core
Sapphire Rapids a gpt2 bfloat16 decode step took 94 ms, 26 ms so (float32's: 27 ms).

oneDNN reads a weight stored as [out, in] rows (nn.Linear's, seen here as [in, out] through a
transpose) faster than one stored as Conv1D's [in, out] rows, to the same bits (the single-row
route's column blocks round otherwise in the two layouts). On a 2-core Xeon
(Sapphire Rapids) gpt2's 48 layer products took 27 against 41 ms at 16 rows and 274 against 373 at
512 rows. Faster still is a weight oneDNN packed once into its own layout (packed_weight.py): the
torch backend's engine packs the layer weights it owns where `can_pack` (`Backend.weight_layout`),
and every row count of a packed weight runs oneDNN's linear. In float32 a single row is then
rounded as oneDNN's single-row kernel rounds it, which for K = 3072 differs from its batches.
"""

from __future__ import annotations

import torch

from .packed_weight import REORDER, PackedWeight, pack_weight

MAX_BLOCKED_ROWS = 256
MIN_BLOCK_COLUMNS = 256
MIN_ONEDNN_ROWS = 2


def _onednn_linear() -> torch._ops.OpOverloadPacket | None:
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


ONEDNN_LINEAR = _onednn_linear()
# Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); without, oneDNN emulates it.
BFLOAT16_GEMM = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
# Packed float32 weights: faster with AVX-512 (a 16-row step 1.2x, a single row on a par); with
# oneDNN held to AVX2 a single row was 8% slower and 16 rows no faster, so they stay plain there.
PACKS_FLOAT32 = torch.backends.cpu.get_cpu_capability() == "AVX512"


def bfloat16_linear_runs(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether rows @ weight (+ bias) runs in bfloat16 (oneDNN, natively) rather than widened to float32."""
    return (ONEDNN_LINEAR is not None and BFLOAT16_GEMM and rows.device.type == "cpu"
            and rows.dtype == weight.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16))


def bfloat16_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """rows [M, K] @ weight [K, N] (+ bias [N]) -> [M, N] bfloat16, where bfloat16_linear_runs."""
    return ONEDNN_LINEAR(rows, weight.T, bias, "none", [], "")


def can_pack(dtype: torch.dtype, device: torch.device | str | None = None) -> bool:
    """Whether the engine packs a weight of `dtype` on `device` (packed_weight.py): float32 on a CPU
    with AVX-512 (PACKS_FLOAT32), bfloat16 where the CPU multiplies it natively (elsewhere its
    products are widened to float32)."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    return (REORDER is not None and ONEDNN_LINEAR is not None and on_cpu
            and ((dtype == torch.float32 and PACKS_FLOAT32) or (dtype == torch.bfloat16 and BFLOAT16_GEMM)))


def packed_if_packable(weight: torch.Tensor) -> torch.Tensor | PackedWeight:
    """W [K, N] packed where this machine packs its dtype (can_pack), else W itself, which every
    product also takes: the engine's loading and a copied packed weight's landing."""
    return pack_weight(weight) if can_pack(weight.dtype, weight.device) else weight


def packed_linear(rows: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """rows [M, K] @ W (+ bias [N]) -> [M, N] in W's dtype; rows of another dtype (float64 oracles)
    multiply W unpacked, widened as addmm_rows takes them."""
    if rows.dtype == weight.dtype and (bias is None or bias.dtype == weight.dtype):
        return ONEDNN_LINEAR(rows, weight.packed, bias, "none", [], "")
    wide = torch.promote_types(rows.dtype, torch.float32)
    return addmm_rows(rows.to(wide), weight.dense().to(wide), None if bias is None else bias.to(wide))


def addmm_rows(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """rows [M, K] @ weight [K, N] (+ bias [N]) -> [M, N], for any strides of weight."""
    count, (depth, width) = rows.shape[0], weight.shape
    if (ONEDNN_LINEAR is not None and rows.device.type == "cpu" and count >= MIN_ONEDNN_ROWS
            and rows.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)):
        return ONEDNN_LINEAR(rows, weight.T, bias, "none", [], "")
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
