"""rows @ W (+ bias) and the embedding's row gather for the torch backend, W a QuantizedWeight.

Each (format, activation dtype, row count) takes the fastest correct route measured (torch 2.13, two
threads; timings over gpt2's 48 layer weights, streamed as a step streams them):

- int8, where the CPU multiplies int8 natively (`INT8_GEMM`: AVX512-VNNI or AMX), from INT8PACK_ROWS
  + 1 bfloat16 rows, or from one float32 or float16 row, up to INTEGER_ROWS_BFLOAT16 or INTEGER_ROWS:
  the integer route, `torch._int_mm` (oneDNN's s8s8s32 gemm) on the stored [N, K] int8 bytes. Each
  row is written exactly in int8 digits first (see `_integer_route`: two digits for bfloat16 rows,
  three for float32 and float16), so this is not activation quantization: the result is the
  dequantize-then-multiply one to within float32's rounding (three digits; 5-8e-7 relative against
  the float32 reference's 1.5-3.5e-7 on gpt2's shapes) or far inside bfloat16's (two digits: 1e-4).
  Its int32 sums are exact and the rest is elementwise, so a row's output does not depend on the
  rows beside it. On a 2-core Sapphire Rapids (AMX), against the routes below: bfloat16 rows, 16 rows
  18.4 against 30.5 ms, 56 rows 35.8 against 41.6 (64 rows: 45.2 against the bfloat16 gemm's 38.2);
  float32 rows, 1 row 10.7 against 25.3 ms, 16 rows 23.6 against 39.1, 192 rows 120 against 139
  (256 rows: on par). A gpt2 int8 embed of 16 tokens 35 -> 21-25 ms in bfloat16, 40 -> 24 in
  float32; a float32 decode step 37.6 -> 19.4 ms. With oneDNN held to AVX2
  (ONEDNN_MAX_CPU_ISA=AVX2) it was slower than the routes below from 4 rows: not taken without VNNI.
  Each route's surrounding ops cost 10-40 us in a step (the weights' stream evicts them from L2), so
  the route's buffers and their views are made once per shape and thread.
- int8, bfloat16 rows, up to INT8PACK_ROWS (INT8PACK_ROWS_ALONE without `INT8_GEMM`: measured on
  the AVX2 EPYC against the dequantized route, 0.3-0.9x its time at 2-12 rows), K a multiple of 16:
  `torch._weight_int8pack_mm` on the stored [N, K] int8 bytes and the scales in bfloat16: 120-230 us
  for c_fc at M=1; on a par with the integer route at one row, slower from 5. It crashes the process
  (a segmentation fault, torch 2.13) on any other K, so those rows take the next route. Its float32
  and float16 paths are 10-20x slower than float32's own matmul: not taken.
- int8, bfloat16 rows past those, where BFLOAT16_GEMM: the dequantized route below run in bfloat16
  (the int8 values copied into bfloat16 exactly, torch.mm, which is oneDNN's bfloat16 gemm, the
  columns scaled after). A CPU without native bfloat16 (`BFLOAT16_GEMM` false: AVX2, e.g. a Zen 3
  EPYC) runs oneDNN's bfloat16 gemm emulated, so there those rows take the dequantized route in
  float32: a gpt2 int8 embed of 16 tokens 183 ms in bfloat16, 54 ms so.
- int4, bfloat16 rows: `torch._weight_int4pack_mm_for_cpu` on a prepacked copy (0.5 byte a weight,
  made on first use and kept per weight while the weight lives), 170 us at M=1, 1.1 ms at M=16. Its
  dequantization is (q - 8) * scale + zero with bfloat16 scales and float offsets, so ours,
  (q - z) * s, gives it zero = (8 - z) * s. N is padded to its multiple of 16. Its float32 and
  float16 paths: 4.4 ms and 6.9 ms at M=1.
- every other case (int8 rows the routes above leave, int4 with float32 and float16 rows, nf4 with
  any): W dequantized to float32 in blocks of columns (at most CHUNK_BYTES of them, in buffers each
  thread keeps: 26 MB at most) and multiplied in float32. int8: 0.5-0.8 ms at M=1, 2-3x float32's
  matmul (the int8 to float32 conversion is the cost), on par at 16 rows. An int4 block is unpacked with two byte ops into its
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
end; bfloat16 rows are held to bfloat16's tolerance, which this stays well inside. The dequantized
float32 route is as exact as the reference's dequantize-then-multiply, for any activation dtype. W's
N-major storage (quantized_weight.py) makes a block of columns, and an embedding's row, contiguous
bytes. The timings were taken while other jobs shared the cores: read them as ratios.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch

from .cpu_matmul import BFLOAT16_GEMM
from .quantized_weight import NESTED_BLOCK, NF4_CODE, QuantizedWeight

CHUNK_BYTES = 8 << 20  # dequantized weights (or integer products) at a time (2M float32, 4M bfloat16)
# Whether it multiplies int8 by int8 natively (AVX512-VNNI or AMX): the integer route's condition.
INT8_GEMM = any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_vnni_supported", "_is_amx_tile_supported"))
# int8 with bfloat16 rows: _weight_int8pack_mm up to this many rows, or INT8PACK_ROWS_ALONE where the
# integer route is not taken. It crashes (a segmentation fault, torch 2.13) when K is not a multiple of 16.
INT8PACK_ROWS = 4
INT8PACK_ROWS_ALONE = 15
INT8PACK_K_MULTIPLE = 16
# The integer route below this many rows: bfloat16 rows where BFLOAT16_GEMM (from here the
# dequantized route's bfloat16 gemm is faster), other rows (and bfloat16 without it) otherwise.
INTEGER_ROWS_BFLOAT16 = 64
INTEGER_ROWS = 256
# The int8 digits a row is split into on the integer route: two for bfloat16 rows (a 15-bit fixed
# point, where a bfloat16 element within 2^7 of its row's largest is exact), three (22 bits) for
# float32 and float16 rows.
ROW_DIGITS = {torch.bfloat16: 2}
# Per digit count: the fixed point's largest magnitude; the float32 constant whose addition rounds
# to an integer and adds 128 to each digit below the top one (a [1] tensor: a 0-dim one would not
# promote half-precision rows to float32); the XOR that takes those 128s off.
_FIXED_POINT = {
    digits: (limit, torch.tensor([1.5 * 2**23 + offsets]),
             torch.tensor([-128] * (digits - 1) + [0], dtype=torch.int8).view(digits, 1, 1))
    for digits, limit, offsets in [(2, 127.0 * 256, 0x80), (3, 2.0**22 - 0x8080 - 1, 0x8080)]
}
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
        _SCRATCH.__dict__.pop("integer_views", None)  # they hold the buffer it replaces
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


def _int8pack_route(rows: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    prepared = _prepared(weight)
    if "scale_bf16" not in prepared:
        prepared["scale_bf16"] = weight.scale.reshape(-1).to(torch.bfloat16)
    return torch._weight_int8pack_mm(rows, weight.data.T, prepared["scale_bf16"])


def _integer_views(m: int, k: int, block: int, digits: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The integer route's buffers for m rows of K, a block of columns and a digit count, as the
    views it uses: made once per shape (a view costs microseconds, and a step takes dozens of
    products) while this thread's scratch buffers last."""
    views = _SCRATCH.__dict__.setdefault("integer_views", {})
    key = (m, k, block, digits, device)
    if key not in views:
        fixed = _scratch("fixed point", m * k, torch.float32, device).view(m, k)
        split = _scratch("digits", digits * m * k, torch.int8, device).view(digits, m, k)
        products = _scratch("products", digits * m * block, torch.int32, device)
        wide = _scratch("wide products", digits * m * block, torch.float32, device)
        fixed_bytes = fixed.view(torch.int32).view(torch.int8).view(m, k, 4)[..., :digits].permute(2, 0, 1)
        views[key] = (fixed, fixed_bytes, split, split.view(digits * m, k), products, wide,
                      products.view(digits * m, block), wide.view(digits, m, block))
    return views[key]


def _integer_route(rows: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """rows @ W (+ bias) in float32 for an int8 W, by int8 x int8 products, whose int32 sums are
    exact: each row is scaled to a fixed point, q = round(x * limit / max|x|), and written in base 256
    with digits in [-128, 127], each digit a row of the integer product; the digits' products are
    then added with their weights 256^j in float32 and scaled back, by max|x| / limit and W's scales."""
    m, k = rows.shape
    n = weight.shape[1]
    digits = ROW_DIGITS.get(rows.dtype, 3)
    limit, magic, digit_masks = _FIXED_POINT[digits]
    block = max(1, min(n, CHUNK_BYTES // (4 * digits * m)))
    fixed, fixed_bytes, split, split_rows, products, wide, block_rows, block_digits = _integer_views(m, k, block, digits, rows.device)
    # An all-zero row divides 0 by 0 here, and its output is 0 * those digits' products: 0. A NaN
    # or inf row scales its output by NaN or inf.
    largest = rows.abs().amax(1, keepdim=True).float()
    # x * limit / largest + magic is an integer in [2^23, 2^24), where float32's step is 1: its low
    # bytes (little-endian) are q's digits, the lower ones plus 128, the top one plus magic's 64 (bit
    # 22) when there are three.
    torch.addcdiv(magic, rows, largest, value=limit, out=fixed)
    torch.bitwise_xor(fixed_bytes, digit_masks, out=split)
    if digits == 3:
        split[2].sub_(64)
    out = torch.empty(m, n, device=rows.device)
    for start in range(0, n, block):
        stop = min(start + block, n)
        width = stop - start
        if width == block:
            part_rows, part = block_rows, block_digits
        else:  # the last block, narrower: int_mm writes only contiguous outputs
            part_rows = products[: digits * m * width].view(digits * m, width)
            part = wide[: digits * m * width].view(digits, m, width)
        torch._int_mm(split_rows, weight.data[:, start:stop], out=part_rows)
        part.copy_(part_rows.view(digits, m, width))  # float32: exact to float32's rounding
        sums = torch.add(part[0], part[1], alpha=256.0, out=out[:, start:stop])
        if digits == 3:
            sums.add_(part[2], alpha=65536.0)
    out.mul_(largest)
    scale = _integer_column_scale(weight, digits)
    return out.mul_(scale) if bias is None else torch.addcmul(bias, out, scale)


def _integer_column_scale(weight: QuantizedWeight, digits: int) -> torch.Tensor:
    """W's scales over the fixed point's limit, [1, N] float32."""
    prepared = _prepared(weight)
    key = f"scale over limit {digits}"
    if key not in prepared:
        prepared[key] = weight.scale / _FIXED_POINT[digits][0]
    return prepared[key]


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


def _int8_route(rows: torch.Tensor) -> str:
    """Which route multiplies these rows by an int8 W on this CPU: measured on a 2-core Xeon with
    AMX (cpu_quantized.py's docstring), with the int8pack kernel's K limit."""
    m, k = rows.shape
    bfloat16 = rows.dtype == torch.bfloat16
    if bfloat16 and k % INT8PACK_K_MULTIPLE == 0 and m <= (INT8PACK_ROWS if INT8_GEMM else INT8PACK_ROWS_ALONE):
        return "int8pack"
    if INT8_GEMM and m < (INTEGER_ROWS_BFLOAT16 if bfloat16 and BFLOAT16_GEMM else INTEGER_ROWS):
        return "integer"
    return "dequantized"


def quantized_matmul(rows: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """rows [M, K] (the activations' dtype) @ W [K, N] (+ bias [N]) -> [M, N]: bfloat16 from the
    bfloat16 routes (the bias added in bfloat16: no casts, the step's ops are few), float32 from the
    integer route and the float32 dequantized one (float64 for float64 rows)."""
    rows = rows.contiguous()
    route = _int8_route(rows) if weight.format == "int8" and rows.dtype != torch.float64 else "dequantized"
    if route == "integer":
        return _integer_route(rows, weight, bias)
    if route == "int8pack":
        out = _int8pack_route(rows, weight)
    elif rows.dtype == torch.bfloat16 and weight.format == "int4":
        out = _int4_route(rows, weight)
    elif rows.dtype == torch.bfloat16 and weight.format == "int8" and BFLOAT16_GEMM:
        out = _dequantized_route(rows, weight, torch.bfloat16)
    else:
        out = _dequantized_route(rows, weight, torch.float64 if rows.dtype == torch.float64 else torch.float32)
    if bias is None:
        return out
    return out.add_(bias) if out.is_contiguous() else out + bias
