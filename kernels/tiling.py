"""Tile sizes for every kernel, chosen from shapes alone.

Deterministic on purpose: a launch inside a CUDA-graph capture must not benchmark, and the compile
audit must be able to list every configuration a launcher can pick. The numbers target Hopper and
Ampere: a pipelined matmul tile stays under sm_80's 163 KiB of shared memory.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import triton

from .toolchain import triton_release

MAX_ROW_WIDTH = 16384
MAX_HEAD_DIM = 256
# Decode attention splits a row's context until about this many programs are in flight (2 per SM
# on an H100), so a batch of one still spreads its KV reads over the whole chip.
DECODE_TARGET_PROGRAMS = 264
# Products of at most this many rows (decode, short embeds) run split-K: one row block, so a row's
# result never depends on how many other rows share its batch.
SPLIT_ROWS = 16
# An H100 has 132 SMs: a weight-streaming launch of fewer programs leaves SMs reading nothing.
MIN_STREAMING_PROGRAMS = 132
TUNING_TABLE = Path(__file__).with_name("decode_tuning.json")
TILE_FIELDS = ("block_n", "block_k", "splits", "num_warps", "num_stages")
# The column tiles a split product may take, and the warps it may spread a tile over.
SPLIT_BLOCK_NS = (32, 64, 128, 256)
SPLIT_WARPS = (4, 8)
# ptxas 12.8 (triton < 3.9) holds the quantized decode products of some formats at 64 registers and
# the half-precision int4 group-128 tiles at 128, and spills 8-16 bytes; 12.9 spills nothing there.
# A cap makes 12.8 allocate what they need (decode: 128, keeping two blocks an SM; group-128 tiles:
# 255). It is not for every tile: capped at 255, 12.8 gives the other tiled products 240-255
# registers. And 12.9 allocates differently once capped and spills, so only older triton gets these
# caps. The quantized compile audits (bench/results/compile-audit-quantized*.json) hold each triton
# to no spill and 16 registers of headroom.
UNCAPPED_FROM = (3, 9)
QUANTIZED_REGISTER_CAPS = {"split": 128, "tiled": 255}
WIDE_GROUP_TILE_REGISTERS = 192
# An nf4 LM head tile that dequantizes its groups in parts: uncapped, ptxas 12.9 gave the float16 one
# 80 registers and spilled 8 bytes on sm_80; capped at 128 it takes 113-119 (92-96 under triton 3.6).
NF4_PART_TILE_REGISTERS = 128


@dataclass(frozen=True)
class MatmulTiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None  # ptxas' register cap; None: its own choice


@dataclass(frozen=True)
class SplitTiles:
    """A split-K product of at most SPLIT_ROWS rows: column tiles of block_n, K cut into `splits`
    ranges of k_per_split (a multiple of block_k), one program per (column tile, range)."""

    block_n: int
    block_k: int
    k_per_split: int
    splits: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None  # ptxas' register cap; None: its own choice
    dequant_k: int | None = None  # a 4-bit group's rows dequantized at a time; None: all block_k

    def programs(self, n: int) -> int:
        return triton.cdiv(n, self.block_n) * self.splits


@dataclass(frozen=True)
class AttentionTiles:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def row_block(width: int) -> int:
    """The power-of-two block that holds a whole row of `width` elements."""
    if width < 1 or width > MAX_ROW_WIDTH:
        raise ValueError(f"row width {width} is outside the supported range 1..{MAX_ROW_WIDTH}")
    return triton.next_power_of_2(width)


def row_warps(block: int) -> int:
    return min(max(block // 256, 1), 8)


def matmul_tiles(m: int, n: int, k: int, element_size: int) -> MatmulTiles:
    """Tiles for an [m, k] @ [k, n] product. Up to 64 rows (decode) the product is a memory-bound
    GEMV: one row block, deep K tiles and more pipeline stages keep weight reads in flight. Above,
    tiles for tensor-core throughput. tl.dot needs 16 or more in every dimension. Each choice leaves
    16 registers of headroom and spills nothing on sm_80 and sm_90 under triton 3.6 (ptxas 12.8) and
    3.9 (ptxas 12.9), with the LayerNorm prologue and every epilogue (the compile audit holds it):
    128 x 128 tiles, and 4 warps at 64 rows, needed up to 255."""
    if min(m, n, k) < 1:
        raise ValueError(f"matmul shape m={m}, n={n}, k={k} must be positive")
    wide = element_size >= 4
    if m <= 64:
        block_m = max(16, triton.next_power_of_2(m))
        return MatmulTiles(block_m, 64, 32 if wide else 128, num_warps=8, num_stages=4)
    return MatmulTiles(64 if wide else 128, 64, 32 if wide else 64, num_warps=8, num_stages=3)


def split_tiles(n: int, k: int, element_size: int) -> SplitTiles:
    """Tiles for an [m <= SPLIT_ROWS, k] @ [k, n] product: tiles forced by `forcing_split_tiles` (the
    tuner, the compile audit), else the committed tuning table's entry for the shape (written by
    bench/gpu.sh from timings on a GPU), else `default_split_tiles`."""
    if min(n, k) < 1:
        raise ValueError(f"matmul shape n={n}, k={k} must be positive")
    key = tuning_key(n, k, element_size)
    forced = _forced_split_tiles.get().get(key)
    if forced is not None:
        return forced
    entry = tuning_table().get(key)
    if entry is None:
        return default_split_tiles(n, k, element_size)
    return split_tiles_of(n, k, *(entry[name] for name in TILE_FIELDS))


_forced_split_tiles: ContextVar[dict[str, SplitTiles]] = ContextVar("tritongpt2_forced_split_tiles", default={})


@contextmanager
def forcing_split_tiles(tiles: dict[str, SplitTiles]) -> Iterator[None]:
    """Within the block, split_tiles returns tiles[tuning_key(n, k, element_size)] for those shapes:
    how a candidate is launched before it is in the table. Never inside a CUDA-graph capture that
    outlives the block."""
    token = _forced_split_tiles.set({**_forced_split_tiles.get(), **tiles})
    try:
        yield
    finally:
        _forced_split_tiles.reset(token)


def tuning_key(n: int, k: int, element_size: int) -> str:
    return f"{n}x{k}:{element_size}"


def parse_tuning_key(key: str) -> tuple[int, int, int]:
    """(n, k, element_size) of a key "NxK:element_size"."""
    try:
        shape, element_size = key.split(":")
        n, k = shape.split("x")
        return int(n), int(k), int(element_size)
    except ValueError:
        raise ValueError(f"tuning table key {key!r} is not NxK:element_size") from None


@lru_cache(maxsize=1)
def tuning_table() -> dict[str, dict]:
    return checked_tuning_table(json.loads(TUNING_TABLE.read_text()), str(TUNING_TABLE))


def checked_tuning_table(document: dict, source: str) -> dict[str, dict]:
    """The "linear" entries of a tuning table document, each checked to be tiles a split product can
    launch: a hand-edited or stale table fails here, naming the entry, not in a compiler."""
    entries = document.get("linear")
    if not isinstance(entries, dict):
        raise ValueError(f"{source}: no \"linear\" table of entries")
    for key, entry in entries.items():
        problem = _entry_problem(key, entry)
        if problem:
            raise ValueError(f"{source}: entry {key!r}: {problem}")
    return entries


def _entry_problem(key: str, entry: object) -> str | None:
    n, k, element_size = parse_tuning_key(key)
    if min(n, k) < 1 or element_size not in (2, 4):
        return "N and K must be positive and the element size 2 or 4"
    if not isinstance(entry, dict):
        return f"must be an object of {', '.join(TILE_FIELDS)}, got {entry!r}"
    missing = [name for name in TILE_FIELDS if not isinstance(entry.get(name), int) or isinstance(entry.get(name), bool)]
    unknown = sorted(set(entry) - set(TILE_FIELDS) - {"measured"})
    if missing or unknown:
        return f"needs integer {', '.join(TILE_FIELDS)} and nothing but \"measured\" besides (bad or missing: {missing}, unknown: {unknown})"
    for name in ("block_n", "block_k"):
        if entry[name] < 16 or entry[name] & (entry[name] - 1):
            return f"{name} {entry[name]} must be a power of two of at least 16 (tl.dot)"
    if entry["block_n"] * entry["block_k"] > weight_tile_elements(element_size):
        return (f"a {entry['block_k']} x {entry['block_n']} weight tile exceeds the register budget of "
                f"{weight_tile_elements(element_size)} elements at {element_size} bytes an element")
    if entry["splits"] < 1 or entry["num_stages"] < 1:
        return "splits and num_stages must be at least 1"
    if entry["num_warps"] not in (1, 2, 4, 8, 16):
        return f"num_warps {entry['num_warps']} must be 1, 2, 4, 8 or 16"
    return None


def weight_tile_elements(element_size: int) -> int:
    """The most weight elements one program's tile may hold (block_k x block_n) without spilling."""
    return 2048 if element_size >= 4 else 8192


def tile_entry(tiles: SplitTiles) -> dict[str, int]:
    """The tuning table's fields for these tiles."""
    return {"block_n": tiles.block_n, "block_k": tiles.block_k, "splits": tiles.splits, "num_warps": tiles.num_warps,
            "num_stages": tiles.num_stages}


def split_tiles_of(n: int, k: int, block_n: int, block_k: int, splits: int, num_warps: int, num_stages: int) -> SplitTiles:
    """The tiles that cut K into about `splits` ranges of whole block_k steps (fewer when K is short)."""
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    return SplitTiles(block_n, block_k, k_per_split, triton.cdiv(k, k_per_split), num_warps, num_stages)


def default_split_tiles(n: int, k: int, element_size: int, block_k: int | None = None, budget_share: int = 1) -> SplitTiles:
    """Wide enough to fill the GPU without splitting (the LM head): the widest column tile that still
    gives MIN_STREAMING_PROGRAMS programs, since every program reads its rows' LayerNorm inputs once.
    Otherwise 64 columns and the fewest K ranges that give MIN_STREAMING_PROGRAMS programs (one range
    when no cut of K gives them): each range adds a float32 partial of the output to write and read back, 4 x splits /
    k of the weight's bytes. Among those, the deepest block_k (fewer, larger weight loads in flight).
    A weight tile holds at most 8192 elements (2048 in float32), so nothing spills. A given block_k
    (a 4-bit weight's K group) is kept: a wide tile dequantizes it in parts of the budget's depth
    (dequant_k, 32 rows or more: two tl.dot of 16 or more), a narrow one is narrowed to the budget
    (over budget_share) where it must."""
    elements = weight_tile_elements(element_size) // budget_share
    for block_n in (256, 128):
        deepest = min(128, elements // block_n)
        if triton.cdiv(n, block_n) < MIN_STREAMING_PROGRAMS:
            continue
        if block_k is None and deepest >= 16:
            return split_tiles_of(n, k, block_n, deepest, 1, num_warps=8, num_stages=4)
        if block_k is not None and deepest >= min(block_k, 32):
            tiles = split_tiles_of(n, k, block_n, block_k, 1, num_warps=8, num_stages=4)
            return tiles if deepest >= block_k else replace(tiles, dequant_k=deepest)
    block_n = 64 if block_k is None else max(16, min(64, elements // block_k))
    return fewest_splits(n, k, block_n, element_size, MIN_STREAMING_PROGRAMS, num_warps=8, block_k=block_k)


def quantized_split_tiles(n: int, k: int, element_size: int, block_k: int | None, label: str) -> SplitTiles:
    """Tiles for a split product of a quantized weight (`label`: its format, e.g. int4g64): those
    forced by `forcing_split_tiles` under quantized_tuning_key, else default_split_tiles' rule, never
    the tuning table (timed with float weights). block_k: a 4-bit weight's K group, which every tile
    reads one scale row of; None for int8 (one scale per channel, applied after the K loop). nf4's
    code is decoded by a tree of selects, which holds more registers per weight: its tiles get half
    the budget (128 x 64 in half precision, 32 x 64 in float32 spilled on sm_80), and one that
    dequantizes in parts a cap of NF4_PART_TILE_REGISTERS under every triton."""
    nf4 = label.startswith("nf4")
    forced = _forced_split_tiles.get().get(quantized_tuning_key(n, k, element_size, label))
    if forced is None:
        tiles = default_split_tiles(n, k, element_size, block_k, budget_share=2 if nf4 else 1)
    elif block_k is not None and forced.block_k != block_k:
        raise ValueError(f"forced tiles {forced} for a {label} weight need block_k={block_k}, its K group")
    elif forced.dequant_k is not None and (block_k is None or block_k % forced.dequant_k or forced.dequant_k < 32):
        raise ValueError(f"forced tiles {forced} for a {label} weight: dequant_k={forced.dequant_k} must divide a 4-bit "
                         "weight's K group and be at least 32 (two tl.dot of 16 rows)")
    else:
        tiles = forced
    parted_nf4 = nf4 and tiles.dequant_k is not None
    return replace(tiles, max_registers=NF4_PART_TILE_REGISTERS if parted_nf4 else quantized_register_cap("split"))


def register_cap(*tiles: SplitTiles | MatmulTiles) -> int | None:
    """The cap of a launch that runs these tiles' products: the lowest of theirs, None if none has one."""
    caps = [t.max_registers for t in tiles if t.max_registers is not None]
    return min(caps) if caps else None


def quantized_tuning_key(n: int, k: int, element_size: int, label: str) -> str:
    return f"{tuning_key(n, k, element_size)}:{label}"


def quantized_matmul_tiles(m: int, n: int, k: int, element_size: int, block_k: int | None) -> MatmulTiles:
    """Tiles for a tiled product of a quantized weight: int8 (block_k None) as matmul_tiles; a 4-bit
    weight's tile is one K group deep, 64 rows (32 in float32) and at most 4096 weights (1024 in
    float32) wide: each half of the tile is dequantized in registers beside the operands, and larger
    tiles spilled or came within 16 registers of the limit on sm_80 and sm_90. A float32 tile of a
    128-deep group is 16 x 16 on 8 warps, capped at WIDE_GROUP_TILE_REGISTERS under every triton:
    32 x 16 took 255 registers and spilled under triton 3.6, 16 x 16 uncapped spilled 8 bytes under
    3.9, and on 4 warps either needed 255. Shallower float32 tiles take 4 warps (8 over a 32-deep
    one, held to 64 registers by ptxas on sm_80, spilled)."""
    tiles = matmul_tiles(m, n, k, element_size)
    if block_k is None:
        return tiles
    wide = element_size >= 4
    if wide and block_k >= 128:
        return MatmulTiles(16, 16, block_k, 8, tiles.num_stages, WIDE_GROUP_TILE_REGISTERS)
    block_m = min(tiles.block_m, 32 if wide else 64)
    block_n = max(16, min(32 if wide else 64, (1024 if wide else 4096) // block_k))
    num_warps = 4 if wide else tiles.num_warps
    cap = quantized_register_cap("tiled") if block_k >= 128 else None
    return MatmulTiles(block_m, block_n, block_k, num_warps, tiles.num_stages, cap)


def quantized_register_cap(product: str, triton_version: str | None = None) -> int | None:
    """The register cap of a quantized `product` ("split" or "tiled") under this triton (or the given
    version): QUANTIZED_REGISTER_CAPS before UNCAPPED_FROM, none from it."""
    if triton_release(triton_version) >= UNCAPPED_FROM:
        return None
    return QUANTIZED_REGISTER_CAPS[product]


def fewest_splits(n: int, k: int, block_n: int, element_size: int, programs: int, num_warps: int,
                  block_k: int | None = None) -> SplitTiles:
    """Column tiles of block_n and the fewest K ranges that give `programs` programs, the deepest
    block_k among those (or the given one); one range (the deepest block_k) when no cut of K gives them."""
    block_ks = [block_k] if block_k else [16 * 2**i for i in range(4) if 16 * 2**i * block_n <= weight_tile_elements(element_size)]
    choices = [split_tiles_of(n, k, block_n, block_k, splits, num_warps=num_warps, num_stages=4)
               for block_k in block_ks for splits in range(1, triton.cdiv(k, 16) + 1)]
    enough = [c for c in choices if c.programs(n) >= programs]
    if not enough:  # a product too small to fill the GPU however it is cut: no partials to add up
        return max((c for c in choices if c.splits == 1), key=lambda c: c.block_k)
    return min(enough, key=lambda c: (c.splits, -c.block_k))


def split_candidates(n: int, k: int, element_size: int) -> list[SplitTiles]:
    """The tiles the tuner times for a split product, the default first: per column tile of
    SPLIT_BLOCK_NS that fits the register budget and is not wider than N needs, the fewest K ranges
    for one wave of programs (MIN_STREAMING_PROGRAMS, an H100's SMs) with 4 and with 8 warps, and
    for two waves with 8 (more loads in flight, at the cost of more partials), where a cut of K gives
    them. At most 13."""
    candidates = [default_split_tiles(n, k, element_size)]
    widest = max(64, triton.next_power_of_2(n))
    for block_n in SPLIT_BLOCK_NS:
        if block_n > widest or block_n * 16 > weight_tile_elements(element_size):
            continue
        for programs, warps in ((MIN_STREAMING_PROGRAMS, SPLIT_WARPS), (2 * MIN_STREAMING_PROGRAMS, (8,))):
            for num_warps in warps:
                tiles = fewest_splits(n, k, block_n, element_size, programs, num_warps)
                if tiles.programs(n) >= programs and tiles not in candidates:
                    candidates.append(tiles)
    return candidates


def head_block(head_dim: int) -> int:
    """The power-of-two block (16 at least, for tl.dot) that holds one head."""
    if head_dim < 1 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is outside the supported range 1..{MAX_HEAD_DIM}")
    return max(16, triton.next_power_of_2(head_dim))


def attention_tiles(seq: int, head_dim: int, element_size: int = 2) -> AttentionTiles:
    """Tiles for causal flash attention over `seq` queries per row with heads of `head_dim`.
    Half precision runs both products on tensor cores; wider heads take narrower key blocks so the
    accumulator, scores and operands stay in registers (no spills on sm_80 or sm_90). float32 runs
    tl.dot as exact FMA (input_precision="ieee"), which holds whole operand rows in registers, so
    its tiles are smaller still."""
    block_d = head_block(head_dim)
    if element_size >= 4:
        block_m, block_n = (32, 16) if block_d <= 64 else (16, 32) if block_d <= 128 else (16, 16)
        num_warps = 4
    else:
        block_m, block_n = 64, 64 if block_d <= 64 else 32
        num_warps = 8 if block_d > 128 else 4
    return AttentionTiles(min(block_m, max(16, triton.next_power_of_2(seq))), block_n, block_d, num_warps, num_stages=2)


def decode_tiles(head_dim: int, element_size: int = 2) -> AttentionTiles:
    """Tiles for decode attention: one query row, BLOCK_N cache slots per step, a K or V tile of
    4096 elements at most in half precision (64 slots of a 64-wide head) and 2048 in float32, so
    nothing spills beside the merge of the splits (4096 float32 spilled on sm_80 and, with 8 warps,
    under triton 3.6 on sm_90)."""
    block_d = head_block(head_dim)
    elements = 2048 if element_size >= 4 else 4096
    return AttentionTiles(1, max(16, min(64, elements // block_d)), block_d, num_warps=4, num_stages=2)


def decode_splits(batch_heads: int, slots: int, block_n: int) -> int:
    """How many parts each row's context is split into for decode attention. Depends only on the
    static cache size, never on the lengths, so one captured graph serves every step."""
    most = triton.cdiv(slots, block_n)
    wanted = triton.cdiv(DECODE_TARGET_PROGRAMS, batch_heads)
    return max(1, min(most, wanted))
