"""Products of a few rows (decode) split along K, and the MLP of a few rows in one launch: against
the reference at every split, bit-identical rows whatever shares their batch, counters left at zero,
and enough programs to fill an H100 at every GPT-2 size."""

import pytest
import torch

from numerics import DEVICE, OPS, as_float64, assert_close, randn
from test_linear import assert_moments_describe, layer_norm_params, residual_stream, stream
from tritongpt2.bench.compile_audit import Workload, step_launches
from tritongpt2.bench.model_shapes import MODEL_SHAPES
from tritongpt2.kernels import reference, tiling
from tritongpt2.kernels.launch import recording_launches
from tritongpt2.kernels.tiling import MIN_STREAMING_PROGRAMS, SPLIT_ROWS, split_tiles_of

DTYPES = [torch.float32, torch.float16]
# Odd sizes: K and N not multiples of any block.
K, N, INNER = 72, 40, 88


@pytest.fixture
def forced_splits(monkeypatch):
    """force(splits, block_k): every split product runs with that many K ranges (the tuning table's way)."""

    def force(splits: int, block_k: int = 16) -> None:
        table = {}
        for n, k in ((N, K), (INNER, K), (K, INNER), (3 * K, K)):
            for size in (2, 4):
                table[tiling.tuning_key(n, k, size)] = dict(block_n=16, block_k=block_k, splits=splits, num_warps=4, num_stages=2)
        monkeypatch.setattr(tiling, "tuning_table", lambda: table)

    return force


def semaphores() -> torch.Tensor:
    return torch.zeros(64, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, SPLIT_ROWS])
@pytest.mark.parametrize("splits", [1, 2, 3, 5])
def test_every_split_matches_the_reference(forced_splits, rows, splits, dtype):
    forced_splits(splits)
    x, h = residual_stream(rows, K, dtype), randn(rows, K, dtype=dtype)
    ln_w, ln_b = layer_norm_params(K, dtype)
    w, b = randn(K, N, dtype=dtype, scale=K**-0.5), randn(N, dtype=dtype)
    counters = semaphores()
    out = OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, w, b, "gelu_new", semaphores=counters)
    assert_close(out, reference.ln_linear(*as_float64(x, ln_w, ln_b), 1e-5, *as_float64(w, b), "gelu_new"),
                 reference.ln_linear(x, ln_w, ln_b, 1e-5, w, b, "gelu_new"))
    residual = randn(rows, N, dtype=dtype)
    summed = OPS.linear_residual(h, w, b, stream(residual), semaphores=counters)
    assert_close(summed.values, reference.linear_residual(*as_float64(h, w, b, residual)),
                 reference.linear_residual(h, w, b, residual))
    assert_moments_describe(summed.moments, summed.values)
    assert summed.moments.shape[-2] == -(-N // 16), "one block of moments per column tile"
    assert not counters.any(), "every column tile's last program resets its counter"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, SPLIT_ROWS])
@pytest.mark.parametrize("splits", [1, 3])
def test_the_mlp_in_one_launch_matches_the_reference(forced_splits, rows, splits, dtype):
    forced_splits(splits)
    x = residual_stream(rows, K, dtype)
    ln_w, ln_b = layer_norm_params(K, dtype)
    fc_w, fc_b = randn(K, INNER, dtype=dtype, scale=K**-0.5), randn(INNER, dtype=dtype)
    proj_w, proj_b = randn(INNER, K, dtype=dtype, scale=INNER**-0.5), randn(K, dtype=dtype)
    counters = semaphores()
    with recording_launches() as records:
        OPS.mlp(stream(x), ln_w, ln_b, 1e-5, fc_w, fc_b, "gelu_new", proj_w, proj_b, semaphores=counters)
    assert [r.name for r in records] == ["decode_mlp_kernel"]
    out = OPS.mlp(stream(x), ln_w, ln_b, 1e-5, fc_w, fc_b, "gelu_new", proj_w, proj_b, semaphores=counters)
    arguments = (ln_w, ln_b, 1e-5, fc_w, fc_b, "gelu_new", proj_w, proj_b)
    rounded = reference.mlp(x, *arguments)
    exact = reference.mlp(*as_float64(x, ln_w, ln_b), 1e-5, *as_float64(fc_w, fc_b), "gelu_new", *as_float64(proj_w, proj_b))
    assert_close(out.values, exact, rounded)
    assert_moments_describe(out.moments, out.values)
    assert not counters.any(), "the ticket, the phase counters and every tile's counter are reset"
    # A second launch on the same counters starts from zero again.
    again = OPS.mlp(stream(x), *arguments, semaphores=counters)
    assert torch.equal(again.values, out.values)


@pytest.mark.parametrize("rows", range(1, SPLIT_ROWS + 1))
def test_every_row_count_up_to_sixteen(forced_splits, rows):
    forced_splits(3, block_k=32)
    x = residual_stream(rows, K, torch.float16)
    ln_w, ln_b = layer_norm_params(K, torch.float16)
    fc_w, fc_b = randn(K, INNER, dtype=torch.float16, scale=K**-0.5), randn(INNER, dtype=torch.float16)
    proj_w, proj_b = randn(INNER, K, dtype=torch.float16, scale=INNER**-0.5), randn(K, dtype=torch.float16)
    arguments = (ln_w, ln_b, 1e-5, fc_w, fc_b, "gelu_new", proj_w, proj_b)
    out = OPS.mlp(stream(x), *arguments, semaphores=semaphores())
    exact = reference.mlp(*as_float64(x, ln_w, ln_b), 1e-5, *as_float64(fc_w, fc_b), "gelu_new", *as_float64(proj_w, proj_b))
    assert_close(out.values, exact, reference.mlp(x, *arguments))


def test_many_rows_run_the_mlp_as_two_products():
    x = residual_stream(SPLIT_ROWS + 1, K, torch.float32)
    ln_w, ln_b = layer_norm_params(K, torch.float32)
    fc_w, fc_b = randn(K, INNER, dtype=torch.float32), randn(INNER, dtype=torch.float32)
    proj_w, proj_b = randn(INNER, K, dtype=torch.float32), randn(K, dtype=torch.float32)
    with recording_launches() as records:
        OPS.mlp(stream(x), ln_w, ln_b, 1e-5, fc_w, fc_b, "relu", proj_w, proj_b)
    assert [r.name for r in records] == ["linear_kernel", "linear_kernel"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_gets_the_same_bits_whatever_else_is_in_its_batch(forced_splits, dtype):
    forced_splits(3)
    generator = torch.Generator().manual_seed(0)
    ln_w, ln_b = layer_norm_params(K, dtype)
    fc_w, fc_b = randn(K, INNER, dtype=dtype, scale=K**-0.5), randn(INNER, dtype=dtype)
    proj_w, proj_b = randn(INNER, K, dtype=dtype, scale=INNER**-0.5), randn(K, dtype=dtype)
    row = residual_stream(1, K, dtype)

    def outputs(x):
        logits = OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, fc_w, None)
        return logits, OPS.mlp(stream(x), ln_w, ln_b, 1e-5, fc_w, fc_b, "gelu_new", proj_w, proj_b).values

    alone = outputs(row)
    for batch in (2, 9, SPLIT_ROWS):
        others = (torch.randn(batch, K, generator=generator) * 50).to(dtype=dtype, device=DEVICE)
        at = int(torch.randint(0, batch, (1,), generator=generator))
        others[at] = row[0]
        for single, batched in zip(alone, outputs(others)):
            assert torch.equal(batched[at], single[0]), f"row {at} of a batch of {batch}"


def test_split_tiles_cover_k_in_whole_block_steps():
    for k in (40, 72, 768, 3072, 6400):
        for splits in (1, 2, 3, 7, 11):
            for block_k in (16, 32, 128):
                tiles = split_tiles_of(100, k, 64, block_k, splits, 8, 4)
                assert tiles.k_per_split % block_k == 0
                assert (tiles.splits - 1) * tiles.k_per_split < k <= tiles.splits * tiles.k_per_split


def test_counters_too_few_are_refused():
    x = randn(2, K, dtype=torch.float32)
    w, b = randn(K, 4096, dtype=torch.float32), randn(4096, dtype=torch.float32)
    with pytest.raises(ValueError, match="semaphores are too few"):
        OPS.linear_residual(x, w, b, stream(randn(2, 4096, dtype=torch.float32)),
                            semaphores=torch.zeros(1, dtype=torch.int32, device=DEVICE))


# One decode step as gpt2_step launches it (compile_audit.step_launches records one layer): the
# embedding, c_attn, attention, c_proj, the MLP, then the LM head.
DECODE_STEP = ["embedding_kernel", "split_linear_kernel", "decode_attention_kernel", "split_linear_kernel",
               "decode_mlp_kernel", "split_linear_kernel"]


@pytest.mark.parametrize("model", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_every_decode_launch_fills_an_h100_with_four_launches_a_layer(model, dtype):
    shape = MODEL_SHAPES[model]
    for batch in (1, 2, 4, 8, 16):
        records = step_launches(shape, dtype, Workload("decode", batch, 1, 1024))
        assert [r.name for r in records] == DECODE_STEP
        for record in records[1:]:
            programs = 1
            for size in record.grid:
                programs *= size
            assert programs >= MIN_STREAMING_PROGRAMS, (record.name, record.grid, batch)
