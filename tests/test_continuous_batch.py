"""The engine's continuous batching API on its own: rows joining a running decode batch, leaving
it, and per-row reset, against the engine's own generation of each prompt alone."""

import pytest
import torch

from checkpoints import save_model
from tritongpt2.engine.continuous import ContinuousBatch
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.generation import generate
from tritongpt2.engine.graphs import EagerGraphs
from tritongpt2.engine.options import EngineOptions

pytest.importorskip("transformers")
PROMPTS = [[5, 17, 42], [250, 3, 3, 9, 100, 7, 61], [77], [12, 13, 14, 15, 16, 1, 2, 3, 4, 5, 6, 7, 8]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("continuous"))[0]


@pytest.fixture(scope="module")
def engine(folder):
    return Engine.from_pretrained(folder, backend="torch", max_batch=4, max_seq=40)


def alone(engine: Engine, prompt: list[int], new: int) -> list[int]:
    out = generate(engine, torch.tensor([prompt]), max_new_tokens=new, eos_token_id=[])
    return out[0, len(prompt):].tolist()


def test_rows_joining_and_leaving_a_running_batch_generate_what_each_prompt_does_alone(engine):
    expected = [alone(engine, prompt, 12) for prompt in PROMPTS]
    assert len({tuple(tokens) for tokens in expected}) == len(PROMPTS)  # the model is not blind to its prompt
    batch = ContinuousBatch(engine)
    generated: dict[int, list[int]] = {}
    row_of: dict[int, int] = {}
    pending = list(range(len(PROMPTS)))
    next_logits: dict[int, torch.Tensor] = {}
    for step in range(40):
        # A new prompt joins every third step, while the others are mid-generation.
        if pending and step % 3 == 0:
            index = pending.pop(0)
            (row,), logits = batch.join(PROMPTS[index])
            row_of[index], next_logits[row], generated[index] = row, logits, []
        tokens = {}
        for index, row in list(row_of.items()):
            generated[index].append(int(next_logits[row].argmax()))
            if len(generated[index]) == 12:
                batch.leave([row])
                del row_of[index], next_logits[row]
            else:
                tokens[row] = generated[index][-1]
        if tokens:
            next_logits = batch.step(tokens)
        if not pending and not row_of:
            break
    assert [generated[i] for i in range(len(PROMPTS))] == expected
    assert batch.active_rows == [] and batch.free_rows == [0, 1, 2, 3]


def test_under_graphs_steps_replay_the_decode_batch_buckets(folder, engine):
    """The graph runner's CPU stand-in: a step of B rows replays the decode graph of B's bucket, and
    the tokens are those of the eager engine."""
    graphed = Engine(engine.config, engine.weights, EngineOptions(backend="torch", max_batch=4, max_seq=40),
                     graph_capture=EagerGraphs())
    batch = ContinuousBatch(graphed)
    (first,), logits = batch.join(PROMPTS[0])
    tokens = [int(logits.argmax())]
    for step in range(8):
        if step == 2:
            (other,), other_logits = batch.join(PROMPTS[1])
            other_tokens = [int(other_logits.argmax())]
        rows = {first: tokens[-1], **({other: other_tokens[-1]} if step >= 2 else {})}
        out = batch.step(rows)
        tokens.append(int(out[first].argmax()))
        if step >= 2:
            other_tokens.append(int(out[other].argmax()))
    assert tokens == alone(engine, PROMPTS[0], 9)
    assert other_tokens == alone(engine, PROMPTS[1], 7)
    decode_buckets = sorted(key[0] for key in graphed.graphs.keys() if key[1] == 1)
    assert decode_buckets == [1, 2]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_prompts_of_different_lengths_joining_in_one_step_generate_what_each_does_alone(engine, graphs):
    """One padded prefill for three prompts (one of them sampled twice) while another row decodes;
    one joins a row freed by a longer sequence, whose stale slots must not be seen."""
    joining = [PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    expected = [alone(engine, prompt, 10) for prompt in joining]
    options = EngineOptions(backend="torch", max_batch=6, max_seq=40)
    runner = Engine(engine.config, engine.weights, options, graph_capture=EagerGraphs() if graphs else None)
    batch = ContinuousBatch(runner)
    (first,), first_logits = batch.join(PROMPTS[3])
    (stale,), stale_logits = batch.join(PROMPTS[3] + PROMPTS[1])
    first_tokens = [int(first_logits.argmax())]
    out = batch.step({first: first_tokens[-1], stale: int(stale_logits.argmax())})
    first_tokens.append(int(out[first].argmax()))
    batch.leave([stale])

    prefills = []
    prefill = runner.prefill
    runner.prefill = lambda *args, **kwargs: prefills.append(args[0].shape) or prefill(*args, **kwargs)
    joined = batch.join_many(joining, copies=[1, 2, 1])
    runner.prefill = prefill
    assert prefills == [(3, len(PROMPTS[1]))]
    assert [rows for rows, _ in joined] == [[stale], [2, 3], [4]]
    for (rows, _), prompt in zip(joined, joining):
        assert runner.cache.lengths[rows].tolist() == [len(prompt)] * len(rows)
        assert runner.cache.key_mask[rows].sum(-1).tolist() == [len(prompt)] * len(rows)
    generated = {row: [int(logits.argmax())] for rows, logits in joined for row in rows}
    for _ in range(9):
        out = batch.step({first: first_tokens[-1], **{row: tokens[-1] for row, tokens in generated.items()}})
        first_tokens.append(int(out[first].argmax()))
        for row, tokens in generated.items():
            tokens.append(int(out[row].argmax()))
    assert [generated[rows[0]] for rows, _ in joined] == expected
    assert generated[3] == generated[2]
    assert first_tokens == alone(engine, PROMPTS[3], 11)


def test_a_freed_row_is_reused_and_reset_rows_leaves_the_other_rows_alone(engine):
    batch = ContinuousBatch(engine)
    (first,), _ = batch.join(PROMPTS[0])
    (second,), logits = batch.join(PROMPTS[1])
    assert (first, second) == (0, 1)
    batch.leave([first])
    assert engine.cache.lengths[first] == 0 and not engine.cache.key_mask[first].any()
    assert int(engine.cache.lengths[second]) == len(PROMPTS[1])
    (reused,), _ = batch.join(PROMPTS[2])
    assert reused == 0
    # The row that stayed decodes as if nothing had happened around it.
    tokens = [int(logits.argmax())]
    for _ in range(5):
        out = batch.step({reused: 1, second: tokens[-1]})
        tokens.append(int(out[second].argmax()))
    assert tokens == alone(engine, PROMPTS[1], 6)


def test_several_copies_of_one_prompt_and_room_per_row(engine):
    batch = ContinuousBatch(engine)
    rows, logits = batch.join(PROMPTS[3], copies=3)
    assert rows == [0, 1, 2] and batch.free_rows == [3]
    assert [batch.room(row) for row in rows] == [40 - len(PROMPTS[3])] * 3
    out = batch.step({row: int(logits.argmax()) for row in rows})
    # Equal up to the batch's floating-point rounding (a CPU matmul's sums depend on its row count).
    for row in (1, 2):
        torch.testing.assert_close(out[row], out[0], rtol=1e-5, atol=1e-5)
    assert batch.room(0) == 40 - len(PROMPTS[3]) - 1


def test_bad_calls_are_refused_by_name(engine):
    batch = ContinuousBatch(engine)
    with pytest.raises(ValueError, match="prompt"):
        batch.join([engine.config.vocab_size])
    with pytest.raises(ValueError, match="max_seq=40"):
        batch.join(list(range(41)))
    with pytest.raises(ValueError, match="5 rows asked for, 4 free"):
        batch.join([1], copies=5)
    (row,), _ = batch.join(list(range(1, 40)))
    with pytest.raises(ValueError, match="each row in use"):
        batch.step({row + 1: 1})
    batch.step({row: 1})
    with pytest.raises(ValueError, match="full"):
        batch.step({row: 1})
    batch.leave([row])
    with pytest.raises(ValueError, match="already free"):
        batch.leave([row])
