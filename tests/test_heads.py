"""The six drop-in classes and accelerate() against transformers, on random-weight checkpoints. The
references run on the CPU; ours take inputs on their backend's device (numerics.on), and their
outputs come back to the CPU to be compared."""

import copy

import pytest
import torch

from checkpoints import in_float64, save_model
from numerics import BACKEND, assert_close, on, relative_error
import tritongpt2
from tritongpt2.kernels import cpu_matmul
from tritongpt2.kernels.packed_weight import is_packed

transformers = pytest.importorskip("transformers")

BACKENDS = ["torch", BACKEND]


def close(ours, theirs, oracle, mask=None):
    """ours against transformers in float64 (oracle), allowed numerics.TOLERANCE for the dtype plus
    twice the error transformers makes in the same dtype (theirs): a tolerance earned, not guessed.
    Compared on the CPU, where the references are."""
    ours = ours.cpu()
    if mask is not None:
        mask = mask.cpu()
        ours, theirs, oracle = ours[mask], theirs[mask], oracle[mask]
    assert_close(ours, oracle, theirs)


def batch(rows=3, seq=7, seed=0, pad_left=2, pad_right=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 299, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad_left] = 0
    mask[1, seq - pad_right:] = 0
    return ids, mask


def hf_run(model, **kwargs):
    """transformers' outputs in the model's dtype, and the same call in float64 (the oracle)."""
    doubled = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    with torch.no_grad():
        return model(**kwargs), in_float64(model)(**doubled)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_model_hidden_states_and_cache(tmp_path, backend):
    folder, hf = save_model(tmp_path, "GPT2Model")
    ours = tritongpt2.GPT2Model.from_pretrained(folder, backend=backend)
    ids, mask = batch()
    expected, oracle = hf_run(hf, input_ids=ids, attention_mask=mask, output_hidden_states=True)
    got = ours(input_ids=on(backend, ids), attention_mask=on(backend, mask), output_hidden_states=True)
    real = mask.bool()
    close(got.last_hidden_state, expected.last_hidden_state, oracle.last_hidden_state, real)
    assert len(got.hidden_states) == len(expected.hidden_states) == 3
    for a, b, c in zip(got.hidden_states, expected.hidden_states, oracle.hidden_states):
        close(a, b, c, real)
    assert got[0] is got.last_hidden_state and got["hidden_states"] is got.hidden_states
    assert got.past_key_values is got.cache and got.past_key_values.get_seq_length() == 7
    as_tuple = ours(input_ids=on(backend, ids), attention_mask=on(backend, mask), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    with pytest.raises(NotImplementedError, match="output_attentions"):
        ours(input_ids=on(backend, ids), output_attentions=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_head_logits_loss_and_continuation(tmp_path, backend):
    folder, hf = save_model(tmp_path)
    ours = tritongpt2.GPT2LMHeadModel.from_pretrained(folder, backend=backend)
    ids, mask = batch(rows=2, seq=9, pad_right=0)
    labels = ids.clone()
    labels[0, :3] = -100
    expected, oracle = hf_run(hf, input_ids=ids, attention_mask=mask, labels=labels)
    got = ours(input_ids=on(backend, ids), attention_mask=on(backend, mask), labels=on(backend, labels))
    close(got.logits, expected.logits, oracle.logits, mask.bool())
    assert abs(got.loss.item() - expected.loss.item()) < 1e-4 * abs(expected.loss.item())
    assert ours(input_ids=on(backend, ids), logits_to_keep=1).logits.shape == (2, 1, 300)

    first = ours(input_ids=on(backend, ids[:, :5]), attention_mask=on(backend, mask[:, :5]), use_cache=True)
    second = ours(input_ids=on(backend, ids[:, 5:]), attention_mask=on(backend, mask), past_key_values=first.past_key_values)
    full, full_oracle = hf_run(hf, input_ids=ids, attention_mask=mask)
    close(second.logits, full.logits[:, 5:], full_oracle.logits[:, 5:])
    # As transformers' caches: the same object, continued in place.
    assert second.past_key_values is first.past_key_values and first.past_key_values.get_seq_length() == 9
    with pytest.raises(ValueError, match="past_key_values is a DynamicCache; the tritongpt2 forward continues only from"):
        ours(input_ids=on(backend, ids[:, 5:]), past_key_values=expected.past_key_values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token_steps_are_numbered_as_transformers_forward_numbers_them(tmp_path, backend):
    # transformers' forward gives a new token position past + 0 whatever the mask: after a left-padded
    # prompt that is not the count of real tokens (generate's numbering, the engine's default).
    folder, hf = save_model(tmp_path)
    ours = tritongpt2.GPT2LMHeadModel.from_pretrained(folder, backend=backend)
    ids, mask = batch(rows=2, seq=8, pad_left=3, pad_right=0)
    full, full_oracle = hf_run(hf, input_ids=ids, attention_mask=mask)
    out = ours(input_ids=on(backend, ids[:, :6]), attention_mask=on(backend, mask[:, :6]))
    for t in (6, 7):
        step = dict(input_ids=on(backend, ids[:, t:t + 1]), attention_mask=on(backend, mask[:, :t + 1]))
        out = ours(**step, past_key_values=out.past_key_values)
        close(out.logits, full.logits[:, t:t + 1], full_oracle.logits[:, t:t + 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_head_generate_equals_transformers(tmp_path, backend):
    folder, hf = save_model(tmp_path)
    ours = tritongpt2.GPT2LMHeadModel.from_pretrained(folder, backend=backend)
    ids, mask = batch(rows=2, seq=6, pad_left=3, pad_right=0)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = ours.generate(input_ids=on(backend, ids), attention_mask=on(backend, mask), max_new_tokens=6, pad_token_id=0)
    assert torch.equal(got.cpu(), expected)
    with pytest.raises(NotImplementedError, match="num_beams"):
        ours.generate(input_ids=on(backend, ids), num_beams=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "problem,num_labels,labels",
    [
        ("regression", 1, torch.tensor([0.5, -1.0, 2.0])),
        ("single_label_classification", 3, torch.tensor([0, 2, 1])),
        ("multi_label_classification", 3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])),
    ],
)
def test_sequence_classification_pools_the_last_real_token(tmp_path, backend, problem, num_labels, labels):
    folder, hf = save_model(tmp_path, "GPT2ForSequenceClassification", pad_token_id=0, num_labels=num_labels)
    ours = tritongpt2.GPT2ForSequenceClassification.from_pretrained(folder, backend=backend)
    ids, mask = batch()
    ids[mask == 0] = 0
    expected, oracle = hf_run(hf, input_ids=ids, attention_mask=mask, labels=labels)
    got = ours(input_ids=on(backend, ids), attention_mask=on(backend, mask), labels=on(backend, labels))
    close(got.logits, expected.logits, oracle.logits)
    assert abs(got.loss.item() - expected.loss.item()) < 1e-4 * max(1.0, abs(expected.loss.item()))
    assert ours.config.problem_type == hf.config.problem_type == problem


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_int64_and_int32_labels_are_single_label_classification(tmp_path, dtype):
    # transformers infers single-label classification for both (its cross-entropy then refuses int32).
    folder, hf = save_model(tmp_path, "GPT2ForSequenceClassification", pad_token_id=0, num_labels=3)
    ours = tritongpt2.GPT2ForSequenceClassification.from_pretrained(folder, backend="torch")
    ids, mask = batch()
    ids[mask == 0] = 0
    labels = torch.tensor([0, 2, 1])
    expected, _ = hf_run(hf, input_ids=ids, attention_mask=mask, labels=labels)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels.to(dtype))
    assert ours.config.problem_type == hf.config.problem_type == "single_label_classification"
    assert abs(got.loss.item() - expected.loss.item()) < 1e-4 * expected.loss.item()


def test_integer_multi_label_indicators_are_taken_as_numbers(tmp_path):
    # transformers' BCE refuses int64 targets; they are the same 0 and 1 as float ones.
    folder, hf = save_model(tmp_path, "GPT2ForSequenceClassification", pad_token_id=0, num_labels=3,
                            problem_type="multi_label_classification")
    ours = tritongpt2.GPT2ForSequenceClassification.from_pretrained(folder, backend="torch")
    ids, _ = batch()
    labels = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0]])
    expected, _ = hf_run(hf, input_ids=ids, labels=labels.float())
    got = ours(input_ids=ids, labels=labels)
    assert abs(got.loss.item() - expected.loss.item()) < 1e-4 * expected.loss.item()


def test_sequence_classification_without_pad_token(tmp_path):
    folder, hf = save_model(tmp_path, "GPT2ForSequenceClassification")
    ours = tritongpt2.GPT2ForSequenceClassification.from_pretrained(folder, backend="torch")
    ids, _ = batch()
    with pytest.raises(ValueError, match="Cannot handle batch sizes > 1 if no padding token is defined"):
        ours(input_ids=ids)
    expected, oracle = hf_run(hf, input_ids=ids[:1])
    close(ours(input_ids=ids[:1]).logits, expected.logits, oracle.logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_classification(tmp_path, backend):
    folder, hf = save_model(tmp_path, "GPT2ForTokenClassification", num_labels=4)
    ours = tritongpt2.GPT2ForTokenClassification.from_pretrained(folder, backend=backend)
    ids, _ = batch()
    labels = torch.randint(0, 4, ids.shape)
    labels[0, :2] = -100
    expected, oracle = hf_run(hf, input_ids=ids, labels=labels, output_hidden_states=True)
    got = ours(input_ids=on(backend, ids), labels=on(backend, labels), output_hidden_states=True)
    close(got.logits, expected.logits, oracle.logits)
    assert abs(got.loss.item() - expected.loss.item()) < 1e-4 * expected.loss.item()
    assert got.hidden_states[-1].shape == (3, 7, 80)


@pytest.mark.parametrize("backend", BACKENDS)
def test_question_answering_clamps_positions(tmp_path, backend):
    folder, hf = save_model(tmp_path, "GPT2ForQuestionAnswering")
    ours = tritongpt2.GPT2ForQuestionAnswering.from_pretrained(folder, backend=backend)
    ids, _ = batch()
    start, end = torch.tensor([1, 40, 3]), torch.tensor([[4], [6], [-5]])
    expected, oracle = hf_run(hf, input_ids=ids, start_positions=start, end_positions=end)
    got = ours(input_ids=on(backend, ids), start_positions=on(backend, start), end_positions=on(backend, end))
    close(got.start_logits, expected.start_logits, oracle.start_logits)
    close(got.end_logits, expected.end_logits, oracle.end_logits)
    assert abs(got.loss.item() - expected.loss.item()) < 1e-4 * expected.loss.item()


SUMMARIES = [
    {"summary_type": "cls_index"},
    {"summary_type": "last", "summary_activation": "tanh"},
    {"summary_type": "first", "summary_use_proj": False},
    {"summary_type": "mean", "summary_proj_to_labels": False},
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("summary", SUMMARIES, ids=lambda s: s["summary_type"])
def test_double_heads_every_summary_option(tmp_path, backend, summary):
    folder, hf = save_model(tmp_path, "GPT2DoubleHeadsModel", **summary)
    ours = tritongpt2.GPT2DoubleHeadsModel.from_pretrained(folder, backend=backend)
    ids = torch.randint(0, 300, (2, 3, 6), generator=torch.Generator().manual_seed(5))
    mc_token_ids = torch.tensor([[5, 3, 4], [2, 5, 5]])
    mc_labels, labels = torch.tensor([2, 0]), ids.clone()
    kwargs = dict(input_ids=ids, mc_token_ids=mc_token_ids, labels=labels)
    if summary.get("summary_use_proj", True) and summary.get("summary_proj_to_labels", True):
        kwargs["mc_labels"] = mc_labels
    (expected, oracle), got = hf_run(hf, **kwargs), ours(**on(backend, kwargs))
    close(got.logits, expected.logits, oracle.logits)
    close(got.mc_logits, expected.mc_logits, oracle.mc_logits)
    assert abs(got.loss.item() - expected.loss.item()) < 1e-4 * expected.loss.item()
    if "mc_labels" in kwargs:
        assert abs(got.mc_loss.item() - expected.mc_loss.item()) < 1e-4 * max(1.0, expected.mc_loss.item())


def test_double_heads_default_cls_index_is_the_last_token(tmp_path):
    folder, hf = save_model(tmp_path, "GPT2DoubleHeadsModel", summary_type="cls_index")
    ours = tritongpt2.GPT2DoubleHeadsModel.from_pretrained(folder, backend="torch")
    ids = torch.randint(0, 300, (2, 3, 6), generator=torch.Generator().manual_seed(6))
    expected, oracle = (out.mc_logits for out in hf_run(hf, input_ids=ids))
    close(ours(input_ids=ids).mc_logits, expected, oracle)
    last = torch.full((2, 3), 5)
    close(ours(input_ids=ids, mc_token_ids=last).mc_logits, expected, oracle)
    assert relative_error(ours(input_ids=ids, mc_token_ids=torch.zeros_like(last)).mc_logits, expected) > 0.1


def test_a_batch_larger_than_max_batch_gets_a_cache_of_its_size(tmp_path):
    folder, hf = save_model(tmp_path, "GPT2LMHeadModel")
    ours = tritongpt2.GPT2LMHeadModel.from_pretrained(folder, backend="torch", max_batch=2)
    ids = torch.randint(0, 300, (5, 6))
    got = ours(input_ids=ids[:, :4])
    close(got.logits, *(out.logits for out in hf_run(hf, input_ids=ids[:, :4])))
    assert got.past_key_values.get_seq_length() == 4 and got.past_key_values.batch_size == 5
    more = ours(input_ids=ids[:, 4:], past_key_values=got.past_key_values)
    close(more.logits, *(out.logits[:, 4:] for out in hf_run(hf, input_ids=ids)))
    assert ours(input_ids=ids, use_cache=False).past_key_values is None


def test_missing_head_weights_are_initialised_with_a_warning(tmp_path):
    folder, _ = save_model(tmp_path, "GPT2Model")
    with pytest.warns(UserWarning, match="newly initialised.*score.weight"):
        model = tritongpt2.GPT2ForSequenceClassification.from_pretrained(folder, backend="torch")
    assert model.score.weight.std() > 0


ALL_CLASSES = [
    ("GPT2Model", {}, lambda o: o.last_hidden_state),
    ("GPT2LMHeadModel", {}, lambda o: o.logits),
    ("GPT2DoubleHeadsModel", {}, lambda o: o.mc_logits),
    ("GPT2ForSequenceClassification", {"pad_token_id": 0}, lambda o: o.logits),
    ("GPT2ForTokenClassification", {}, lambda o: o.logits),
    ("GPT2ForQuestionAnswering", {}, lambda o: o.start_logits),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,config,main", ALL_CLASSES, ids=[c[0] for c in ALL_CLASSES])
def test_accelerate_in_place_with_shared_weights(tmp_path, backend, name, config, main):
    _, model = save_model(tmp_path, name, **config)
    ids = torch.randint(1, 300, (2, 6), generator=torch.Generator().manual_seed(2))
    expected, oracle = (main(out) for out in hf_run(model, input_ids=ids))
    keys = list(model.state_dict())
    assert tritongpt2.accelerate(on(backend, model), backend=backend) is model
    with torch.no_grad():
        close(main(model(input_ids=on(backend, ids))), expected, oracle)
    base = model.transformer if hasattr(model, "transformer") else model
    assert model.tritongpt2.engine.weights.wte.data_ptr() == base.wte.weight.data_ptr()
    assert model.tritongpt2.engine.weights.layers[1].fc_weight.data_ptr() == base.h[1].mlp.c_fc.weight.data_ptr()
    assert list(model.state_dict()) == keys
    assert type(model).forward is getattr(transformers, name).forward, "the class itself must stay untouched"


def copied(model, how, folder):
    if how == "deepcopy":
        return copy.deepcopy(model)
    torch.save(model, folder / "model.pt")
    return torch.load(folder / "model.pt", weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize(
    "name,config,main,backend,quantization",
    [(*case, "torch", None) for case in ALL_CLASSES] + [(*ALL_CLASSES[1], "torch", "int8"), (*ALL_CLASSES[1], BACKEND, None)],
    ids=[c[0] for c in ALL_CLASSES] + ["GPT2LMHeadModel-int8", f"GPT2LMHeadModel-{BACKEND}"],
)
def test_a_native_model_copies_over_an_engine_of_its_own(tmp_path, monkeypatch, how, name, config, main, backend, quantization):
    # The engine is built again over copied weights (oneDNN's packed ones travel plain and are packed
    # again: packing forced on where oneDNN is); the heads get their own tensors, and the LM head
    # wraps the copy's engine weight, as the original's wraps its own.
    monkeypatch.setattr(cpu_matmul, "PACKS_FLOAT32", cpu_matmul.REORDER is not None)
    folder, _ = save_model(tmp_path, name, **config)
    model = getattr(tritongpt2, name).from_pretrained(folder, backend=backend, quantization=quantization)
    ids = on(backend, torch.randint(1, 300, (2, 6), generator=torch.Generator().manual_seed(4)))
    twin = copied(model, how, tmp_path)
    assert type(twin) is type(model) and twin.engine is not model.engine and not twin.training
    assert twin.engine.cache is not model.engine.cache and twin.engine.lock is not model.engine.lock
    assert twin.state_dict().keys() == model.state_dict().keys()
    originals = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in originals for p in twin.parameters())  # the heads' tensors are the copy's own
    layer = twin.engine.weights.layers[0]
    if backend == "torch" and quantization is None and cpu_matmul.REORDER is not None:
        assert is_packed(layer.fc_weight)
    with torch.no_grad():
        before = main(model(input_ids=ids))
        assert torch.equal(main(twin(input_ids=ids)), before)
        layer.ln_1_weight.mul_(2)
        if hasattr(twin, "lm_head") and quantization is None:
            assert twin.lm_head.weight.data_ptr() == twin.engine.weights.lm_head.data_ptr()
            twin.lm_head.weight.mul_(2)
        assert not torch.equal(main(twin(input_ids=ids)), before)
        assert torch.equal(main(model(input_ids=ids)), before)


def test_accelerated_generate_equals_transformers(tmp_path):
    _, model = save_model(tmp_path)
    ids = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.generate(input_ids=ids, max_new_tokens=7, do_sample=False, pad_token_id=0)
    tritongpt2.accelerate(model, backend="torch")
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=7, do_sample=False, pad_token_id=0), expected)


def test_accelerate_refuses_other_models():
    with pytest.raises(ValueError, match="accelerate takes one of transformers' GPT-2 classes"):
        tritongpt2.accelerate(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("backend,dtype", [("torch", torch.bfloat16), (BACKEND, torch.float16)])
def test_accelerate_a_half_precision_model(tmp_path, backend, dtype):
    _, model = save_model(tmp_path)
    model = model.to(dtype)
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(4))
    expected, oracle = (out.logits for out in hf_run(model, input_ids=ids))
    tritongpt2.accelerate(on(backend, model), backend=backend)
    with torch.no_grad():
        got = model(input_ids=on(backend, ids)).logits
    assert got.dtype == dtype
    close(got, expected, oracle)
