"""rows @ W (+ bias) and the embedding's row gather for the torch backend, W a QuantizedWeight.

Each (format, activation dtype) takes the fastest correct route measured on the 2-core EPYC
(avx512_bf16, VNNI; torch 2.13; one thread, M rows of gpt2's c_fc, K=768, N=3072; float32 x @ W
takes 220-300 us at M=1, 2.6 ms at M=16):

- int8, bfloat16 rows: `torch._weight_int8pack_mm` on the stored [N, K] int8 bytes and the scales
  in bfloat16: 120-230 us at M=1, 1.1 ms at M=16. Its float32 and float16 paths are 10-20x slower than
  float32's own matmul (2.2-2.6 ms and 3.7 ms at M=1, 55 ms at M=16): not taken. From
  INT8_DEQUANTIZED_ROWS rows it is slower than the dequantized route below run in bfloat16 (the int8
  values copied into bfloat16 exactly, torch.mm, which is oneDNN's bfloat16 gemm here, the columns
  scaled after): two threads, gpt2's layer shapes, 1.1x at 16 rows, 1.6x at 32, 2.4x at 128, and
  0.3-0.9x at 2-12 rows; a gpt2 embed of 16 tokens 37.9 -> 23.5 ms. A CPU without native bfloat16
  (`BFLOAT16_GEMM` false: AVX2, e.g. a Zen 3 EPYC) runs oneDNN's bfloat16 gemm emulated, so there
  those rows take the dequantized route in float32: a gpt2 int8 embed of 16 tokens 183 ms in
  bfloat16, 54 ms so.
- int4, bfloat16 rows: `torch._weight_int4pack_mm_for_cpu` on a prepacked copy (0.5 byte a weight,
  made on first use and kept per weight while the weight lives), 170 us at M=1, 1.1 ms at M=16. Its
  dequantization is (q - 8) * scale + zero with bfloat16 scales and float offsets, so ours,
  (q - z) * s, gives it zero = (8 - z) * s. N is padded to its multiple of 16. Its float32 and
  float16 paths: 4.4 ms and 6.9 ms at M=1.
- every other pair (float32 and float16 rows, nf4 with any): W dequantized to float32 in blocks of
  columns (at most CHUNK_BYTES of them, in buffers each thread keeps: 26 MB at most) and
  multiplied in float32. int8: 0.5-0.8 ms at M=1, 2-3x float32's matmul (the int8 to float32
  conversion is the cost), on par at 16 rows. An int4 block is unpacked with two byte ops into its
  even rows then its odd rows (the rows are multiplied in that order: no interleaving pass), then
  shifted and scaled per group: int4 1.6-2.8 ms at M=1, 3-4 ms at M=16. An nf4 block is gathered a
  byte at a time from a 256-entry table of both its code values (index_select over an int64 view of
  float32 pairs, int32 indices), then scaled per block: the gather is still the slowest step, about
  0.85 ns a byte; a gather per weight took 1.5 ns a weight. On the AVX2 EPYC (Zen 3), c_fc 1.4-1.7
  ms at M=1 and 2.1-2.9 ms at M=16, bfloat16 rows included (no kernel takes nf4); gpt2 in nf4 about
  2.2x faster, runs alternated as the VM's speed drifted: a decode step 257-309 -> 90-167 ms, an
  embed of 16 tokens 227-255 -> 88-147 ms.

The bfloat16 routes compute in bfloat16: their product is rounded to it, and so is the sum with the
bias (and the activation and residual the caller applies), where the reference rounds once at the
end; bfloat16 rows are held to bfloat16's tolerance, which this stays well inside. The float32
route is as exact as the reference's dequantize-then-multiply, for any activation dtype. W's
N-major storage (quantized_weight.py) makes a block of columns, and an embedding's row, contiguous
bytes. The timings were taken while other jobs shared the cores: read them as ratios.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch

from .quantized_weight import NESTED_BLOCK, NF4_CODE, QuantizedWeight

CHUNK_BYTES = 8 << 20  # dequantized weights at a time in the dequantized route (2M float32, 4M bfloat16)
INT8_DEQUANTIZED_ROWS = 16  # int8 with bfloat16 rows: from here on the dequantized route (in bfloat16 where BFLOAT16_GEMM)
# Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); without, oneDNN emulates it.
BFLOAT16_GEMM = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
PACK_ROWS = 4096  # output channels packed at a time for the int4 kernel (a multiple of its 64-row blocks)
INT4_PACK_MULTIPLE = 16  # the int4 kernel's N must be a multiple of 16

# Per weight, what its routes derive from it once: bfloat16 scales, the int4 prepacked copy,
# nf4's float32 absmax (decoded from double quantization). Dropped with the weight.
_PREPARED: weakref.WeakKeyDictionary[QuantizedWeight, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


# The dequantized route's block buffers, kept per thread and reused by every product: a fresh 8 MB
# buffer costs its page faults each time (measured: twice the time of the conversion into it).
_SCRATCH = threading.local()


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least numel elements, this thread's own, grown when too small."""
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    found = buffers.get((name, dtype, device))
    if found is None or found.numel() < numel:
        found = buffers[(name, dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return found[:numel]


def _prepared(weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    found = _PREPARED.get(weight)
    if found is None:
        found = _PREPARED[weight] = {}
    return found


def _nf4_absmax_rows(weight: QuantizedWeight) -> torch.Tensor:
    """An nf4 weight's absmax [N, K // 64] float32, its 8-bit codes decoded under double quantization."""
    prepared = _prepared(weight)
    if "absmax" not in prepared:
        codes = weight.scale.T  # [N, G]
        if weight.double_quant:
            n, groups = codes.shape
            block = torch.arange(n * groups, device=weight.device).view(n, groups) // NESTED_BLOCK
            absmax = weight.code[codes.long()] * weight.nested_absmax[block] + weight.nested_offset
        else:
            absmax = codes
        prepared["absmax"] = absmax.contiguous()
    return prepared["absmax"]


def _group_affine(weight: QuantizedWeight, columns: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero) of W's columns, [n, G] float32 each; zero is None for nf4."""
    if weight.format == "int4":
        return weight.scale.T[columns], weight.zero.T[columns].float()
    return _nf4_absmax_rows(weight)[columns], None


@functools.cache
def _nf4_byte_values(device: torch.device) -> torch.Tensor:
    """[256] int64: for each byte, the float32 pair (NF4_CODE[high nibble], NF4_CODE[low nibble]),
    the byte's two rows in order, so that one 8-byte gather decodes both."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=-1).view(torch.int64).view(256).to(device)


def _nf4_values(stored: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The code values of nf4 bytes stored [n, K // 2] into out [n, K] float32, rows in order."""
    index = _scratch("index", stored.numel(), torch.int32, stored.device).copy_(stored.reshape(-1))
    torch.index_select(_nf4_byte_values(stored.device), 0, index, out=out.view(torch.int64).view(-1))
    return out


def gather_rows(weight: QuantizedWeight, index: torch.Tensor) -> torch.Tensor:
    """Columns `index` (any shape) of W [K, N] as rows, [*index.shape, K] float32: the embedding's
    wte rows, when wte is the tied LM head's weight."""
    flat = index.reshape(-1)
    k = weight.shape[0]
    stored = weight.data.T[flat]  # [n, K] int8 or [n, K // 2] bytes
    if weight.format == "int8":
        return (stored.float() * weight.scale.T[flat]).view(*index.shape, k)
    groups = k // weight.group_size
    scale, zero = _group_affine(weight, flat)
    if weight.format == "int4":
        nibbles = torch.stack([stored >> 4, stored & 15], dim=-1).view(-1, groups, weight.group_size)
        values = (nibbles.float() - zero[..., None]) * scale[..., None]
    else:
        values = torch.empty(flat.numel(), groups, weight.group_size, device=weight.device)
        _nf4_values(stored, values.view(flat.numel(), k))
        values.mul_(scale[..., None])
    return values.view(*index.shape, k)


def _int8_route(rows: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    if rows.shape[0] >= INT8_DEQUANTIZED_ROWS:
        return _dequantized_route(rows, weight, torch.bfloat16 if BFLOAT16_GEMM else torch.float32)
    prepared = _prepared(weight)
    if "scale_bf16" not in prepared:
        prepared["scale_bf16"] = weight.scale.reshape(-1).to(torch.bfloat16)
    return torch._weight_int8pack_mm(rows, weight.data.T, prepared["scale_bf16"])


def _int4_pack(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 kernel's prepacked weight [N', K // 2] and bfloat16 scales and offsets [G, N', 2],
    N' = N padded to a multiple of 16 (padding columns are zeros)."""
    k, n = weight.shape
    padded = -(-n // INT4_PACK_MULTIPLE) * INT4_PACK_MULTIPLE
    packs = []
    for start in range(0, padded, PACK_ROWS):
        stop = min(start + PACK_ROWS, padded)
        stored = weight.data.T[start:min(stop, n)]
        q = torch.stack([stored >> 4, stored & 15], dim=-1).view(-1, k).int()
        if stop > n:
            q = torch.cat([q, q.new_full((stop - n, k), 8)])
        packs.append(torch._convert_weight_to_int4pack_for_cpu(q, 1))
    scale, zero = weight.scale, weight.zero.float()
    offset = (8.0 - zero) * scale  # (q - z) * s = (q - 8) * s + (8 - z) * s
    scales_and_zeros = torch.stack([scale, offset], dim=-1)  # [G, N, 2]
    if padded > n:
        scales_and_zeros = torch.cat([scales_and_zeros, scales_and_zeros.new_zeros(scales_and_zeros.shape[0], padded - n, 2)], 1)
    return torch.cat(packs), scales_and_zeros.to(torch.bfloat16).contiguous()


def _int4_route(rows: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    prepared = _prepared(weight)
    if "int4_pack" not in prepared:
        prepared["int4_pack"], prepared["int4_scales"] = _int4_pack(weight)
    out = torch._weight_int4pack_mm_for_cpu(rows, prepared["int4_pack"], weight.group_size, prepared["int4_scales"])
    n = weight.shape[1]
    return out if out.shape[1] == n else out[:, :n]


def _dequantize_block(weight: QuantizedWeight, start: int, stop: int, out: torch.Tensor, nibbles: torch.Tensor | None) -> None:
    """Columns [start, stop) of W into out [stop - start, K] (float32): int8 unscaled (the caller
    scales the product), nf4 in row order, int4 with each column's even rows first, then its odd rows."""
    stored = weight.data.T[start:stop]
    if weight.format == "int8":
        out.copy_(stored)
        return
    count, k = out.shape
    groups = k // weight.group_size
    scale, zero = _group_affine(weight, slice(start, stop))
    if weight.format == "nf4":
        if out.dtype == torch.float32:
            _nf4_values(stored, out)
        else:
            out.copy_(_nf4_values(stored, _scratch("values", count * k, torch.float32, out.device).view(count, k)))
        out.view(count, groups, weight.group_size).mul_(scale[:, :, None])
        return
    halves = nibbles[:count].view(count, 2, k // 2)
    torch.bitwise_right_shift(stored, 4, out=halves[:, 0])
    torch.bitwise_and(stored, 15, out=halves[:, 1])
    grouped = out.view(count, 2, groups, weight.group_size // 2)
    out.copy_(halves.view(count, k))
    grouped.sub_(zero[:, None, :, None])
    grouped.mul_(scale[:, None, :, None])


def _dequantized_route(rows: torch.Tensor, weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """rows @ W in `dtype`, W dequantized a block of columns at a time: float32 or float64, or
    bfloat16 for int8, whose unscaled values bfloat16 holds exactly."""
    wide = rows.to(dtype)
    k, n = weight.shape
    if weight.format == "int4":
        wide = torch.cat([wide[:, 0::2], wide[:, 1::2]], dim=1)  # the blocks' row order: even rows, then odd
    block = max(1, min(n, CHUNK_BYTES // (k * wide.element_size())))
    buffer = _scratch("block", block * k, dtype, rows.device).view(block, k)
    nibbles = _scratch("nibbles", block * k, torch.uint8, rows.device).view(block, k) if weight.format == "int4" else None
    out_t = torch.empty(n, rows.shape[0], dtype=dtype, device=rows.device)  # [N, M]: each block's rows are contiguous
    columns = wide.T
    for start in range(0, n, block):
        stop = min(start + block, n)
        part = buffer[: stop - start]
        _dequantize_block(weight, start, stop, part, nibbles)
        torch.mm(part, columns, out=out_t[start:stop])
    if weight.format == "int8":
        out_t.mul_(weight.scale.T)
    return out_t.T


def quantized_matmul(rows: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """rows [M, K] (the activations' dtype) @ W [K, N] (+ bias [N]) -> [M, N]: bfloat16 from the
    bfloat16 routes (the bias added in bfloat16: no casts, the step's ops are few), float32 from the
    dequantized route otherwise (float64 for float64 rows)."""
    if rows.dtype == torch.bfloat16 and weight.format == "int8":
        out = _int8_route(rows.contiguous(), weight)
    elif rows.dtype == torch.bfloat16 and weight.format == "int4":
        out = _int4_route(rows.contiguous(), weight)
    else:
        out = _dequantized_route(rows, weight, torch.float64 if rows.dtype == torch.float64 else torch.float32)
    if bias is None:
        return out
    return out.add_(bias) if out.is_contiguous() else out + bias
