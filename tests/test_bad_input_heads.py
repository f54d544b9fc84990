"""Bad input to the drop-in classes (and to an accelerated transformers model) is a ValueError naming
the argument and the value, raised before the forward runs: a cache continued after a rejected call
gives what it gives without that call."""

import copy

import pytest
import torch

import tritongpt2
from checkpoints import save_model

transformers = pytest.importorskip("transformers")

FIRST = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
MORE = torch.tensor([[13, 14], [15, 16]])
LONG = torch.long

# Wrong inputs, the same for every class: each replaces part of a call that continues a cache of FIRST with MORE.
INPUT_CASES = [
    (dict(input_ids=[[13, 14], [15, 16]]), "input_ids must be a torch.Tensor of .batch, seq., got a list"),
    (dict(input_ids=torch.tensor(13)), r"input_ids must be a torch.Tensor of .batch, seq., got a tensor of shape \(\)"),
    (dict(input_ids=MORE.bool()), "input_ids has dtype torch.bool; expected an integer dtype"),
    (dict(input_ids=MORE.float()), "input_ids has dtype torch.float32; expected an integer dtype"),
    (dict(input_ids=torch.zeros(2, 0, dtype=LONG)), r"input_ids is empty \(shape \(2, 0\)\)"),
    (dict(input_ids=torch.zeros(0, 2, dtype=LONG)), r"input_ids is empty \(shape \(0, 2\)\)"),
    (dict(input_ids=torch.tensor([[13, 300], [15, 16]])), "input_ids holds 300; values must be < 300"),
    (dict(attention_mask=torch.ones(2, 3)), r"attention_mask has shape \(2, 3\); expected \(2, 2\) like input_ids"),
    (dict(attention_mask=torch.ones(3)), r"attention_mask has shape \(3,\); expected \[batch, seq\].* 2 rows of 2"),
    (dict(attention_mask=torch.ones(2, 0)), r"attention_mask has shape \(2, 0\)"),
    (dict(attention_mask=[[1, 1], [1, 1]]), "attention_mask must be a torch.Tensor of .batch, seq. of 0 and 1, got a list"),
    (dict(attention_mask=torch.tensor([[1, 2], [1, 1]])), r"attention_mask holds values other than 0 and 1: \[1, 2\]"),
    (dict(token_type_ids=torch.zeros(2, 3, dtype=LONG)), r"token_type_ids must be a tensor of \[batch, 2\] like the inputs, got a tensor of shape \(2, 3\)"),
    (dict(token_type_ids=[[0, 0], [0, 0]]), r"token_type_ids must be a tensor of \[batch, 2\] like the inputs, got a list"),
    (dict(token_type_ids=torch.zeros(2, 2, dtype=torch.bool)), "token_type_ids has dtype torch.bool"),
    (dict(token_type_ids=torch.full((2, 2), 300)), "token_type_ids holds 300"),
    (dict(position_ids=torch.zeros(3, 2, dtype=LONG)), "position_ids has 3 rows of 2; the inputs have 2"),
    (dict(position_ids=torch.tensor(4)), r"position_ids must be a tensor of \[batch, 2\] like the inputs, got a tensor of shape \(\)"),
    (dict(position_ids=[[4, 5], [4, 5]]), r"position_ids must be a tensor of \[batch, 2\] like the inputs, got a list"),
    (dict(position_ids=torch.tensor([[4.0, 5.0]])), "position_ids has dtype torch.float32"),
    (dict(position_ids=torch.tensor([[4, 64]])), "position_ids holds 64; values must be < 64"),
    (dict(head_mask=torch.ones(3)), r"head_mask must be \[5\] or \[2, 5\]"),
]

# Wrong targets, by class.
LABEL_CASES = {
    "GPT2LMHeadModel": [
        (dict(labels=torch.zeros(2, 3, dtype=LONG)), r"labels has shape \(2, 3\); expected \(2, 2\)"),
        (dict(labels=torch.tensor([[1, 300], [1, 2]])), r"labels holds 300; values must be in \[0, 300\) \(or -100, ignored\)"),
        (dict(labels=torch.tensor([[1, -5], [1, 2]])), "labels holds -5"),
        (dict(labels=MORE.float()), "labels has dtype torch.float32; expected an integer dtype"),
        (dict(labels=MORE.bool()), "labels has dtype torch.bool"),
        (dict(labels=[[1, 2], [3, 4]]), "labels must be a torch.Tensor, got list"),
        (dict(labels=torch.tensor([[1, -100], [1, 2]]), ignore_index=-1), r"labels holds -100; values must be in \[0, 300\) \(or -1, ignored\)"),
        (dict(labels=MORE, shift_labels=torch.zeros(2, 3, dtype=LONG)), r"shift_labels has shape \(2, 3\)"),
        (dict(labels=MORE, logits_to_keep=1), "labels need the logits of all 2 positions, but logits_to_keep=1 keeps 1"),
        (dict(logits_to_keep=-1), "logits_to_keep=-1 must be >= 0"),
        (dict(logits_to_keep=torch.tensor([0, 2])), "logits_to_keep holds 2, not a position of 2"),
        (dict(logits_to_keep=1.5), "logits_to_keep must be an int or a 1-D tensor of positions, got 1.5"),
    ],
    "GPT2ForSequenceClassification": [
        (dict(labels=torch.tensor([0, 3])), r"labels holds 3; values must be in \[0, 3\)"),
        (dict(labels=torch.tensor([0, 1, 2])), r"labels has shape \(3,\); expected \(2,\)"),
        (dict(labels=[0, 1]), "labels must be a torch.Tensor, got list"),
        (dict(labels=torch.rand(2)), r"labels has shape \(2,\); expected \(2, 3\)"),  # float: multi-label, one row of 3 each
        (dict(labels=torch.rand(2, 3) + 0j), "labels has dtype torch.complex64; expected real numbers"),
    ],
    "GPT2ForTokenClassification": [
        (dict(labels=torch.full((2, 2), 4)), r"labels holds 4; values must be in \[0, 4\)"),
        (dict(labels=torch.zeros(2, 3, dtype=LONG)), r"labels has shape \(2, 3\); expected \(2, 2\)"),
        (dict(labels=torch.zeros(2, 2)), "labels has dtype torch.float32"),
    ],
    "GPT2DoubleHeadsModel": [
        (dict(labels=torch.full((2, 2), 300)), "labels holds 300"),
        (dict(mc_token_ids=torch.tensor([2, 0])), r"mc_token_ids holds 2; values must be in \[0, 2\)$"),
        (dict(mc_token_ids=torch.tensor([[1], [0]])), r"mc_token_ids has shape \(2, 1\); expected \(2,\)"),
        (dict(mc_token_ids=torch.tensor([1.0, 0.0])), "mc_token_ids has dtype torch.float32"),
        # Two rows without choices: transformers' mc_logits is then one row of 2.
        (dict(mc_labels=torch.tensor([2])), r"mc_labels holds 2; values must be in \[0, 2\)"),
        (dict(mc_labels=torch.tensor([0, 1])), r"mc_labels has shape \(2,\); expected \(1,\)"),
    ],
}
MAIN_OUTPUT = {
    "GPT2Model": lambda o: o.last_hidden_state,
    "GPT2LMHeadModel": lambda o: o.logits,
    "GPT2DoubleHeadsModel": lambda o: o.mc_logits,
    "GPT2ForSequenceClassification": lambda o: o.logits,
    "GPT2ForTokenClassification": lambda o: o.logits,
}
CONFIGS = {"GPT2ForSequenceClassification": dict(pad_token_id=0, num_labels=3), "GPT2ForTokenClassification": dict(num_labels=4)}
# transformers' token classification returns no cache: its calls start afresh.
WITHOUT_CACHE = {"GPT2ForTokenClassification"}
CACHE_CASES = [(dict(input_ids=torch.tensor([[13, 14]])), "batch 1 does not match the 2 rows already in the cache")]
# Every input case on the LM head; the trunk is shared, so the other classes take a sample of them.
SAMPLE = [INPUT_CASES[i] for i in (1, 2, 4, 5, 11, 18)]
CASES = [
    (name, *case)
    for name in MAIN_OUTPUT
    for case in (INPUT_CASES if name == "GPT2LMHeadModel" else SAMPLE) + LABEL_CASES.get(name, [])
    + (CACHE_CASES if name not in WITHOUT_CACHE else [])
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: save_model(tmp_path_factory.mktemp(name), name, **CONFIGS.get(name, {})) for name in [*MAIN_OUTPUT, "GPT2ForQuestionAnswering"]}


@pytest.fixture(scope="module")
def models(checkpoints):
    return {name: getattr(tritongpt2, name).from_pretrained(folder, backend="torch") for name, (folder, _) in checkpoints.items()}


@pytest.fixture(scope="module")
def accelerated(checkpoints):
    return {name: tritongpt2.accelerate(copy.deepcopy(model), backend="torch") for name, (_, model) in checkpoints.items()}


def refused_then_continued(model, name, kwargs, message):
    """The main output of continuing a cache after a refused call, and without that call (of a call
    after the refused one, for a class without a cache)."""
    main = MAIN_OUTPUT[name]
    with torch.no_grad():
        if name in WITHOUT_CACHE:
            expected = main(model(input_ids=MORE))
            with pytest.raises(ValueError, match=message):
                model(**{"input_ids": MORE, **kwargs})
            return main(model(input_ids=MORE)), expected
        expected = main(model(input_ids=MORE, past_key_values=model(input_ids=FIRST, use_cache=True).past_key_values))
        cache = model(input_ids=FIRST, use_cache=True).past_key_values
        with pytest.raises(ValueError, match=message):
            model(**{"input_ids": MORE, "past_key_values": cache, **kwargs})
        assert cache.get_seq_length() == 4
        return main(model(input_ids=MORE, past_key_values=cache)), expected


@pytest.mark.parametrize("name,kwargs,message", CASES)
def test_bad_input_is_refused_and_the_cache_stays_usable(models, name, kwargs, message):
    got, expected = refused_then_continued(models[name], name, kwargs, message)
    assert torch.equal(got, expected)
    assert models[name].config.problem_type is None, "a refused call sets no problem type"


@pytest.mark.parametrize("name,kwargs,message", CASES)
def test_accelerated_models_refuse_it_the_same_way(accelerated, name, kwargs, message):
    got, expected = refused_then_continued(accelerated[name], name, kwargs, message)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kwargs,message", [
    (dict(start_positions=torch.tensor([1.0, 0.0]), end_positions=torch.tensor([1, 0])), "start_positions has dtype torch.float32"),
    (dict(start_positions=torch.tensor([1, 0]), end_positions=torch.tensor([1, 0, 2])), r"end_positions has shape \(3,\); expected \(2,\) or \(2, 1\)"),
    (dict(start_positions=[1, 0], end_positions=torch.tensor([1, 0])), "start_positions must be a torch.Tensor, got list"),
    (dict(input_ids=torch.zeros(2, 0, dtype=LONG)), "input_ids is empty"),
])
@pytest.mark.parametrize("kind", ["drop-in", "accelerated"])
def test_question_answering_refuses_bad_positions(models, accelerated, kwargs, message, kind):
    model = (models if kind == "drop-in" else accelerated)["GPT2ForQuestionAnswering"]
    with torch.no_grad():
        expected = model(input_ids=FIRST).start_logits
        with pytest.raises(ValueError, match=message):
            model(**{"input_ids": FIRST, **kwargs})
        assert torch.equal(model(input_ids=FIRST).start_logits, expected)


def test_a_batch_without_pad_token_is_refused_before_the_cache_moves(tmp_path):
    folder, _ = save_model(tmp_path, "GPT2ForSequenceClassification")
    model = tritongpt2.GPT2ForSequenceClassification.from_pretrained(folder, backend="torch")
    cache = model(input_ids=FIRST[:1], use_cache=True).past_key_values
    with pytest.raises(ValueError, match="Cannot handle batch sizes > 1 if no padding token is defined"):
        model(input_ids=FIRST, past_key_values=cache)
    assert cache.get_seq_length() == 4
