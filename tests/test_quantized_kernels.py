"""Weight-only quantized products in the Triton kernels, dequantized tile by tile in registers: every
format (int8, int4 in groups of 32, 64 and 128, nf4, nf4 with double quantization) on every path (the
split-K product of a few rows, the tiled product, the fused decode MLP, c_attn with its cache writes,
the LM head with ln_f, the embedding gathering from the tied head) against the reference's
quantize-then-dequantize, and bad QuantizedWeights refused by name."""

from dataclasses import replace

import pytest
import torch

from numerics import DEVICE, OPS, as_float64, assert_close, poisoned, poisoned_allocations, randn
from test_embedding import cache_state, ids
from test_linear import access, assert_moments_describe, layer_norm_params, qkv_case, residual_stream, stream
from tritongpt2.engine.quantize import VARIANTS, quantize_matrix
from tritongpt2.kernels import reference
from tritongpt2.kernels import launch as launch_module
from tritongpt2.kernels.launch import launch, recording_launches
from tritongpt2.kernels.linear import weight_label
from tritongpt2.kernels.tiling import (
    MIN_STREAMING_PROGRAMS, NF4_PART_TILE_REGISTERS, WIDE_GROUP_TILE_REGISTERS, forcing_split_tiles, quantized_register_cap, quantized_split_tiles,
    quantized_tuning_key, split_tiles_of, weight_tile_elements,
)

# The interpreter's bfloat16 tl.dot is wrong: float32 and float16 activations only.
DTYPES = [torch.float32, torch.float16]
FORMATS = VARIANTS
# K a multiple of every group; N, the vocabulary and the rows not multiples of any block.
K, N, VOCAB, INNER = 128, 40, 75, 256


def quantized(k: int, n: int, name: str) -> object:
    return quantize_matrix(randn(k, n, dtype=torch.float32, scale=k**-0.5), FORMATS[name])


def semaphores() -> torch.Tensor:
    return torch.zeros(64, dtype=torch.int32, device=DEVICE)


def forced_splits(weight, n: int, k: int, dtype: torch.dtype, splits: int) -> dict:
    """Tiles that cut K into `splits` ranges of the weight's group (32 for int8) for forcing_split_tiles."""
    block_k = 32 if weight.bits == 8 else weight.group_size
    tiles = split_tiles_of(n, k, 64, block_k, splits, num_warps=4, num_stages=2)
    return {quantized_tuning_key(n, k, dtype.itemsize, weight_label(weight)): tiles}


def expected_register_cap(weight, rows: int, dtype: torch.dtype, in_parts: bool = False) -> int | None:
    """Split products are capped under older triton, nf4's dequantizing in parts under every triton
    (ptxas 12.9 spilled one uncapped); of the tiled ones only groups of 128, float32's under every triton."""
    if rows <= 16:
        nf4 = weight_label(weight).startswith("nf4")
        return NF4_PART_TILE_REGISTERS if in_parts and nf4 else quantized_register_cap("split")
    if weight.bits == 8 or weight.group_size < 128:
        return None
    return WIDE_GROUP_TILE_REGISTERS if dtype == torch.float32 else quantized_register_cap("tiled")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,splits", [(1, 2), (5, 4), (24, 1)])
@pytest.mark.parametrize("name", FORMATS)
def test_products_match_the_reference(name, rows, splits, dtype):
    w, h = quantized(K, N, name), randn(rows, K, dtype=dtype)
    if splits > 1 and splits * (32 if w.bits == 8 else w.group_size) > K:
        pytest.skip("K has fewer groups than splits")
    x, residual = residual_stream(rows, K, dtype), randn(rows, N, dtype=dtype)
    ln_w, ln_b = layer_norm_params(K, dtype)
    b = randn(N, dtype=dtype)
    counters = semaphores()
    with forcing_split_tiles(forced_splits(w, N, K, dtype, splits)), poisoned_allocations():
        with recording_launches() as records:
            OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, w, b, "gelu_new", semaphores=counters)
        out = OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, w, b, "gelu_new", semaphores=counters)
        summed = OPS.linear_residual(h, w, b, stream(residual), semaphores=counters)
    assert records[0].name == ("split_linear_kernel" if rows <= 16 else "linear_kernel")
    assert records[0].max_registers == expected_register_cap(w, rows, dtype)
    assert records[0].arguments["n_splits" if rows <= 16 else "M"] == (splits if rows <= 16 else rows)
    assert_close(out, reference.ln_linear(*as_float64(x, ln_w, ln_b), 1e-5, w, b.double(), "gelu_new"),
                 reference.ln_linear(x, ln_w, ln_b, 1e-5, w, b, "gelu_new"))
    assert_close(summed.values, reference.linear_residual(h.double(), w, b.double(), residual.double()),
                 reference.linear_residual(h, w, b, residual))
    assert_moments_describe(summed.moments, summed.values)
    assert not counters.any(), "every column tile's last program resets its counter"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 20])
@pytest.mark.parametrize("name", FORMATS)
def test_the_lm_head_with_ln_f(name, rows, dtype):
    head = quantize_matrix(randn(VOCAB, K, dtype=torch.float32).T, FORMATS[name])  # wte.T, [C, vocab]
    x = residual_stream(rows, K, dtype)
    ln_w, ln_b = layer_norm_params(K, dtype)
    with poisoned_allocations():
        logits = OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, head)
    assert_close(logits, reference.ln_linear(*as_float64(x, ln_w, ln_b), 1e-5, head),
                 reference.ln_linear(x, ln_w, ln_b, 1e-5, head))


@pytest.mark.parametrize("label,group,block_n,dequant_k", [
    ("int4g32", 32, 256, None), ("int4g64", 64, 256, 32), ("int4g128", 128, 256, 32), ("nf4g64", 64, 128, 32),
    ("nf4dqg64", 64, 128, 32),
])
def test_the_lm_head_takes_wide_tiles_that_dequantize_a_group_in_parts(label, group, block_n, dequant_k):
    # Every LM head program reads the final row and ln_f's parameters: tiles as wide as the float
    # head's (nf4: half the register budget) keep that to one read per 256 (128) columns, and a
    # group wider than the budget's depth is dequantized in parts, its scales still read once.
    for k in (768, 1600) if 1600 % group == 0 else (768,):
        tiles = quantized_split_tiles(50257, k, 2, group, label)
        assert (tiles.block_n, tiles.block_k, tiles.dequant_k, tiles.splits) == (block_n, group, dequant_k, 1)
        assert tiles.programs(50257) >= MIN_STREAMING_PROGRAMS
        share = 2 if label.startswith("nf4") else 1
        assert tiles.block_n * (tiles.dequant_k or tiles.block_k) <= weight_tile_elements(2) // share
        parted_nf4 = share == 2 and dequant_k is not None
        assert tiles.max_registers == (NF4_PART_TILE_REGISTERS if parted_nf4 else quantized_register_cap("split"))
        # float32's budget (2048 elements) leaves a wide tile under 32 rows deep: its head stays narrow, unparted.
        wide = quantized_split_tiles(50257, k, 4, group, label)
        assert wide.dequant_k is None and wide.block_n * wide.block_k <= weight_tile_elements(4) // share


def test_forced_tiles_must_dequantize_whole_parts_of_a_group():
    w = quantized(K, N, "int4g64")
    key = quantized_tuning_key(N, K, 2, weight_label(w))
    for dequant_k in (48, 16, 128):
        tiles = replace(split_tiles_of(N, K, 64, 64, 1, num_warps=4, num_stages=2), dequant_k=dequant_k)
        with forcing_split_tiles({key: tiles}), pytest.raises(ValueError, match=f"dequant_k={dequant_k} must divide"):
            quantized_split_tiles(N, K, 2, 64, weight_label(w))


PARTED_FORMATS = [name for name, variant in FORMATS.items() if variant.format != "int8" and variant.group_size > 32]


def parted(tiles) -> object:
    """The tiles dequantizing a weight's groups 32 rows at a time, as the LM head's wide tiles do."""
    return replace(tiles, dequant_k=32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("name", PARTED_FORMATS)
def test_a_wide_tile_dequantizes_its_group_in_parts(name, rows, dtype):
    # The LM head's wide tiles (default_split_tiles) dequantize a group 32 rows at a time; the
    # vocabulary here is too small to pick them, so they are forced, with 2 K ranges where K has 2 groups.
    head = quantize_matrix(randn(VOCAB, K, dtype=torch.float32).T, FORMATS[name])
    x = residual_stream(rows, K, dtype)
    ln_w, ln_b = layer_norm_params(K, dtype)
    tiles = parted(split_tiles_of(VOCAB, K, 64, head.group_size, 2, num_warps=4, num_stages=2))
    with forcing_split_tiles({quantized_tuning_key(VOCAB, K, dtype.itemsize, weight_label(head)): tiles}):
        with recording_launches() as records:
            OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, head, semaphores=semaphores())
        with poisoned_allocations():
            logits = OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, head, semaphores=semaphores())
    assert records[0].arguments["DEQUANT_K"] == 32 and records[0].arguments["n_splits"] == min(2, K // head.group_size)
    assert records[0].max_registers == expected_register_cap(head, rows, dtype, in_parts=True)
    assert_close(logits, reference.ln_linear(*as_float64(x, ln_w, ln_b), 1e-5, head),
                 reference.ln_linear(x, ln_w, ln_b, 1e-5, head))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,in_parts", [(1, False), (5, False), (1, True)])
@pytest.mark.parametrize("name", FORMATS)
def test_the_decode_mlp_in_one_launch(name, rows, in_parts, dtype):
    if in_parts and name not in PARTED_FORMATS:
        pytest.skip("the format's groups are 32 deep or it has none")
    x = residual_stream(rows, K, dtype)
    ln_w, ln_b = layer_norm_params(K, dtype)
    fc_w, fc_b = quantized(K, INNER, name), randn(INNER, dtype=dtype)
    proj_w, proj_b = quantized(INNER, K, name), randn(K, dtype=dtype)
    counters = semaphores()
    forced = forced_splits(fc_w, INNER, K, dtype, 2) | forced_splits(proj_w, K, INNER, dtype, 2)
    if in_parts:
        forced = {key: parted(tiles) for key, tiles in forced.items()}
    with forcing_split_tiles(forced), poisoned_allocations():
        with recording_launches() as records:
            OPS.mlp(stream(x), ln_w, ln_b, 1e-5, fc_w, fc_b, "gelu_new", proj_w, proj_b, semaphores=counters)
        out = OPS.mlp(stream(x), ln_w, ln_b, 1e-5, fc_w, fc_b, "gelu_new", proj_w, proj_b, semaphores=counters)
    assert [r.name for r in records] == ["decode_mlp_kernel"]
    assert (records[0].arguments["FC_DEQUANT_K"], records[0].arguments["PROJ_DEQUANT_K"]) == ((32, 32) if in_parts else (None, None))
    assert records[0].max_registers == expected_register_cap(fc_w, rows, dtype, in_parts)
    fc_tiles, proj_tiles = forced.values()
    assert (records[0].arguments["fc_splits"], records[0].arguments["proj_splits"]) == (fc_tiles.splits, proj_tiles.splits)
    arguments = (fc_w, fc_b, "gelu_new", proj_w, proj_b)
    exact = reference.mlp(*as_float64(x, ln_w, ln_b), 1e-5, fc_w, fc_b.double(), "gelu_new", proj_w, proj_b.double())
    assert_close(out.values, exact, reference.mlp(x, ln_w, ln_b, 1e-5, *arguments))
    assert_moments_describe(out.moments, out.values)
    assert not counters.any(), "the ticket, the phase counters and every tile's counter are reset"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq", [(2, 1), (2, 12)])
@pytest.mark.parametrize("name", FORMATS)
def test_qkv_writes_q_and_the_cache(name, batch, seq, dtype):
    x, ln_w, ln_b, _, b, cache_slots, cache_shape = qkv_case(batch, seq, 4, 32, 3, 16, dtype)
    w = quantized(K, 3 * K, name)
    k_cache, v_cache = poisoned(*cache_shape, dtype=dtype), poisoned(*cache_shape, dtype=dtype)
    with poisoned_allocations():
        q = OPS.ln_qkv_projection(stream(x), ln_w, ln_b, 1e-5, w, b, k_cache, v_cache, access(OPS, cache_slots, cache_shape))
    k_oracle, v_oracle = (torch.full(cache_shape, float("nan"), dtype=torch.float64, device=DEVICE) for _ in "kv")
    q_oracle = reference.ln_qkv_projection(*as_float64(x, ln_w, ln_b), 1e-5, w, b.double(), k_oracle, v_oracle, cache_slots)
    k_same, v_same = poisoned(*cache_shape, dtype=dtype), poisoned(*cache_shape, dtype=dtype)
    q_same = reference.ln_qkv_projection(x, ln_w, ln_b, 1e-5, w, b, k_same, v_same, cache_slots)
    assert_close(q, q_oracle, q_same)
    written = ~torch.isnan(k_oracle)
    assert torch.equal(~torch.isnan(k_cache), written) and torch.equal(~torch.isnan(v_cache), written)
    assert_close(k_cache[written], k_oracle[written], k_same[written])
    assert_close(v_cache[written], v_oracle[written], v_same[written])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FORMATS)
def test_the_embedding_gathers_from_the_quantized_head(name, dtype):
    # wte rows are the head's columns; the gathered rows are dequantized and rounded to wpe's dtype,
    # as the reference does, so the sums agree to the last bit.
    head = quantize_matrix(randn(VOCAB, K, dtype=torch.float32).T, FORMATS[name])
    wpe = randn(20, K, dtype=dtype)
    tokens, types, positions = ids(VOCAB, 2, 3), ids(VOCAB, 2, 3), ids(20, 2, 3)
    with poisoned_allocations():
        out = OPS.embedding(tokens, positions, head, wpe, types)
    assert torch.equal(out.values, reference.embedding(tokens, positions, head, wpe, types))
    assert_moments_describe(out.moments, out.values)

    state = cache_state(4, 16, 3, seed=7)
    expected = {key: t.clone() for key, t in state.items()}
    tokens, types = ids(VOCAB, 3, 1), ids(VOCAB, 3, 1)
    with poisoned_allocations():
        step, slots = OPS.decode_embedding(tokens, None, head, wpe, types, **state)
    oracle, oracle_slots = reference.decode_embedding(tokens, None, head, wpe, types, **expected)
    assert torch.equal(step.values, oracle) and torch.equal(slots, oracle_slots)
    for key in ("lengths", "next_position", "key_mask"):
        assert torch.equal(state[key], expected[key]), key


@pytest.mark.parametrize("version,caps", [("3.6.0", (128, 255)), ("3.8.1", (128, 255)), ("3.9.0", (None, None)),
                                          ("3.10.2", (None, None))])
def test_only_older_ptxas_gets_a_register_cap_for_quantized_products(version, caps):
    assert (quantized_register_cap("split", version), quantized_register_cap("tiled", version)) == caps


def test_a_register_cap_reaches_the_kernel_as_maxnreg(monkeypatch):
    monkeypatch.setattr(launch_module, "_interpreter_checked", True)
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda **options: launched.append((grid, options))

    launch(Kernel(), (3,), num_warps=8, num_stages=4, max_registers=128, x=1)
    launch(Kernel(), (3,), num_warps=8, num_stages=4, x=1)
    assert launched == [((3,), dict(x=1, num_warps=8, num_stages=4, maxnreg=128)), ((3,), dict(x=1, num_warps=8, num_stages=4))]


def test_bad_quantized_weights_are_refused_by_name():
    x, h = residual_stream(3, K, torch.float16), randn(3, K, dtype=torch.float16)
    ln_w, ln_b = layer_norm_params(K, torch.float16)
    w, b = quantized(K, N, "int4g64"), randn(N, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"weight has shape \(64, 40\)"):
        OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, quantized(64, N, "int4g64"), b)
    with pytest.raises(ValueError, match="bias has shape"):
        OPS.linear_residual(h, w, b[:8], stream(randn(3, N, dtype=torch.float16)))
    with pytest.raises(ValueError, match="format 'int3'"):
        OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, replace(w, format="int3"), b)
    with pytest.raises(ValueError, match="weight.scale has dtype torch.float16"):
        OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, replace(w, scale=w.scale.half()), b)
    with pytest.raises(ValueError, match="its zero must be given"):
        OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, replace(w, zero=None), b)
    with pytest.raises(ValueError, match="group_size=48"):
        OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, replace(w, group_size=48), b)
    with pytest.raises(ValueError, match="weight.scale is on meta"):
        OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, replace(w, scale=w.scale.to("meta")), b)
    with pytest.raises(ValueError, match="weight is on meta"):
        OPS.linear_residual(h, w.to("meta"), b, stream(randn(3, N, dtype=torch.float16)))
    fc, proj = quantized(K, INNER, "nf4dq"), quantized(INNER, K, "nf4dq")
    with pytest.raises(ValueError, match="proj_weight.code has shape"):
        OPS.mlp(stream(x[:1]), ln_w, ln_b, 1e-5, fc, randn(INNER, dtype=torch.float16), "gelu_new",
                replace(proj, code=proj.code[:16]), randn(K, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"fc_weight has shape \(256, 256\)"):
        OPS.mlp(stream(x[:1]), ln_w, ln_b, 1e-5, quantized(INNER, INNER, "int8"), randn(INNER, dtype=torch.float16),
                "gelu_new", proj, randn(K, dtype=torch.float16))
    wpe = randn(20, K, dtype=torch.float16)
    with pytest.raises(ValueError, match="wte.zero has shape"):
        OPS.embedding(ids(N, 1, 2), ids(20, 1, 2), replace(w, zero=w.zero[:1]), wpe)
    with pytest.raises(ValueError, match="wpe has width 64"):
        OPS.embedding(ids(N, 1, 2), ids(20, 1, 2), w, randn(20, 64, dtype=torch.float16))
