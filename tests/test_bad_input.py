"""Bad input is a ValueError naming the value, raised before anything is written; the engine keeps
answering correctly afterwards."""

import pytest
import torch

from checkpoints import save_model
from tritongpt2.engine.engine import Engine

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder, _ = save_model(tmp_path_factory.mktemp("bad"))
    return Engine.from_pretrained(folder, backend="torch", max_batch=2, max_seq=32)


def cache_state(engine):
    c = engine.cache
    return [t.clone() for t in (c.keys, c.values, c.key_mask, c.lengths, c.next_position)] + [c.used, c.batch]


def assert_unchanged(before, after):
    for a, b in zip(before, after):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


IDS = torch.tensor([[5, 6, 7, 8]])

PREFILL_CASES = [
    (dict(input_ids=torch.tensor([[5, 300]])), "input_ids holds 300; values must be < 300"),
    (dict(input_ids=torch.tensor([[5, -1]])), "input_ids holds -1; values must be >= 0"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "input_ids is empty"),
    (dict(input_ids=torch.zeros(3, 2, dtype=torch.long)), "batch 3 is larger than the cache's max_batch=2"),
    (dict(input_ids=torch.zeros(2, 30, dtype=torch.long)), "30 new tokens after 3 cached ones exceed the cache.s max_seq=32"),
    (dict(input_ids=torch.zeros(1, 2, dtype=torch.long)), "batch 1 does not match the 2 rows already in the cache"),
    (dict(input_ids=IDS.float()), "input_ids has dtype torch.float32"),
    (dict(input_ids=IDS.to("meta")), "input_ids is on meta"),
    (dict(input_ids=[[1, 2]]), "input_ids must be a torch.Tensor, got list"),
    (dict(input_ids=torch.tensor(5)), r"input_ids must be \[batch, seq\] \(or \[seq\]\), got shape \(\)"),
    (dict(input_ids=IDS.bool()), "input_ids has dtype torch.bool; expected an integer dtype"),
    (dict(input_ids=torch.zeros(0, 2, dtype=torch.long)), r"input_ids is empty \(shape \(0, 2\)\)"),
    (dict(input_ids=IDS, attention_mask=[[1, 1, 1, 1]]), "attention_mask must be a torch.Tensor, got list"),
    (dict(input_ids=IDS, token_type_ids=IDS.bool()), "token_type_ids has dtype torch.bool"),
    (dict(input_ids=IDS, position_ids=[[0, 1, 2, 3]]), "position_ids must be a torch.Tensor, got list"),
    (dict(input_ids=IDS, attention_mask=torch.tensor([[1, 1, 2, 1]])), "attention_mask holds values other than 0 and 1"),
    (dict(input_ids=IDS, attention_mask=torch.ones(1, 3)), r"attention_mask has shape \(1, 3\)"),
    (dict(input_ids=IDS, token_type_ids=torch.tensor([[0, 0, 0, 300]])), "token_type_ids holds 300"),
    (dict(input_ids=IDS, position_ids=torch.tensor([[0, 1, 2, 64]])), "position_ids holds 64; values must be < 64"),
    (dict(input_ids=IDS, logits="first"), "logits='first'"),
]


PROMPTS = torch.tensor([[1, 2, 3], [4, 5, 6]])
MORE = torch.tensor([[7, 8], [9, 10]])


@pytest.mark.parametrize("kwargs,message", PREFILL_CASES)
def test_bad_prefill_is_refused_before_anything_is_written(engine, kwargs, message):
    reference = engine.prefill(IDS).logits
    engine.prefill(PROMPTS)
    continued = engine.prefill(MORE, reset=False).logits
    engine.prefill(PROMPTS)
    before = cache_state(engine)
    with pytest.raises(ValueError, match=message):
        engine.prefill(reset=False, **kwargs)
    assert_unchanged(before, cache_state(engine))
    assert torch.equal(engine.prefill(MORE, reset=False).logits, continued)
    assert torch.equal(engine.prefill(IDS).logits, reference)


def test_bad_decode_is_refused_before_anything_is_written(engine):
    engine.reset()
    with pytest.raises(ValueError, match="decode needs a prefilled cache"):
        engine.decode(torch.tensor([1]))
    engine.prefill(PROMPTS)
    continued = engine.decode(torch.tensor([7, 9])).logits
    engine.prefill(PROMPTS)
    before = cache_state(engine)
    for bad, message in [
        (torch.tensor([1]), "batch 1 does not match the 2 rows already in the cache"),
        (torch.tensor([[1, 2], [3, 4]]), "one token per row"),
        (torch.tensor([1, 999]), "input_ids holds 999"),
        (torch.tensor([True, False]), "input_ids has dtype torch.bool"),
        (torch.tensor(7), r"input_ids must be \[batch, seq\] \(or \[seq\]\), got shape \(\)"),
        ([7, 9], "input_ids must be a torch.Tensor, got list"),
        (torch.zeros(0, dtype=torch.long), r"input_ids is empty \(shape \(0, 1\)\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            engine.decode(bad)
    with pytest.raises(ValueError, match="input_ids has dtype torch.bool"):
        engine.decode(torch.tensor([True, False]), check_ids=False)  # the dtype is known without reading the values
    assert_unchanged(before, cache_state(engine))
    assert torch.equal(engine.decode(torch.tensor([7, 9])).logits, continued)
    engine.prefill(PROMPTS)
    for _ in range(32 - 3):
        engine.decode(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="1 new tokens after 32 cached ones exceed the cache's max_seq=32"):
        engine.decode(torch.tensor([1, 2]))


def test_engine_size_limits(tmp_path):
    folder, _ = save_model(tmp_path)
    with pytest.raises(ValueError, match="max_seq=65 must be between 1 and n_positions=64"):
        Engine.from_pretrained(folder, backend="torch", max_seq=65)
    with pytest.raises(ValueError, match="max_batch=0"):
        Engine.from_pretrained(folder, backend="torch", max_batch=0)
