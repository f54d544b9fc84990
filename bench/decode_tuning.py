"""The decode tiles measured on a GPU: every candidate of every decode product timed, the fastest
written into the committed tuning table (kernels/decode_tuning.json).

For each GPT-2 size and each half-precision dtype, each distinct split product of a decode step
(c_attn [C, 3C], attention's c_proj [C, C], the MLP's c_fc [C, I] and projection [I, C], the LM head
[C, V] as wte.T) is timed in float16 at batch 1 with every tile candidate (kernels/tiling.py:
split_candidates); its default and winner also in bfloat16, and in float16 at batch 16, for the report. The
table's key has no batch (a row's result must not depend on what shares its batch) and no dtype but
its element size: float16 and bfloat16 share an entry, chosen on float16 (the same bytes through the
same tiles; each new configuration costs a compile, the tune step's main cost). The MLP's two products are one
kernel whose warps are c_fc's: c_fc is chosen with the projection at its default, then the
projection with c_fc's winner, among projection candidates that differ in more than their warps.
A candidate replaces the default only when faster by more than the spread of the two timings.

The timer is an argument (`Timer`), so the selection, the table and the report are tested on the
CPU; `launch_timer` is the real one.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tritongpt2.kernels.tiling import (
    SplitTiles, default_split_tiles, forcing_split_tiles, split_candidates, tile_entry, tuning_key,
)

from .launch_timing import Timing
from .model_shapes import ModelShape

TUNED_DTYPES = (torch.float16, torch.bfloat16)
REPORT_BATCHES = (1, 16)


@dataclass(frozen=True)
class Product:
    """One split product of a decode step: [m, k] @ [k, n]."""

    name: str  # c_attn, attn_proj, mlp_fc, mlp_proj, lm_head
    n: int
    k: int

    def key(self, element_size: int) -> str:
        return tuning_key(self.n, self.k, element_size)

    def launch_bytes(self, element_size: int) -> int:
        """The weights the launch computing it streams: the MLP's launch computes both of its products."""
        return (2 if self.name.startswith("mlp_") else 1) * self.n * self.k * element_size


def decode_products(shape: ModelShape) -> list[Product]:
    c, inner = shape.n_embd, shape.n_inner
    return [Product("c_attn", 3 * c, c), Product("attn_proj", c, c), Product("mlp_fc", inner, c),
            Product("mlp_proj", c, inner), Product("lm_head", shape.vocab_size, c)]


# timer(shape, product, forced tiles by tuning key, dtype, batch): the time of the launch that
# computes `product` in a decode step of `batch` rows with those tiles forced.
Timer = Callable[[ModelShape, Product, dict[str, SplitTiles], torch.dtype, int], Timing]


@dataclass
class ProductTuning:
    model: str
    product: Product
    element_size: int
    default: SplitTiles
    winner: SplitTiles | None = None
    # per candidate, per dtype name, per batch: its timing
    timings: dict[SplitTiles, dict[str, dict[int, Timing]]] = field(default_factory=dict)

    def gb_s(self, tiles: SplitTiles, dtype: str, batch: int = 1) -> float:
        """The launch's weight bytes over its time."""
        return self.product.launch_bytes(self.element_size) / self.timings[tiles][dtype][batch].median_us / 1e3


def choose(default: SplitTiles, timings: dict[SplitTiles, Timing]) -> SplitTiles:
    """The fastest candidate, unless the default is within the spread of the two timings (noise)."""
    fastest = min(timings, key=lambda tiles: timings[tiles].median_us)
    margin = timings[fastest].spread_us + timings[default].spread_us
    return fastest if timings[default].median_us - timings[fastest].median_us > margin else default


def _distinct_in_the_mlp(candidates: list[SplitTiles]) -> list[SplitTiles]:
    """The projection's candidates that launch differently inside the MLP kernel (its warps and stages
    are c_fc's), the first of each kind kept: the default comes first."""
    seen, kept = set(), []
    for tiles in candidates:
        launched = (tiles.block_n, tiles.block_k, tiles.k_per_split, tiles.splits)
        if launched not in seen:
            seen.add(launched)
            kept.append(tiles)
    return kept


def tune_product(shape: ModelShape, product: Product, element_size: int, timer: Timer,
                 fixed: dict[str, SplitTiles], dtypes: tuple[torch.dtype, ...] = TUNED_DTYPES,
                 excluded: frozenset[str] = frozenset()) -> ProductTuning:
    """Time every candidate of `product` in dtypes[0] at batch 1 with `fixed` tiles for the others,
    choose, and time the default and the winner in the other dtypes at batch 1 and in dtypes[0] at
    the other report batches. Candidates named in `excluded` (failed_candidates) are not timed, and
    not chosen. The default is always timed; when it is excluded itself, the fastest candidate that
    is not wins however close (a table entry is then what keeps the failing tiles from launching)."""
    from .compile_audit import candidate_label

    default = default_split_tiles(product.n, product.k, element_size)
    key = product.key(element_size)
    candidates = split_candidates(product.n, product.k, element_size)
    if product.name == "mlp_proj":
        candidates = _distinct_in_the_mlp(candidates)
    selectable = [tiles for tiles in candidates if candidate_label(shape.name, key, tiles) not in excluded]
    tuning = ProductTuning(shape.name, product, element_size, default)

    def measure(tiles: SplitTiles, dtype: torch.dtype, batch: int) -> Timing:
        per_batch = tuning.timings.setdefault(tiles, {}).setdefault(str(dtype).removeprefix("torch."), {})
        per_batch[batch] = timer(shape, product, {**fixed, key: tiles}, dtype, batch)
        return per_batch[batch]

    timings = {tiles: measure(tiles, dtypes[0], 1) for tiles in dict.fromkeys([default, *selectable])}
    if default in selectable or not selectable:
        tuning.winner = choose(default, timings)
    else:
        tuning.winner = min(selectable, key=lambda tiles: timings[tiles].median_us)
    reported = [(dtype, 1) for dtype in dtypes[1:]] + [(dtypes[0], batch) for batch in REPORT_BATCHES[1:]]
    for tiles in dict.fromkeys((default, tuning.winner)):
        for dtype, batch in reported:
            measure(tiles, dtype, batch)
    return tuning


def failed_candidates(audits: list[dict]) -> frozenset[str]:
    """The candidates (compile_audit.candidate_label) that launch a configuration with a problem in
    any of these candidate audits (tritongpt2 audit compile --candidates --json): not selectable."""
    from .compile_audit import CompileResult

    fields = ("kernel", "config", "arch", "dtype", "used_by", "num_warps", "registers", "spill_bytes", "shared_bytes", "error")
    failed = set()
    for audit in audits:
        for row in audit["results"]:
            if CompileResult(**{name: row[name] for name in fields}).problems():
                failed.update(row["used_by"])
    return frozenset(failed)


def tune_model(shape: ModelShape, timer: Timer, dtypes: tuple[torch.dtype, ...] = TUNED_DTYPES,
               excluded: frozenset[str] = frozenset()) -> list[ProductTuning]:
    element_size = dtypes[0].itemsize
    if any(dtype.itemsize != element_size for dtype in dtypes):
        raise ValueError(f"dtypes {dtypes} share table entries only at one element size")
    products = {p.name: p for p in decode_products(shape)}
    proj_default = default_split_tiles(products["mlp_proj"].n, products["mlp_proj"].k, element_size)
    results = [tune_product(shape, products[name], element_size, timer, {}, dtypes, excluded)
               for name in ("c_attn", "attn_proj", "lm_head")]
    fc = tune_product(shape, products["mlp_fc"], element_size, timer,
                      {products["mlp_proj"].key(element_size): proj_default}, dtypes, excluded)
    proj = tune_product(shape, products["mlp_proj"], element_size, timer,
                        {products["mlp_fc"].key(element_size): fc.winner}, dtypes, excluded)
    return results + [fc, proj]


def table_document(tunings: list[ProductTuning], device: str, versions: dict[str, str]) -> dict:
    """The tuning table: each product's winner with what it measured (the default's entry too, so the
    table says the default was measured and kept)."""
    entries = {}
    for t in sorted(tunings, key=lambda t: (t.product.n, t.product.k)):
        per_dtype = {dtype: {"us": round(per_batch[1].median_us, 3), "gb_s": round(t.gb_s(t.winner, dtype), 1)}
                     for dtype, per_batch in t.timings[t.winner].items()}
        default_us = {dtype: round(per_batch[1].median_us, 3) for dtype, per_batch in t.timings[t.default].items()}
        entries[t.product.key(t.element_size)] = tile_entry(t.winner) | {
            "measured": {"model": t.model, "product": t.product.name, "batch": 1, **per_dtype, "default_us": default_us}}
    return {
        "about": "Split-K tiles for products of at most 16 rows (decode), keyed NxK:element_size. Written by "
                 "bench/gpu.sh (tritongpt2 tune) from timings on a GPU; shapes missing here take "
                 "kernels/tiling.py's default_split_tiles.",
        "device": device,
        "versions": versions,
        "linear": entries,
    }


def _tiles_label(tiles: SplitTiles) -> str:
    return f"{tiles.block_n}x{tiles.block_k}, {tiles.splits} splits, {tiles.num_warps} warps, {tiles.num_stages} stages"


def report_rows(tunings: list[ProductTuning]) -> list[dict]:
    rows = []
    for t in tunings:
        for tiles, per_dtype in t.timings.items():
            for dtype, per_batch in per_dtype.items():
                for batch, timing in sorted(per_batch.items()):
                    rows.append({
                        "model": t.model, "product": t.product.name, "n": t.product.n, "k": t.product.k, "dtype": dtype,
                        "batch": batch, **tile_entry(tiles), "programs": tiles.programs(t.product.n),
                        "us": round(timing.median_us, 3), "spread_us": round(timing.spread_us, 3),
                        "gb_s": round(t.gb_s(tiles, dtype, batch), 1), "default": tiles == t.default,
                        "chosen": tiles == t.winner,
                    })
    return rows


def report_markdown(rows: list[dict], device: str) -> str:
    lines = [f"Decode tile candidates on {device}: microseconds per launch (from a CUDA graph, weights from DRAM) "
             "and the weights' GB/s. mlp_fc and mlp_proj rows time the whole MLP launch (both weights) with the "
             "other product's tiles fixed. **chosen** is written into kernels/decode_tuning.json.", "",
             "| model | product | N x K | dtype | batch | tiles | programs | us (spread) | GB/s | |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tiles = SplitTiles(r["block_n"], r["block_k"], 0, r["splits"], r["num_warps"], r["num_stages"])
        mark = " ".join(word for word, on in (("**chosen**", r["chosen"]), ("default", r["default"])) if on)
        lines.append(f"| {r['model']} | {r['product']} | {r['n']} x {r['k']} | {r['dtype']} | {r['batch']} | {_tiles_label(tiles)} "
                     f"| {r['programs']} | {r['us']} ({r['spread_us']}) | {r['gb_s']} | {mark} |")
    return "\n".join(lines) + "\n"


def write_tuning(tunings: list[ProductTuning], device: str, versions: dict[str, str], table: Path, output: Path) -> list[Path]:
    """The table into `table` (the checkout's) and a copy with the report into `output`."""
    document = json.dumps(table_document(tunings, device, versions), indent=1) + "\n"
    rows = report_rows(tunings)
    output.mkdir(parents=True, exist_ok=True)
    written = [table, output / "decode_tuning.json", output / "decode-tuning-report.json", output / "decode-tuning-report.md"]
    table.write_text(document)
    written[1].write_text(document)
    written[2].write_text(json.dumps({"device": device, "versions": versions, "results": rows}, indent=1) + "\n")
    written[3].write_text(report_markdown(rows, device))
    return written


def launch_timer(rounds: int = 5, *, backend: str = "triton", device: str = "cuda",
                 time: Callable[..., Timing] | None = None) -> Timer:
    """Times the launch computing a product in a real decode step (a one-layer model, its engine run
    eagerly with the tiles forced), replayed alone on the GPU (bench/launch_timing.py: `time`).
    The tests run it on the interpreter with a fake `time`."""
    from tritongpt2.engine.config import GPT2Config
    from tritongpt2.engine.engine import Engine
    from tritongpt2.engine.options import EngineOptions
    from tritongpt2.engine.weights import shared_weights
    from tritongpt2.kernels.launch import LaunchRecord, observing_launches

    from .launch_timing import time_launch
    from .suite import build_model

    time = time or time_launch

    engines: dict[tuple[str, torch.dtype, int], tuple[Engine, torch.Tensor]] = {}

    def engine_for(shape: ModelShape, dtype: torch.dtype, batch: int) -> tuple[Engine, torch.Tensor]:
        if (shape.name, dtype, batch) not in engines:
            if any(name != shape.name for name, _, _ in engines):
                engines.clear()  # one model's engines at a time on the GPU
            model = build_model(ModelShape(shape.name, shape.n_embd, shape.n_head, 1, shape.vocab_size, shape.n_positions),
                                dtype, torch.device(device))
            config = GPT2Config.from_dict(model.config.to_dict())
            # Room for a decode step per timing after the prompt's 8 tokens.
            options = EngineOptions(backend=backend, cuda_graphs=False, max_batch=batch, max_seq=shape.n_positions)
            engine = Engine(config, shared_weights(model, config), options)
            ids = torch.randint(0, shape.vocab_size, (batch, 8), device=device)
            engine.prefill(ids, logits=None)
            engines[(shape.name, dtype, batch)] = (engine, ids[:, -1])
        return engines[(shape.name, dtype, batch)]

    def timer(shape: ModelShape, product: Product, forced: dict[str, SplitTiles], dtype: torch.dtype, batch: int) -> Timing:
        engine, tokens = engine_for(shape, dtype, batch)
        records: list[LaunchRecord] = []

        def observe(record: LaunchRecord) -> nullcontext:
            records.append(record)
            return nullcontext()

        with forcing_split_tiles(forced), observing_launches(observe):
            engine.decode(tokens, check_ids=False)
        return time(product_launch(records, product), rounds=rounds)

    return timer


def product_launch(records: list, product: Product):
    """The launch that computes `product`: the MLP kernel for either of its products, else the split
    product of that N and K."""
    for record in records:
        if product.name.startswith("mlp_") and record.name == "decode_mlp_kernel":
            return record
        if record.name == "split_linear_kernel" and (record.arguments["N"], record.arguments["K"]) == (product.n, product.k):
            return record
    raise ValueError(f"no launch of a decode step computes {product.name} [{product.k}, {product.n}]")
