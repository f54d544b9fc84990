"""The decode tiles' candidates and their tuning, on the CPU: candidates are launchable at every GPT-2
size, the tuner (with a fake timer) keeps the fastest and keeps the default within the noise, the
table it writes is what split_tiles and the launched grid then follow, and a bad entry is refused by
name."""

import json
from dataclasses import replace

import pytest
import torch

from tritongpt2.bench import compile_audit
from tritongpt2.bench.compile_audit import Workload, candidate_jobs, candidate_label, step_launches
from tritongpt2.bench.decode_step_report import launch_label, per_kernel, step_markdown
from tritongpt2.bench.decode_tuning import (
    Product, choose, decode_products, failed_candidates, launch_timer, product_launch, report_markdown, report_rows,
    tune_model, write_tuning,
)
from tritongpt2.bench.launch_timing import Timing, streamed_bytes
from tritongpt2.bench.model_shapes import MODEL_SHAPES, ModelShape
from tritongpt2.kernels import tiling
from tritongpt2.kernels.tiling import (
    MIN_STREAMING_PROGRAMS, checked_tuning_table, default_split_tiles, forcing_split_tiles, split_candidates,
    split_tiles, split_tiles_of, tile_entry, tuning_key, weight_tile_elements,
)

GPT2_SIZES = [MODEL_SHAPES[name] for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")]
GPT2, XL = MODEL_SHAPES["gpt2"], MODEL_SHAPES["gpt2-xl"]
DECODE = Workload("decode", 1, 1, 1024)


@pytest.fixture
def table_at(monkeypatch, tmp_path):
    """table_at(document): split_tiles reads this tuning table (a file, through tuning_table())."""

    def use(document: dict):
        path = tmp_path / "decode_tuning.json"
        path.write_text(json.dumps(document))
        monkeypatch.setattr(tiling, "TUNING_TABLE", path)
        tiling.tuning_table.cache_clear()
        return path

    yield use
    tiling.tuning_table.cache_clear()


def powers_of_two_from_16(value: int) -> bool:
    return value >= 16 and value & (value - 1) == 0


@pytest.mark.parametrize("shape", GPT2_SIZES, ids=lambda s: s.name)
@pytest.mark.parametrize("element_size", [2, 4])
def test_candidates_are_launchable_and_include_the_default(shape, element_size):
    for product in decode_products(shape):
        n, k = product.n, product.k
        candidates = split_candidates(n, k, element_size)
        assert candidates[0] == default_split_tiles(n, k, element_size)
        assert 2 <= len(candidates) <= 13 and len(set(candidates)) == len(candidates), (product, candidates)
        for tiles in candidates:
            assert powers_of_two_from_16(tiles.block_n) and powers_of_two_from_16(tiles.block_k), tiles
            assert tiles.block_n * tiles.block_k <= weight_tile_elements(element_size), tiles
            assert tiles.k_per_split % tiles.block_k == 0, tiles
            assert (tiles.splits - 1) * tiles.k_per_split < k <= tiles.splits * tiles.k_per_split, tiles
            assert tiles.num_warps in (4, 8) and tiles.num_stages >= 1
        # Every candidate fills the H100's SMs; at these sizes the default does too.
        assert all(tiles.programs(n) >= MIN_STREAMING_PROGRAMS for tiles in candidates), (product, candidates)
        assert any(tiles.programs(n) >= 2 * MIN_STREAMING_PROGRAMS for tiles in candidates), product
        # Each is an entry the table accepts.
        entries = {tuning_key(n, k, element_size): tile_entry(tiles) for tiles in candidates[:1]}
        assert checked_tuning_table({"linear": entries}, "test") == entries
        for tiles in candidates:
            checked_tuning_table({"linear": {tuning_key(n, k, element_size): tile_entry(tiles)}}, "test")


def test_a_product_too_small_to_fill_the_gpu_keeps_only_what_fills_it_best():
    candidates = split_candidates(40, 72, 2)
    assert candidates[0] == default_split_tiles(40, 72, 2)
    assert all(c.programs(40) >= MIN_STREAMING_PROGRAMS for c in candidates[1:])


def fake_timer(fast: dict[str, tuple], calls: list | None = None):
    """Every launch takes 10 us (spread 0.5) but those whose forced tiles for the product's key have
    the (block_n, block_k, splits, num_warps) of fast[product name]: 6 us."""

    def timer(shape, product: Product, forced, dtype, batch) -> Timing:
        tiles = forced[product.key(dtype.itemsize)]
        if calls is not None:
            calls.append((shape.name, product.name, dict(forced), dtype, batch))
        wanted = fast.get(product.name)
        hit = wanted is not None and (tiles.block_n, tiles.block_k, tiles.splits, tiles.num_warps) == wanted
        return Timing(6.0 if hit else 10.0, 0.5)

    return timer


def _as_fast(tiles) -> tuple:
    return tiles.block_n, tiles.block_k, tiles.splits, tiles.num_warps


def test_the_tuner_keeps_the_fastest_candidate_and_the_default_on_a_tie():
    products = {p.name: p for p in decode_products(GPT2)}
    c_attn = split_candidates(products["c_attn"].n, products["c_attn"].k, 2)[3]
    fc = split_candidates(products["mlp_fc"].n, products["mlp_fc"].k, 2)[5]
    calls = []
    tunings = {t.product.name: t for t in tune_model(GPT2, fake_timer({"c_attn": _as_fast(c_attn), "mlp_fc": _as_fast(fc)}, calls))}
    assert tunings["c_attn"].winner == c_attn
    assert tunings["mlp_fc"].winner == fc
    for name in ("attn_proj", "mlp_proj", "lm_head"):  # every candidate took 10 us: the default stays
        assert tunings[name].winner == tunings[name].default
    # Candidates are timed in float16 at batch 1; the default and winner in bfloat16 too, and at batch 16.
    c_attn_calls = [c for c in calls if c[1] == "c_attn"]
    candidates = split_candidates(products["c_attn"].n, products["c_attn"].k, 2)
    assert len(c_attn_calls) == len(candidates) + 2 * 2
    assert {(d, b) for *_, d, b in c_attn_calls} == {(torch.float16, 1), (torch.bfloat16, 1), (torch.float16, 16)}
    # The projection is timed with c_fc's winner; c_fc with the projection's default.
    fc_key, proj_key = products["mlp_fc"].key(2), products["mlp_proj"].key(2)
    assert all(c[2][fc_key] == fc for c in calls if c[1] == "mlp_proj")
    assert all(c[2][proj_key] == tunings["mlp_proj"].default for c in calls if c[1] == "mlp_fc")


def test_a_candidate_within_the_spread_does_not_replace_the_default():
    default, other, third = split_candidates(768, 768, 2)[:3]
    assert choose(default, {default: Timing(10.0, 1.0), other: Timing(9.0, 0.5)}) == default
    assert choose(default, {default: Timing(10.0, 0.2), other: Timing(9.0, 0.2), third: Timing(9.5, 0.1)}) == other


def test_mlp_projection_candidates_differing_only_in_warps_are_timed_once():
    calls = []
    tune_model(GPT2, fake_timer({}, calls))
    proj = next(p for p in decode_products(GPT2) if p.name == "mlp_proj")
    timed = [c[2][proj.key(2)] for c in calls if c[1] == "mlp_proj" and c[4] == 1 and c[3] == torch.float16]
    launched = [(t.block_n, t.block_k, t.splits) for t in timed]
    assert len(launched) == len(set(launched))
    assert {(t.block_n, t.block_k, t.splits) for t in split_candidates(proj.n, proj.k, 2)} == set(launched)


def test_the_written_table_is_what_split_tiles_and_the_launches_follow(tmp_path, table_at):
    products = {p.name: p for p in decode_products(GPT2)}
    c_attn = products["c_attn"]
    default = default_split_tiles(c_attn.n, c_attn.k, 2)
    wanted = next(c for c in split_candidates(c_attn.n, c_attn.k, 2) if c.programs(c_attn.n) != default.programs(c_attn.n))
    tunings = tune_model(GPT2, fake_timer({"c_attn": _as_fast(wanted)}))
    table = tmp_path / "table.json"
    written = write_tuning(tunings, "a GPU", {"torch": "x"}, table, tmp_path / "out")
    document = json.loads(table.read_text())
    assert document["device"] == "a GPU" and document["versions"] == {"torch": "x"}
    assert json.loads(written[1].read_text()) == document
    entry = document["linear"][c_attn.key(2)]
    assert entry["measured"]["float16"]["us"] == 6.0 and entry["measured"]["default_us"]["float16"] == 10.0
    assert entry["measured"]["float16"]["gb_s"] == round(c_attn.n * c_attn.k * 2 / 6.0 / 1e3, 1)
    assert set(document["linear"]) == {p.key(2) for p in products.values()}

    with forcing_split_tiles({c_attn.key(2): default}):
        before = [r for r in step_launches(GPT2, torch.float16, DECODE) if r.name == "split_linear_kernel" and r.arguments["QKV"]]
    table_at(document)
    assert split_tiles(c_attn.n, c_attn.k, 2) == wanted
    assert split_tiles(c_attn.n, c_attn.k, 4) == default_split_tiles(c_attn.n, c_attn.k, 4)  # float32: not tuned
    after = [r for r in step_launches(GPT2, torch.float16, DECODE) if r.name == "split_linear_kernel" and r.arguments["QKV"]]
    assert before[0].grid != after[0].grid
    assert after[0].grid == (wanted.programs(c_attn.n),)
    assert (after[0].arguments["BLOCK_N"], after[0].arguments["BLOCK_K"], after[0].num_warps) == (
        wanted.block_n, wanted.block_k, wanted.num_warps)
    assert (after[0].arguments["k_per_split"], after[0].arguments["n_splits"]) == (wanted.k_per_split, wanted.splits)


def test_the_report_has_every_candidate_and_marks_the_choice(tmp_path):
    tunings = tune_model(XL, fake_timer({}))
    rows = report_rows(tunings)
    for t in tunings:
        batch_one = [r for r in rows if r["product"] == t.product.name and r["batch"] == 1 and r["dtype"] == "float16"]
        assert len(batch_one) == len(t.timings)
        assert sum(r["chosen"] for r in batch_one) == 1 and sum(r["default"] for r in batch_one) == 1
    mlp = next(r for r in rows if r["product"] == "mlp_fc")
    assert mlp["gb_s"] == round(2 * XL.n_embd * XL.n_inner * 2 / 10.0 / 1e3, 1), "the MLP launch streams both weights"
    text = report_markdown(rows, "a GPU")
    assert text.count("\n| gpt2-xl |") == len(rows) and "**chosen** default" in text


@pytest.mark.parametrize("change, message", [
    ({"block_n": 48}, "block_n 48 must be a power of two"),
    ({"block_k": 8}, "block_k 8 must be a power of two"),
    ({"block_n": 256, "block_k": 64}, "exceeds the register budget"),
    ({"splits": 0}, "splits and num_stages must be at least 1"),
    ({"num_warps": 3}, "num_warps 3"),
    ({"block_n": "64"}, "needs integer"),
    ({"colour": 1}, "unknown: ['colour']"),
])
def test_a_malformed_entry_is_refused_naming_its_key(table_at, change, message):
    key = tuning_key(2304, 768, 2)
    entry = tile_entry(default_split_tiles(2304, 768, 2)) | change
    path = table_at({"about": "", "device": None, "linear": {key: entry}})
    with pytest.raises(ValueError, match="2304x768:2") as error:
        split_tiles(2304, 768, 2)
    assert message in str(error.value) and str(path) in str(error.value)


def test_a_malformed_key_or_missing_field_is_refused(table_at):
    entry = tile_entry(default_split_tiles(768, 768, 2))
    table_at({"linear": {"768by768": entry}})
    with pytest.raises(ValueError, match="'768by768' is not NxK:element_size"):
        split_tiles(768, 768, 2)
    table_at({"linear": {"768x768:2": {k: v for k, v in entry.items() if k != "splits"}}})
    with pytest.raises(ValueError, match="'768x768:2'.*missing: \\['splits'\\]"):
        split_tiles(768, 768, 2)


def test_the_committed_table_loads():
    tiling.tuning_table.cache_clear()
    assert isinstance(tiling.tuning_table(), dict)


def test_forced_tiles_hold_only_inside_the_block():
    forced = split_candidates(768, 768, 2)[2]
    with forcing_split_tiles({tuning_key(768, 768, 2): forced}):
        assert split_tiles(768, 768, 2) == forced
        assert split_tiles(768, 3072, 2) == default_split_tiles(768, 3072, 2)
    assert split_tiles(768, 768, 2) != forced


def test_the_candidate_audit_names_every_candidate_of_every_product(monkeypatch):
    # compile_job reads what the JIT specializes, which the interpreter's kernels do not say: a launch
    # stands for its configuration here.
    monkeypatch.setattr(compile_audit, "compile_job", lambda record: (record.name, record.grid, record.num_warps))
    jobs = candidate_jobs([GPT2], ["float16"])
    labels = {label for used_by in jobs.values() for label in used_by}
    expected = {candidate_label("gpt2", p.key(2), tiles) for p in decode_products(GPT2) for tiles in split_candidates(p.n, p.k, 2)}
    assert labels == expected
    mlp_keys = {p.key(2) for p in decode_products(GPT2) if p.name.startswith("mlp_")}
    for (_, (kernel, _, _)), used_by in jobs.items():  # a label names the product whose launch it is
        for label in used_by:
            assert kernel == ("decode_mlp_kernel" if label.split()[2] in mlp_keys else "split_linear_kernel"), label


def test_candidates_that_fail_the_audit_are_not_timed():
    c_attn = decode_products(GPT2)[0]
    default, *others = split_candidates(c_attn.n, c_attn.k, 2)
    bad, fine = others[0], others[1]
    row = {"kernel": "split_linear_kernel", "config": "BLOCK_N=32", "arch": "sm_90", "dtype": "float16", "num_warps": 4,
           "registers": 56, "spill_bytes": 0, "shared_bytes": 0, "error": None}
    audits = [{"results": [
        row | {"spill_bytes": 8, "used_by": [candidate_label("gpt2", c_attn.key(2), bad)]},
        row | {"used_by": [candidate_label("gpt2", c_attn.key(2), fine)]},
        row | {"error": "boom", "registers": None, "used_by": [candidate_label("gpt2", c_attn.key(2), default)]},
    ]}]
    excluded = failed_candidates(audits)
    assert excluded == {candidate_label("gpt2", c_attn.key(2), t) for t in (bad, default)}
    calls = []
    [tuning, *_] = tune_model(GPT2, fake_timer({"c_attn": _as_fast(bad)}, calls), excluded=excluded - {candidate_label(
        "gpt2", c_attn.key(2), default)})
    timed = {c[2][c_attn.key(2)] for c in calls if c[1] == "c_attn"}
    assert bad not in timed and fine in timed and default in timed
    assert tuning.winner == default, "the fastest candidate failed the audit; the rest tie with the default"
    # A default that fails the audit is timed (for the report) but never chosen, even on a tie.
    [tuning, *_] = tune_model(GPT2, fake_timer({}), excluded=excluded)
    assert default in tuning.timings and tuning.winner not in (default, bad)


def test_per_kernel_rows_count_the_streamed_bytes_of_each_launch():
    shape = replace(GPT2, n_layer=2)
    records = step_launches(shape, torch.float16, DECODE)
    labels = [launch_label(r) for r in records]
    c = GPT2.n_embd
    assert f"split_linear_kernel [{c} x {3 * c}]" in labels and f"split_linear_kernel [{c} x {GPT2.vocab_size}]" in labels
    rows = {r["kernel"]: r for r in per_kernel(records, time=lambda record: Timing(2.0, 0.1))}
    assert rows[f"split_linear_kernel [{c} x {3 * c}]"]["bytes"] == 3 * c * c * 2
    assert rows["decode_mlp_kernel"]["bytes"] == 8 * c * c * 2
    assert rows["decode_attention_kernel"]["bytes"] == 2 * GPT2.n_head * 1024 * GPT2.head_dim * 2
    assert rows["decode_mlp_kernel"]["gb_s"] == round(8 * c * c * 2 / 2.0 / 1e3, 1)
    assert all(r["gb_s"] is None and r["us"] is None for r in rows.values() if r["bytes"] is None)
    assert sum(r["launches"] for r in rows.values()) == len(records)
    assert streamed_bytes(next(r for r in records if r.name == "embedding_kernel")) is None
    report = {"model": "gpt2", "dtype": "float16", "context": 1024, "kernels": list(rows.values()), "kernel_ms_sum": 0.1,
              "ms_per_token": {"hf-compile-static": {"median_ms": 2.0, "spread_ms": [1.9, 2.1]}}}
    text = step_markdown(report, "a GPU")
    assert "| hf-compile-static | 2.0 (1.9-2.1) |" in text and "| embedding_kernel | 1 |" in text and "not timed" in text


def test_the_timer_times_the_launch_that_computes_each_product():
    records = step_launches(XL, torch.float16, DECODE)
    for product in decode_products(XL):
        record = product_launch(records, product)
        if product.name.startswith("mlp_"):
            assert record.name == "decode_mlp_kernel"
        else:
            assert record.name == "split_linear_kernel"
            assert (record.arguments["K"], record.arguments["N"]) == (product.k, product.n)
    with pytest.raises(ValueError, match="no launch of a decode step computes c_attn"):
        product_launch([r for r in records if r.name != "split_linear_kernel"], decode_products(XL)[0])


def test_the_launch_timer_times_a_real_step_with_the_forced_tiles():
    # A tiny model on the interpreter; `time` receives the launch the GPU would replay.
    shape = ModelShape("tiny", 64, 4, 2, vocab_size=512, n_positions=64)
    timed = []

    def time(record, rounds):
        timed.append(record)
        return Timing(float(len(timed)), 0.0)

    timer = launch_timer(rounds=3, backend="interpret", device="cpu", time=time)
    products = {p.name: p for p in decode_products(shape)}
    # Not the defaults (64 columns, one split, 8 warps): what is launched follows what is forced.
    forced = {products["c_attn"].key(4): split_tiles_of(192, 64, 32, 16, 2, num_warps=4, num_stages=2),
              products["mlp_fc"].key(4): split_tiles_of(256, 64, 16, 16, 3, num_warps=4, num_stages=2)}
    for name in ("c_attn", "mlp_fc", "lm_head"):
        assert timer(shape, products[name], forced, torch.float32, 2) == Timing(float(len(timed)), 0.0)
    c_attn, mlp, head = timed
    assert (c_attn.name, c_attn.arguments["BLOCK_N"], c_attn.arguments["n_splits"], c_attn.grid) == (
        "split_linear_kernel", forced[products["c_attn"].key(4)].block_n, forced[products["c_attn"].key(4)].splits,
        (forced[products["c_attn"].key(4)].programs(192),))
    assert mlp.name == "decode_mlp_kernel" and mlp.arguments["FC_BLOCK_N"] == forced[products["mlp_fc"].key(4)].block_n
    assert mlp.num_warps == forced[products["mlp_fc"].key(4)].num_warps
    assert (head.arguments["N"], head.arguments["K"]) == (512, 64) and head.arguments["M"] == 2
