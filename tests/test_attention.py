"""Flash attention (prefill) and split-KV decode attention against the reference."""

import pytest
import torch

from numerics import DEVICE, DTYPES, OPS, as_float64, assert_close, poisoned_allocations, randn
from tritongpt2.kernels import reference
from tritongpt2.kernels.tiling import decode_splits, decode_tiles


def cache_case(batch, heads, head_dim, cache_rows, slots, dtype, seed=0):
    torch.manual_seed(seed)
    k_cache = randn(cache_rows, heads, slots, head_dim, dtype=dtype)
    v_cache = randn(cache_rows, heads, slots, head_dim, dtype=dtype)
    key_mask = torch.ones(cache_rows, slots, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, key_mask


def check(op, q, k_cache, v_cache, starts, key_mask, scale):
    with poisoned_allocations():
        out = getattr(OPS, op)(q, k_cache, v_cache, starts, key_mask, scale)
    oracle = getattr(reference, op)(*as_float64(q, k_cache, v_cache), starts, key_mask, scale)
    assert_close(out, oracle, getattr(reference, op)(q, k_cache, v_cache, starts, key_mask, scale))
    return out


# (batch, seq, heads, head_dim, cache rows, slots, starts)
PREFILL = [
    (1, 1, 2, 64, 1, 8, [0]),
    (2, 7, 3, 64, 3, 16, [0, 5]),  # a cached prefix before row 1's queries
    (3, 20, 5, 80, 4, 70, [0, 10, 50]),  # head_dim 80, slots not a multiple of the block
    (1, 70, 2, 16, 1, 70, [0]),  # several query blocks, several key blocks
    (1, 5, 25, 64, 2, 12, [3]),  # gpt2-xl heads
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq,heads,head_dim,cache_rows,slots,starts", PREFILL)
def test_flash_attention_matches_reference(batch, seq, heads, head_dim, cache_rows, slots, starts, dtype):
    k_cache, v_cache, key_mask = cache_case(batch, heads, head_dim, cache_rows, slots, dtype)
    q = randn(batch, seq, heads * head_dim, dtype=dtype)
    check("flash_attention", q, k_cache, v_cache, torch.tensor(starts, device=DEVICE), key_mask, head_dim**-0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_attention_with_left_and_right_padding(dtype):
    k_cache, v_cache, key_mask = cache_case(3, 4, 16, 3, 24, dtype)
    key_mask[0, :5] = 0  # left padding: queries 0..4 of row 0 see nothing
    key_mask[1, 9:12] = 0  # right padding of the prompt
    key_mask[2] = 0  # a row that sees nothing at all
    q = randn(3, 12, 64, dtype=dtype)
    out = check("flash_attention", q, k_cache, v_cache, torch.zeros(3, dtype=torch.int64, device=DEVICE), key_mask, 0.25)
    assert torch.equal(out[0, :5], torch.zeros_like(out[0, :5])), "a query that sees no slot gets zeros"
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_attention_is_causal_by_slot(dtype):
    # Changing a key after a query's slot must not change that query's output.
    k_cache, v_cache, key_mask = cache_case(1, 2, 16, 1, 20, dtype)
    q = randn(1, 20, 32, dtype=dtype)
    starts = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    before = OPS.flash_attention(q, k_cache, v_cache, starts, key_mask, 0.25)
    k_cache[:, :, 12:] += 5.0
    v_cache[:, :, 12:] -= 5.0
    after = OPS.flash_attention(q, k_cache, v_cache, starts, key_mask, 0.25)
    assert torch.equal(before[0, :12], after[0, :12])
    assert not torch.equal(before[0, 12:], after[0, 12:])


# (batch, heads, head_dim, cache rows, slots, query slots)
DECODE = [
    (1, 2, 64, 1, 8, [0]),  # the first token: a row at slot 0
    (3, 5, 80, 4, 70, [3, 40, 69]),
    (2, 1, 16, 2, 1000, [999, 130]),  # long context: many splits, most past row 1's query
    (1, 25, 64, 1, 300, [200]),  # gpt2-xl heads
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,heads,head_dim,cache_rows,slots,query_slots", DECODE)
def test_decode_attention_matches_reference(batch, heads, head_dim, cache_rows, slots, query_slots, dtype):
    k_cache, v_cache, key_mask = cache_case(batch, heads, head_dim, cache_rows, slots, dtype)
    key_mask[0, : query_slots[0] // 2] = 0  # left padding of row 0
    q = randn(batch, heads * head_dim, dtype=dtype)
    check("decode_attention", q, k_cache, v_cache, torch.tensor(query_slots, device=DEVICE), key_mask, head_dim**-0.5)


def test_long_decode_contexts_are_split():
    assert decode_splits(2 * 1, 1000, decode_tiles(16).block_n) > 1
    assert decode_splits(64 * 12, 1024, decode_tiles(64).block_n) == 1


def test_decode_row_that_sees_nothing_gets_zeros():
    k_cache, v_cache, key_mask = cache_case(2, 2, 16, 2, 40, torch.float32)
    key_mask[1] = 0
    q = randn(2, 32, dtype=torch.float32)
    out = check("decode_attention", q, k_cache, v_cache, torch.tensor([30, 30], device=DEVICE), key_mask, 0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("op,q_shape", [("flash_attention", (2, 3, 32)), ("decode_attention", (2, 32))])
def test_attention_validation_names_the_offending_value(op, q_shape):
    launcher = getattr(OPS, op)
    k_cache, v_cache, key_mask = cache_case(2, 2, 16, 2, 8, torch.float32)
    q, starts = randn(*q_shape, dtype=torch.float32), torch.zeros(2, dtype=torch.int64, device=DEVICE)
    cases = [
        ((q.double(), k_cache, v_cache, starts, key_mask, 0.25), "q has dtype torch.float64"),
        ((q.half(), k_cache, v_cache, starts, key_mask, 0.25), "k_cache has dtype torch.float32 but q has torch.float16"),
        ((q[..., :30].contiguous(), k_cache, v_cache, starts, key_mask, 0.25), "q has width 30, but the cache holds 2 heads of 16"),
        ((q, k_cache[:1], v_cache[:1], starts, key_mask[:1], 0.25), "batch 2 is larger than the cache's 1 rows"),
        ((q, k_cache, v_cache[:, :, :4].contiguous(), starts, key_mask, 0.25), r"v_cache has shape \(2, 2, 4, 16\)"),
        ((q, k_cache.transpose(2, 3), v_cache, starts, key_mask, 0.25), "k_cache must be contiguous"),
        ((q, k_cache, v_cache, starts.float(), key_mask, 0.25), "query_start has dtype torch.float32"),
        ((q, k_cache, v_cache, starts, key_mask.bool(), 0.25), "key_mask has dtype torch.bool"),
        ((q, k_cache, v_cache, starts, key_mask[:, :4].contiguous(), 0.25), r"key_mask has shape \(2, 4\)"),
        ((q, k_cache, v_cache, starts.to("meta"), key_mask, 0.25), "query_start is on meta"),
        ((q, k_cache, v_cache, starts, key_mask, float("nan")), "scale must be a finite number, got nan"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            launcher(*args)
