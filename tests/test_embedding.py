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
