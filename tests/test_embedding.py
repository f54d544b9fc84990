import pytest
import torch

from numerics import DEVICE, DTYPES, OPS, as_float64, assert_close, poisoned_allocations, randn
from test_linear import assert_moments_describe
from tritongpt2.kernels import reference


def ids(high: int, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.randint(0, high, shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_types", [False, True])
@pytest.mark.parametrize("shape,vocab,positions,width", [((1, 1), 50, 8, 64), ((3, 7), 301, 40, 80), ((2, 3), 97, 16, 1600)])
def test_embedding_matches_reference(ops, shape, vocab, positions, width, with_types, dtype):
    wte, wpe = randn(vocab, width, dtype=dtype), randn(positions, width, dtype=dtype)
    input_ids, position_ids = ids(vocab, *shape), ids(positions, *shape, dtype=torch.int32)
    token_types = ids(vocab, *shape) if with_types else None
    with poisoned_allocations():
        out = ops.embedding(input_ids, position_ids, wte, wpe, token_types)
    oracle = reference.embedding(input_ids, position_ids, *as_float64(wte, wpe), token_types)
    assert_close(out.values, oracle, reference.embedding(input_ids, position_ids, wte, wpe, token_types))
    if out.moments is not None:
        assert_moments_describe(out.moments, out.values)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inputs_embeds_take_the_place_of_the_token_rows(ops, dtype):
    wte, wpe = randn(50, 80, dtype=dtype), randn(16, 80, dtype=dtype)
    embeds, position_ids, token_types = randn(2, 5, 80, dtype=dtype), ids(16, 2, 5), ids(50, 2, 5)
    with poisoned_allocations():
        out = ops.embedding(None, position_ids, wte, wpe, token_types, inputs_embeds=embeds)
    oracle = reference.embedding(None, position_ids, *as_float64(wte, wpe), token_types, inputs_embeds=embeds.double())
    assert_close(out.values, oracle, reference.embedding(None, position_ids, wte, wpe, token_types, inputs_embeds=embeds))
    if out.moments is not None:
        assert_moments_describe(out.moments, out.values)


def test_embedding_validation_names_the_offending_value():
    wte, wpe = randn(10, 16, dtype=torch.float32), randn(8, 16, dtype=torch.float32)
    input_ids, position_ids = ids(10, 2, 3), ids(8, 2, 3)
    with pytest.raises(ValueError, match="input_ids has dtype torch.float32"):
        OPS.embedding(input_ids.float(), position_ids, wte, wpe)
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 3\)"):
        OPS.embedding(input_ids, position_ids[:, :2].contiguous(), wte, wpe)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        OPS.embedding(input_ids, position_ids, wte, wpe, inputs_embeds=randn(2, 3, 16, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"inputs_embeds has shape \(2, 3, 8\)"):
        OPS.embedding(None, position_ids, wte, wpe, inputs_embeds=randn(2, 3, 8, dtype=torch.float32))
    with pytest.raises(ValueError, match="token_type_ids has shape"):
        OPS.embedding(input_ids, position_ids, wte, wpe, input_ids[:1].contiguous())
    with pytest.raises(ValueError, match="wpe has width 12"):
        OPS.embedding(input_ids, position_ids, wte, randn(8, 12, dtype=torch.float32))
    with pytest.raises(ValueError, match="wpe has dtype torch.float16"):
        OPS.embedding(input_ids, position_ids, wte, wpe.half())
    with pytest.raises(ValueError, match="position_ids is empty"):
        OPS.embedding(input_ids[:0], position_ids[:0], wte, wpe)
    with pytest.raises(ValueError, match="meta"):
        OPS.embedding(input_ids.to("meta"), position_ids, wte, wpe)


def cache_state(rows: int, n_slots: int, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """A cache's per-row state mid-generation: rows of different lengths, padding among their slots."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, n_slots, (rows,), generator=g)
    key_mask = (torch.rand(rows, n_slots, generator=g) > 0.3).to(torch.int32)
    next_position = key_mask.sum(-1) + torch.randint(0, 3, (rows,), generator=g)
    mask = (torch.rand(batch, 1, generator=g) > 0.4).to(torch.int32)
    mask[0] = 1
    state = dict(attention_mask=mask, new_tokens=torch.ones(1, dtype=torch.int64), lengths=lengths,
                 next_position=next_position, key_mask=key_mask)
    return {name: t.to(DEVICE) for name, t in state.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("positions", ["given", "from the mask", "the slots"])
@pytest.mark.parametrize("batch,rows,width,with_types,with_embeds", [(1, 1, 64, False, False), (3, 5, 80, True, False), (4, 4, 1600, False, True)])
def test_decode_embedding_matches_reference_and_keeps_the_cache_books(ops, batch, rows, width, with_types, with_embeds, positions, dtype):
    vocab, n_slots = 97, 24
    wte, wpe = randn(vocab, width, dtype=dtype), randn(n_slots + 3, width, dtype=dtype)
    input_ids = None if with_embeds else ids(vocab, batch, 1)
    embeds = randn(batch, 1, width, dtype=dtype) if with_embeds else None
    token_types = ids(vocab, batch, 1) if with_types else None
    position_ids = ids(n_slots, batch, 1, dtype=torch.int32) if positions == "given" else None
    state = cache_state(rows, n_slots, batch, seed=batch + width)
    expected, in_dtype = ({name: t.clone() for name, t in state.items()} for _ in range(2))
    with poisoned_allocations():
        out, slots = ops.decode_embedding(
            input_ids, position_ids, wte, wpe, token_types, embeds, **state, slot_positions=positions == "the slots"
        )
    oracle, oracle_slots = reference.decode_embedding(
        input_ids, position_ids, *as_float64(wte, wpe), token_types, *as_float64(embeds), **expected,
        slot_positions=positions == "the slots",
    )
    same_dtype, _ = reference.decode_embedding(
        input_ids, position_ids, wte, wpe, token_types, embeds, **in_dtype, slot_positions=positions == "the slots"
    )
    assert_close(out.values, oracle, same_dtype)
    assert torch.equal(slots, oracle_slots)
    for name in ("lengths", "next_position", "key_mask"):
        assert torch.equal(state[name], expected[name]), name
    if out.moments is not None:
        assert_moments_describe(out.moments, out.values)


def test_decode_embedding_positions_follow_the_cache():
    lengths, next_position = torch.tensor([5, 9, 2]), torch.tensor([4, 9, 0])
    key_mask = torch.zeros(3, 12, dtype=torch.int32)
    mask = torch.tensor([[1], [0]], dtype=torch.int32)
    state = dict(attention_mask=mask, new_tokens=torch.tensor([1]), lengths=lengths, next_position=next_position, key_mask=key_mask)
    wte, wpe = torch.zeros(4, 2, dtype=torch.float64), torch.arange(24, dtype=torch.float64).view(12, 2)
    token = torch.zeros(2, 1, dtype=torch.int64)
    x, slots = reference.decode_embedding(token, None, wte, wpe, **state)
    assert slots.tolist() == [[5], [9]] and x[:, 0, 0].tolist() == [8.0, 2.0], "the next position; padding takes 1"
    assert lengths.tolist() == [6, 10, 2] and next_position.tolist() == [5, 9, 0], "the third row is not in the batch"
    assert key_mask[0, 5] == 1 and key_mask[1, 9] == 0 and key_mask.sum() == 1
    x, slots = reference.decode_embedding(token, None, wte, wpe, **state, slot_positions=True)
    assert slots.tolist() == [[6], [10]] and x[:, 0, 0].tolist() == [12.0, 20.0], "past + 0, padding or not"


def test_decode_embedding_validation_names_the_offending_value():
    wte, wpe = randn(10, 16, dtype=torch.float32), randn(8, 16, dtype=torch.float32)
    state = cache_state(3, 8, 2, seed=0)
    token = ids(10, 2, 1)
    with pytest.raises(ValueError, match="attention_mask has dtype torch.int64"):
        OPS.decode_embedding(token, None, wte, wpe, **{**state, "attention_mask": state["attention_mask"].long()})
    with pytest.raises(ValueError, match=r"one token per row; attention_mask has shape \(1, 2\)"):
        OPS.decode_embedding(token, None, wte, wpe, **{**state, "attention_mask": state["attention_mask"].view(1, 2)})
    with pytest.raises(ValueError, match="a batch of 2 rows needs lengths, next_position and key_mask of as many rows"):
        OPS.decode_embedding(token, None, wte, wpe, **{**state, "lengths": state["lengths"][:1]})
    with pytest.raises(ValueError, match="next_position has dtype torch.int32"):
        OPS.decode_embedding(token, None, wte, wpe, **{**state, "next_position": state["next_position"].int()})
    with pytest.raises(ValueError, match=r"new_tokens has shape \(2,\)"):
        OPS.decode_embedding(token, None, wte, wpe, **{**state, "new_tokens": state["new_tokens"].repeat(2)})
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 2\)"):
        OPS.decode_embedding(ids(10, 2, 2), None, wte, wpe, **state)
    with pytest.raises(ValueError, match="key_mask must be contiguous"):
        OPS.decode_embedding(token, None, wte, wpe, **{**state, "key_mask": state["key_mask"].T.contiguous().T})
