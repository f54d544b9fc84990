"""Flash attention (prefill) and split-KV decode attention of every backend against the reference."""

import pytest
import torch

from numerics import DEVICE, DTYPES, OPS, as_float64, assert_close, poisoned_allocations, randn
from tritongpt2.kernels import reference, torch_ops
from tritongpt2.kernels.backend import resolve_backend
from tritongpt2.kernels.launch import recording_launches
from tritongpt2.kernels.operands import CacheAccess
from tritongpt2.kernels.tiling import attention_tiles, decode_splits, decode_tiles
from tritongpt2.kernels.torch_ops import BATCHED_DECODE_SLOTS, batched_decode


def cache_case(batch, heads, head_dim, cache_rows, slots, dtype, seed=0):
    torch.manual_seed(seed)
    k_cache = randn(cache_rows, heads, slots, head_dim, dtype=dtype)
    v_cache = randn(cache_rows, heads, slots, head_dim, dtype=dtype)
    key_mask = torch.ones(cache_rows, slots, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, key_mask


def index(values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def attend(ops, op, q, k_cache, v_cache, starts, key_mask, scale):
    """ops.<op> (flash_attention, q [B, T, C], or decode_attention, q [B, C]) with the queries at
    slots starts[b] + t, as the engine calls it: through the backend's cache_access."""
    seq = q.shape[1] if q.dim() == 3 else 1
    slots = starts[:, None].long() + torch.arange(seq, device=q.device)
    return getattr(ops, op)(q, k_cache, v_cache, ops.cache_access(slots, starts, key_mask), scale)


def oracle(op, q, k_cache, v_cache, starts, key_mask, scale):
    if op == "decode_attention":
        return reference.attention(q.unsqueeze(1), k_cache, v_cache, starts, key_mask, scale).squeeze(1)
    return reference.attention(q, k_cache, v_cache, starts, key_mask, scale)


def check(ops, op, q, k_cache, v_cache, starts, key_mask, scale):
    """The backend's output (every element written) against the float64 oracle, with the error
    torch makes in the same dtype as the earned part of the tolerance."""
    with poisoned_allocations():
        out = attend(ops, op, q, k_cache, v_cache, starts, key_mask, scale)
    exact = oracle(op, *as_float64(q, k_cache, v_cache), starts, key_mask, scale)
    assert_close(out, exact, oracle(op, q, k_cache, v_cache, starts, key_mask, scale))
    return out


def poison_slots(cache, row, slots):
    poisoned = cache.clone()
    poisoned[row, :, slots] = float("nan")
    return poisoned


# (batch, seq, heads, head_dim, cache rows, slots, starts)
PREFILL = [
    (1, 1, 2, 64, 1, 8, [0]),  # T = 1
    (2, 7, 3, 64, 3, 16, [0, 9]),  # a cached prefix before row 1's queries, which fill the cache
    (3, 20, 5, 80, 4, 70, [0, 10, 50]),  # head_dim 80, slots not a multiple of the block
    (2, 70, 2, 16, 3, 100, [25, 0]),  # several query blocks, whose key ranges differ per row
    (1, 5, 25, 64, 2, 12, [3]),  # gpt2-xl heads: C = 1600
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq,heads,head_dim,cache_rows,slots,starts", PREFILL)
def test_flash_attention_matches_reference(ops, batch, seq, heads, head_dim, cache_rows, slots, starts, dtype):
    k_cache, v_cache, key_mask = cache_case(batch, heads, head_dim, cache_rows, slots, dtype)
    q = randn(batch, seq, heads * head_dim, dtype=dtype)
    check(ops, "flash_attention", q, k_cache, v_cache, index(starts), key_mask, head_dim**-0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_attention_with_left_and_right_padding(ops, dtype):
    k_cache, v_cache, key_mask = cache_case(3, 4, 16, 3, 24, dtype)
    key_mask[0, :5] = 0  # left padding: queries 0..4 of row 0 see nothing
    key_mask[1, 9:12] = 0  # right padding of the prompt
    key_mask[2] = 0  # a row that sees nothing at all
    q = randn(3, 12, 64, dtype=dtype)
    out = check(ops, "flash_attention", q, k_cache, v_cache, index([0, 0, 0], torch.int32), key_mask, 0.25)
    assert torch.equal(out[0, :5], torch.zeros_like(out[0, :5])), "a query that sees no slot gets zeros"
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_attention_is_causal_by_slot(ops, dtype):
    # Changing a key after a query's slot must not change that query's output.
    k_cache, v_cache, key_mask = cache_case(1, 2, 16, 1, 20, dtype)
    q = randn(1, 20, 32, dtype=dtype)
    starts = index([0])
    before = attend(ops, "flash_attention", q, k_cache, v_cache, starts, key_mask, 0.25)
    k_cache[:, :, 12:] += 5.0
    v_cache[:, :, 12:] -= 5.0
    after = attend(ops, "flash_attention", q, k_cache, v_cache, starts, key_mask, 0.25)
    assert torch.equal(before[0, :12], after[0, :12])
    assert not torch.equal(before[0, 12:], after[0, 12:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_attention_ignores_masked_and_unreached_slots(dtype):
    # NaN in padding slots and past the last query must not reach the output (0 * NaN is NaN). The
    # kernels never read them; the torch backend reads masked slots below the last query, as
    # transformers does (the engine fills them with the request's own padding tokens).
    ops = OPS
    k_cache, v_cache, key_mask = cache_case(2, 3, 32, 2, 40, dtype)
    key_mask[0, :2] = 0
    key_mask[1, 10:13] = 0
    q, starts = randn(2, 20, 96, dtype=dtype), index([4, 0])
    clean = check(ops, "flash_attention", q, k_cache, v_cache, starts, key_mask, 0.2)
    k_poisoned, v_poisoned = k_cache, v_cache
    for row, slots in ((0, slice(0, 2)), (0, slice(24, None)), (1, slice(10, 13)), (1, slice(20, None))):
        k_poisoned, v_poisoned = poison_slots(k_poisoned, row, slots), poison_slots(v_poisoned, row, slots)
    assert torch.equal(attend(ops, "flash_attention", q, k_poisoned, v_poisoned, starts, key_mask, 0.2), clean)


# (batch, heads, head_dim, cache rows, slots, query slots)
DECODE = [
    (1, 2, 64, 1, 8, [0]),  # the first token: a row at slot 0
    (3, 5, 80, 4, 70, [3, 40, 69]),
    (2, 1, 16, 2, 1000, [999, 130]),  # long context: many splits, most past row 1's query
    (5, 3, 64, 6, 50, [11, 0, 49, 20, 33]),  # 4 rows or more: the torch backend's batched half-precision path
    (1, 25, 64, 1, 300, [200]),  # gpt2-xl heads
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,heads,head_dim,cache_rows,slots,query_slots", DECODE)
def test_decode_attention_matches_reference(ops, batch, heads, head_dim, cache_rows, slots, query_slots, dtype):
    k_cache, v_cache, key_mask = cache_case(batch, heads, head_dim, cache_rows, slots, dtype)
    key_mask[0, : query_slots[0] // 2] = 0  # left padding of row 0
    q = randn(batch, heads * head_dim, dtype=dtype)
    check(ops, "decode_attention", q, k_cache, v_cache, index(query_slots), key_mask, head_dim**-0.5)


# (rows, slots in use): 1, 3 and 4 rows on both sides of BATCHED_DECODE_SLOTS, 7 rows above it; the
# last row's query at the last slot in use.
HALF_PRECISION_DECODES = [(1, 40), (1, BATCHED_DECODE_SLOTS + 9), (3, 40), (3, 50), (4, 24), (4, 40), (7, 40)]


def test_the_half_precision_decode_cases_take_both_routes():
    routes = {(batch, batched_decode(batch, slots, torch.float16)) for batch, slots in HALF_PRECISION_DECODES}
    assert routes == {(batch, taken) for batch in (1, 3, 4) for taken in (False, True)} | {(7, True)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,slots", HALF_PRECISION_DECODES)
def test_the_torch_backends_half_precision_decode_at_any_batch(monkeypatch, batch, slots, dtype):
    # Few rows and slots take torch's SDPA, more take batched matmuls (batched_decode, asked once with
    # the slots in use): each is the reference's math (bfloat16 too, which the interpreter cannot run),
    # with left padding, rows at different slots, and a row whose query sees no slot, which gets zeros.
    asked = []
    route = torch_ops.batched_decode
    monkeypatch.setattr(torch_ops, "batched_decode", lambda *args: asked.append(args) or route(*args))
    ops = resolve_backend("torch").ops
    k_cache, v_cache, key_mask = (t.cpu() for t in cache_case(batch, 4, 32, batch + 1, slots + 8, dtype))
    key_mask[0, :12] = 0
    if batch > 1:
        key_mask[batch - 1] = 0
    q = randn(batch, 128, dtype=dtype).cpu()
    starts = torch.tensor([20] + [(9 * i + 5) % slots for i in range(1, batch - 1)] + [slots - 1] * (batch > 1))
    if batch == 1:
        starts[0] = slots - 1
    out = check(ops, "decode_attention", q, k_cache, v_cache, starts, key_mask, 32**-0.5)
    if batch > 1:
        assert torch.equal(out[batch - 1], torch.zeros_like(out[batch - 1]))
    assert asked == [(batch, slots, dtype)]


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("op,seq", [("flash_attention", 8), ("decode_attention", 0)])
def test_probabilities_are_rounded_to_v_dtype_before_p_at_v(ops, op, seq, rows):
    # As transformers does: P @ V takes P in V's dtype. Slot 0 takes almost all the weight, with V = 0;
    # the 47 other slots get exp(-16.2) = 9.2e-8 each, which float16 rounds to the subnormal 1.19e-7,
    # so rounding P moves the output by 30%, far beyond the float16 tolerance. One key block and one
    # split hold every slot, so the kernel rounds at the same scale as the reference.
    slots, head_dim = 48, 16
    k_cache = torch.zeros(rows, 1, slots, head_dim, dtype=torch.float16, device=DEVICE)
    k_cache[:, 0, 1:, 0] = -16.2
    v_cache = torch.full_like(k_cache, 30000.0)
    v_cache[:, 0, 0] = 0.0
    key_mask = torch.ones(rows, slots, dtype=torch.int32, device=DEVICE)
    q = torch.zeros(rows, *([seq] if seq else []), head_dim, dtype=torch.float16, device=DEVICE)
    q[..., 0] = 1.0
    starts = index([slots - max(seq, 1)] * rows)
    out = attend(ops, op, q, k_cache, v_cache, starts, key_mask, 1.0)
    rounded = oracle(op, q, k_cache, v_cache, starts, key_mask, 1.0)
    exact = oracle(op, *as_float64(q, k_cache, v_cache), starts, key_mask, 1.0)
    assert torch.allclose(out.double(), rounded.double(), rtol=0.02)
    assert not torch.allclose(out.double(), exact, rtol=0.1)


def recorded(op, *args):
    with recording_launches() as records:
        getattr(OPS, op)(*args)
    return records


def meta_case(batch, seq, heads, head_dim, cache_rows, slots, dtype=torch.float16):
    def meta(*shape, dtype=dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    q = meta(batch, seq, heads * head_dim) if seq else meta(batch, heads * head_dim)
    caches = meta(cache_rows, heads, slots, head_dim), meta(cache_rows, heads, slots, head_dim)
    access = CacheAccess(meta(batch, max(seq, 1), dtype=torch.int64), meta(batch, dtype=torch.int64),
                         meta(cache_rows, slots, dtype=torch.int32))
    return q, *caches, access, 0.125


def test_decode_cases_split_and_leave_splits_past_a_row():
    # The split count is fixed by shapes; the launch grid is (B * H, splits) with equal chunks, so
    # a row whose slot is before the last chunk's start leaves at least that chunk empty.
    covered = False
    for batch, heads, head_dim, cache_rows, slots, query_slots in DECODE:
        (split,) = recorded("decode_attention", *meta_case(batch, 0, heads, head_dim, cache_rows, slots))
        splits = split.grid[1]
        assert split.grid == (batch * heads, splits)
        assert 1 <= splits <= decode_splits(batch * heads, slots, decode_tiles(head_dim).block_n)
        covered |= splits > 1 and min(query_slots) < (splits - 1) * slots / splits
    assert covered, "no decode case has several splits with one of them entirely past a row's slot"


@pytest.mark.parametrize("model,heads,head_dim", [("gpt2", 12, 64), ("gpt2-xl", 25, 64)])
def test_launch_configuration_on_meta_tensors(model, heads, head_dim):
    # The compile audit and CUDA-graph capture call the launchers without reading device data.
    for batch in (1, 8):
        (launch,) = recorded("flash_attention", *meta_case(batch, 1024, heads, head_dim, batch, 1024))
        tiles = attention_tiles(1024, head_dim)
        assert launch.grid == (1024 // tiles.block_m, batch * heads)
        assert (launch.num_warps, launch.arguments["BLOCK_D"]) == (tiles.num_warps, head_dim)
        (split,) = recorded("decode_attention", *meta_case(batch, 0, heads, head_dim, batch, 1024))
        assert split.grid[0] == batch * heads
        assert 1 <= split.grid[1] <= decode_splits(batch * heads, 1024, decode_tiles(head_dim).block_n)
        assert batch > 1 or split.grid[1] > 1, "a single sequence's context is spread over several programs"


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_ignores_masked_and_unreached_slots(dtype):
    ops = OPS  # the kernels only, as for prefill
    k_cache, v_cache, key_mask = cache_case(2, 2, 16, 2, 300, dtype)
    key_mask[0, 100:150] = 0
    q, starts = randn(2, 32, dtype=dtype), index([250, 70], torch.int32)
    clean = check(ops, "decode_attention", q, k_cache, v_cache, starts, key_mask, 0.25)
    k_poisoned, v_poisoned = k_cache, v_cache
    for row, slots in ((0, slice(100, 150)), (0, slice(251, None)), (1, slice(71, None))):
        k_poisoned, v_poisoned = poison_slots(k_poisoned, row, slots), poison_slots(v_poisoned, row, slots)
    assert torch.equal(attend(ops, "decode_attention", q, k_poisoned, v_poisoned, starts, key_mask, 0.25), clean)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_row_that_sees_nothing_gets_zeros(ops, dtype):
    k_cache, v_cache, key_mask = cache_case(2, 2, 16, 2, 40, dtype)
    key_mask[1] = 0
    q = randn(2, 32, dtype=dtype)
    out = check(ops, "decode_attention", q, k_cache, v_cache, index([30, 30], torch.int32), key_mask, 0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_with_every_score_very_negative(ops, dtype):
    # Scores about -1000 with a spread of a few units: softmax is shift-invariant, so the output is
    # an ordinary weighted mean of V, but exp of any score is 0. The combine must take the largest of
    # the splits' real maxima; a padding split counted as max 0 would win and zero every weight.
    # 300 slots make 5 splits (padded to 8 in the combine); row 1's query leaves splits past it empty.
    torch.manual_seed(0)
    k_cache = (-25.0 + 0.1 * torch.randn(2, 1, 300, 16)).to(dtype=dtype, device=DEVICE)
    v_cache = randn(2, 1, 300, 16, dtype=dtype)
    key_mask = torch.ones(2, 300, dtype=torch.int32, device=DEVICE)
    q = torch.full((2, 16), 10.0, dtype=dtype, device=DEVICE)
    scores = 0.25 * (k_cache[:, 0].float() @ q[0].float())
    assert scores.max() < -990 and scores.max() - scores.min() > 2
    assert decode_splits(2, 300, decode_tiles(16).block_n) == 5
    check(ops, "decode_attention", q, k_cache, v_cache, index([299, 100]), key_mask, 0.25)


@pytest.mark.parametrize("op,q_shape", [("flash_attention", (2, 3, 32)), ("decode_attention", (2, 32))])
def test_attention_validation_names_the_offending_value(op, q_shape):
    launcher = getattr(OPS, op)
    k_cache, v_cache, key_mask = cache_case(2, 2, 16, 2, 8, torch.float32)
    q, starts = randn(*q_shape, dtype=torch.float32), index([0, 0])
    strided_q = randn(*q_shape[:-1], 2 * q_shape[-1], dtype=torch.float32)[..., ::2]
    other_rank = len(q_shape) ^ 1  # 2 <-> 3
    cases = [
        ((q.double(), k_cache, v_cache, starts, key_mask, 0.25), "q has dtype torch.float64"),
        ((q.half(), k_cache, v_cache, starts, key_mask, 0.25), "k_cache has dtype torch.float32 but q has torch.float16"),
        ((q, k_cache, v_cache.half(), starts, key_mask, 0.25), "v_cache has dtype torch.float16 but q has torch.float32"),
        ((q.reshape(*[2] * (other_rank - 1), -1), k_cache, v_cache, starts, key_mask, 0.25), f"q must have {len(q_shape)} dimensions"),
        ((q, k_cache[0], v_cache[0], starts, key_mask, 0.25), r"k_cache must have 4 dimensions, got shape \(2, 8, 16\)"),
        ((q[..., :30].contiguous(), k_cache, v_cache, starts, key_mask, 0.25), "q has width 30, but the cache holds 2 heads of 16"),
        ((q, k_cache[:1], v_cache[:1], starts, key_mask[:1], 0.25), "batch 2 is larger than the cache's 1 rows"),
        ((q, k_cache, v_cache[:, :, :4].contiguous(), starts, key_mask, 0.25), r"v_cache has shape \(2, 2, 4, 16\)"),
        ((strided_q, k_cache, v_cache, starts, key_mask, 0.25), "q must be contiguous"),
        ((q, k_cache.transpose(2, 3), v_cache, starts, key_mask, 0.25), "k_cache must be contiguous"),
        ((q, k_cache, v_cache.transpose(0, 1), starts, key_mask, 0.25), "v_cache must be contiguous"),
        ((q, k_cache, v_cache, starts.float(), key_mask, 0.25), "query_start has dtype torch.float32"),
        ((q, k_cache, v_cache, starts[:1], key_mask, 0.25), r"query_start has shape \(1,\); expected \(2,\)"),
        ((q, k_cache, v_cache, starts, key_mask.bool(), 0.25), "key_mask has dtype torch.bool"),
        ((q, k_cache, v_cache, starts, key_mask.long(), 0.25), "key_mask has dtype torch.int64"),
        ((q, k_cache, v_cache, starts, key_mask[:, :4].contiguous(), 0.25), r"key_mask has shape \(2, 4\)"),
        ((q, k_cache, v_cache, starts.to("meta"), key_mask, 0.25), "query_start is on meta"),
        ((q, k_cache, v_cache.to("meta"), starts, key_mask, 0.25), "v_cache is on meta"),
        ((q, k_cache, v_cache, starts, key_mask, float("nan")), "scale must be a finite number, got nan"),
        ((q, k_cache, v_cache, starts, key_mask, float("inf")), "scale must be a finite number, got inf"),
    ]
    for (q_, k_, v_, starts_, key_mask_, scale), message in cases:
        slots = torch.zeros(q_.shape[0], q_.shape[1] if q_.dim() == 3 else 1, dtype=torch.int64)
        with pytest.raises(ValueError, match=message):
            launcher(q_, k_, v_, CacheAccess(slots, starts_, key_mask_), scale)
    with pytest.raises(ValueError, match="access must be a CacheAccess, got tuple"):
        launcher(q, k_cache, v_cache, (starts, key_mask), 0.25)
