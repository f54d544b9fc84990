"""accelerate() as a drop-in: transformers' generate over the fast forward, outputs and flags as
transformers has them, never stale, autograd and everything else through transformers' own forward."""

import copy
import functools
import threading
import warnings

import pytest
import torch

import tritongpt2
from checkpoints import save_model
from numerics import BACKEND, ON_GPU, on, relative_error
from tritongpt2.heads.cache import KVCache

transformers = pytest.importorskip("transformers")
TOLERANCE = 2e-5


def pair(tmp_path, model_class="GPT2LMHeadModel", backend="torch", **overrides):
    """(an accelerated model, an untouched copy of it: the reference)."""
    _, model = save_model(tmp_path, model_class, **overrides)
    reference = copy.deepcopy(model)
    return tritongpt2.accelerate(model, backend=backend), reference


def ids(rows=2, seq=6, seed=0):
    return torch.randint(1, 299, (rows, seq), generator=torch.Generator().manual_seed(seed))


def fast_calls(model, monkeypatch):
    """Counts of the forward calls that took the fast path and that fell back to transformers."""
    counts = {"fast": 0, "fallback": 0}
    accelerated = model.tritongpt2
    fallback = accelerated._transformers

    def counted_fallback(arguments, reason):
        counts["fallback"] += 1
        return fallback(arguments, reason)

    monkeypatch.setattr(accelerated, "_transformers", counted_fallback)
    fast_class = type(accelerated.fast)
    forward = fast_class.forward

    @functools.wraps(forward)
    def counted_forward(self, *args, **kwargs):
        counts["fast"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(fast_class, "forward", counted_forward)
    return counts


def test_past_key_values_is_a_transformers_cache_over_the_engine_storage(tmp_path):
    model, reference = pair(tmp_path)
    prompt = ids()
    with torch.no_grad():
        out = model(input_ids=prompt)
        cache = out.past_key_values
        assert isinstance(cache, KVCache) and isinstance(cache, transformers.DynamicCache)
        assert cache.get_seq_length() == 6 and len(cache.layers) == 2
        expected = reference(input_ids=prompt).past_key_values
        for ours, theirs in zip(cache.layers, expected.layers):
            assert ours.keys.shape == theirs.keys.shape == (2, 5, 6, 16)
            assert relative_error(ours.keys, theirs.keys) < TOLERANCE
            assert relative_error(ours.values, theirs.values) < TOLERANCE
        # The layers are views of the engine's storage: the same memory, not a copy.
        assert cache.layers[1].keys.data_ptr() == cache.storage.keys[1].data_ptr()
        second = model(input_ids=ids(seed=1))
        assert second.past_key_values is not cache and cache.get_seq_length() == 6, "caches live side by side"
        cache.crop(-2)
        assert cache.get_seq_length() == 4
        more = model(input_ids=prompt[:, 4:], past_key_values=cache).logits
        full = reference(input_ids=prompt).logits
        assert relative_error(more, full[:, 4:]) < TOLERANCE
        cache.batch_select_indices(torch.tensor([1]))
        assert cache.batch_size == 1 and cache.layers[0].keys.shape[0] == 1


@pytest.mark.parametrize("strategy", [
    dict(num_beams=3), dict(num_beams=2, num_return_sequences=2), dict(do_sample=False, repetition_penalty=1.3),
    dict(min_new_tokens=5, no_repeat_ngram_size=2), dict(cache_implementation="static"),
])
def test_transformers_generate_drives_the_fast_forward(tmp_path, monkeypatch, strategy):
    model, reference = pair(tmp_path)
    prompt, mask = ids(), torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    options = dict(max_new_tokens=6, pad_token_id=0, **strategy)
    expected = reference.generate(input_ids=prompt, attention_mask=mask, **options)
    counts = fast_calls(model, monkeypatch)
    got = model.generate(input_ids=prompt, attention_mask=mask, **options)
    assert torch.equal(got, expected)
    assert counts["fast"] >= 5, counts
    first_only = 1 if strategy.get("cache_implementation") else 0  # its first step's 4-D mask falls back
    assert counts["fallback"] == first_only, counts


def test_generate_returns_scores_and_the_cache(tmp_path):
    model, reference = pair(tmp_path)
    options = dict(max_new_tokens=4, pad_token_id=0, return_dict_in_generate=True, output_scores=True, output_logits=True)
    expected = reference.generate(input_ids=ids(), **options)
    got = model.generate(input_ids=ids(), **options)
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores + got.logits, expected.scores + expected.logits):
        assert relative_error(ours, theirs) < TOLERANCE
    assert isinstance(got.past_key_values, KVCache) and got.past_key_values.get_seq_length() == 9
    static = model.generate(input_ids=ids(), cache_implementation="static", **options)
    assert isinstance(static.past_key_values, transformers.StaticCache)
    assert static.past_key_values.layers[0].keys.shape == (2, 5, 9, 16)


def test_greedy_and_sampling_take_the_engine_loop(tmp_path, monkeypatch):
    model, reference = pair(tmp_path)
    loops = []
    generate = type(model.tritongpt2.fast).generate
    monkeypatch.setattr(type(model.tritongpt2.fast), "generate", lambda self, **kw: loops.append(kw) or generate(self, **kw))
    expected = reference.generate(input_ids=ids(), max_new_tokens=7, pad_token_id=0)
    assert torch.equal(model.generate(input_ids=ids(), max_new_tokens=7, pad_token_id=0), expected)
    sampled = model.generate(input_ids=ids(), max_new_tokens=7, pad_token_id=0, do_sample=True, top_k=5, temperature=0.8)
    assert sampled.shape == (2, 13) and len(loops) == 2
    assert loops[1]["do_sample"] and loops[1]["top_k"] == 5 and loops[1]["temperature"] == 0.8
    model.generate(input_ids=ids(), max_new_tokens=7, pad_token_id=0, num_beams=2)
    assert len(loops) == 2, "beam search is transformers' generate over the fast forward, not the engine loop"


def test_outputs_are_transformers_model_outputs(tmp_path):
    model, reference = pair(tmp_path)
    with torch.no_grad():
        out = model(input_ids=ids(), labels=ids())
        theirs = reference(input_ids=ids(), labels=ids())
    assert type(out) is type(theirs)
    # transformers 5.24 calls the cache field `cache`, 5.17 `past_key_values`.
    assert list(out.keys()) == list(theirs.keys()) and list(out.keys())[:2] == ["loss", "logits"] and len(out) == 3
    assert "past_key_values" in out and "hidden_states" not in out
    assert list(out) == list(out.keys()) and out[1] is out.logits and out["logits"] is out.logits
    assert len(out.to_tuple()) == 3


def test_native_outputs_have_the_same_semantics(tmp_path):
    folder, _ = save_model(tmp_path)
    model = tritongpt2.GPT2LMHeadModel.from_pretrained(folder, backend="torch")
    out = model(input_ids=ids())
    assert list(out) == ["logits", "past_key_values"] and "cache" in out and "past_key_values" in out
    assert "hidden_states" not in out and out[0] is out.logits and out.cache is out.past_key_values
    assert out.to_tuple() == (out.logits, out.past_key_values)
    out.hidden_states = (out.logits,)
    assert "hidden_states" in out and len(out) == 3


@pytest.mark.parametrize("accelerated", [True, False])
def test_config_flags_are_the_defaults(tmp_path, accelerated):
    if accelerated:
        model, _ = pair(tmp_path, "GPT2Model")
    else:
        model = tritongpt2.GPT2Model.from_pretrained(save_model(tmp_path, "GPT2Model")[0], backend="torch")
    with torch.no_grad():
        model.config.output_hidden_states = True
        assert len(model(input_ids=ids()).hidden_states) == 3
        assert model(input_ids=ids(), output_hidden_states=False).hidden_states is None
        model.config.use_cache = False
        assert model(input_ids=ids()).past_key_values is None
        model.config.return_dict = False
        assert isinstance(model(input_ids=ids()), tuple)
        assert not isinstance(model(input_ids=ids(), return_dict=True), tuple)


def test_loss_options_logits_to_keep_and_head_mask(tmp_path):
    model, reference = pair(tmp_path)
    prompt = ids(seq=8)
    shifted = torch.roll(prompt, -1, dims=1)
    with torch.no_grad():
        for options in (dict(shift_labels=shifted), dict(num_items_in_batch=torch.tensor(5)), dict(ignore_index=7)):
            got = model(input_ids=prompt, labels=prompt, **options).loss
            expected = reference(input_ids=prompt, labels=prompt, **options).loss
            assert abs(got.item() - expected.item()) < 1e-4 * abs(expected.item()), options
        assert model(input_ids=prompt, logits_to_keep=2).logits.shape == (2, 2, 300)
        # A head mask of 0 removes that head's output: as zeroing its value columns does.
        head_mask = torch.ones(2, 5)
        head_mask[1, 3] = 0.0
        masked = model(input_ids=prompt, head_mask=head_mask).logits
        attention = reference.transformer.h[1].attn.c_attn
        values = slice(2 * 80 + 3 * 16, 2 * 80 + 4 * 16)
        attention.weight[:, values] = 0.0
        attention.bias[values] = 0.0
        assert relative_error(masked, reference(input_ids=prompt).logits) < TOLERANCE
        with pytest.raises(ValueError, match=r"head_mask must be \[5\] or \[2, 5\]"):
            model(input_ids=prompt, head_mask=torch.ones(3))


@pytest.mark.parametrize("change", ["half", "to-bfloat16", "load_state_dict", "resize_token_embeddings", "untie"])
def test_the_fast_path_follows_the_module(tmp_path, monkeypatch, change):
    model, reference = pair(tmp_path)
    prompt = ids()
    with torch.no_grad():
        model(input_ids=prompt)
        if change == "half":
            model.half(), reference.half()
        elif change == "to-bfloat16":
            model.to(torch.bfloat16), reference.to(torch.bfloat16)
        elif change == "load_state_dict":
            state = save_model(tmp_path / "other", seed=5)[1].state_dict()
            model.load_state_dict(state), reference.load_state_dict(state)
        elif change == "resize_token_embeddings":
            for resized in (model, reference):  # new rows are drawn at random: the same draw for both
                torch.manual_seed(3)
                resized.resize_token_embeddings(320)
            prompt = torch.tensor([[310, 5, 319, 7, 1, 2]])
        else:
            new_head = torch.nn.Parameter(torch.randn(300, 80) * 0.2)
            model.lm_head.weight = new_head
            reference.lm_head.weight = copy.deepcopy(new_head)
            model.config.tie_word_embeddings = reference.config.tie_word_embeddings = False
        counts = fast_calls(model, monkeypatch)
        got, expected = model(input_ids=prompt).logits, reference(input_ids=prompt).logits
    assert counts == {"fast": 1, "fallback": 0}
    assert got.dtype == expected.dtype
    tolerance = {torch.float32: TOLERANCE, torch.float16: 5e-3, torch.bfloat16: 3e-2}[expected.dtype]
    assert relative_error(got, expected) < tolerance


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_is_accelerated_over_its_own_tensors(tmp_path, monkeypatch, how):
    model, reference = pair(tmp_path)
    prompt = ids()
    if how == "deepcopy":
        copied = copy.deepcopy(model)
    else:
        saved = tmp_path / "model.pt"
        torch.save(model, saved)
        copied = torch.load(saved, weights_only=False)
    assert copied.tritongpt2 is not model.tritongpt2 and copied.tritongpt2.model is copied
    assert copied.state_dict().keys() == model.state_dict().keys()
    assert copied.transformer.wte.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    counts = fast_calls(copied, monkeypatch)
    with torch.no_grad():
        assert torch.equal(copied(input_ids=prompt).logits, model(input_ids=prompt).logits)
        copied.transformer.h[0].mlp.c_fc.weight.mul_(2)  # the copy's own weights: the original is untouched
        changed = copied(input_ids=prompt).logits
        reference.transformer.h[0].mlp.c_fc.weight.mul_(2)
        assert relative_error(changed, reference(input_ids=prompt).logits) < TOLERANCE
        assert not torch.equal(changed, model(input_ids=prompt).logits)
    assert counts == {"fast": 4, "fallback": 0}  # the fast class is counted: both models took it, twice each


def test_a_cache_of_the_former_dtype_is_refused(tmp_path):
    model, _ = pair(tmp_path)
    with torch.no_grad():
        cache = model(input_ids=ids()).past_key_values
        model.half()
        with pytest.raises(ValueError, match="the cache holds torch.float32 .* now runs torch.float16 .*; start a new cache"):
            model(input_ids=ids()[:, :1], past_key_values=cache)


def test_autograd_gives_transformers_gradients(tmp_path):
    model, reference = pair(tmp_path)
    prompt = ids()
    with pytest.warns(UserWarning, match="autograd is on"):
        model(input_ids=prompt, labels=prompt).loss.backward()
    reference(input_ids=prompt, labels=prompt).loss.backward()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert ours.grad is not None and torch.allclose(ours.grad, theirs.grad, atol=1e-6), name


def test_fallbacks_warn_once_per_reason_and_agree_with_transformers(tmp_path):
    model, reference = pair(tmp_path)
    prompt = ids()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = model(input_ids=prompt, output_attentions=True)
        causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))
        mask = torch.zeros(2, 1, 6, 6).masked_fill(~causal, torch.finfo(torch.float32).min)  # additive, as eager takes it
        four_d = model(input_ids=prompt, attention_mask=mask).logits
        expected = reference(input_ids=prompt, output_attentions=True)
    reasons = [str(w.message) for w in caught if "tritongpt2.accelerate" in str(w.message)]
    assert len(reasons) == 2 and "output_attentions" in reasons[0] and "4-D attention mask" in reasons[1]
    assert len(out.attentions) == 2 and torch.allclose(out.attentions[0], expected.attentions[0], atol=1e-6)
    assert isinstance(out.past_key_values, KVCache), "transformers' forward wrote into a tritongpt2 cache"
    assert relative_error(four_d, expected.logits) < TOLERANCE


def test_training_mode_applies_dropout_through_transformers(tmp_path):
    model, _ = pair(tmp_path, resid_pdrop=0.5)
    model.train()
    with torch.no_grad(), pytest.warns(UserWarning, match="training mode"):
        first, second = model(input_ids=ids()).logits, model(input_ids=ids()).logits
    assert not torch.equal(first, second), "dropout was applied"


def test_cross_attention_runs_on_transformers(tmp_path):
    model, reference = pair(tmp_path, "GPT2Model", add_cross_attention=True)
    encoder = torch.randn(2, 3, 80)
    with torch.no_grad(), pytest.warns(UserWarning, match="add_cross_attention"):
        got = model(input_ids=ids(), encoder_hidden_states=encoder).last_hidden_state
    expected = reference(input_ids=ids(), encoder_hidden_states=encoder).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-6)


def concurrent(call, inputs):
    """call(x) for every x from a thread each, all at once; the results in input order."""
    results = [None] * len(inputs)
    start = threading.Barrier(len(inputs))

    def run(i):
        start.wait()
        with torch.no_grad():  # grad mode is per thread
            results[i] = call(inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# Eight threads on the torch backend; four on the kernels' under the interpreter, where each call
# takes seconds (the launchers' shared state is the same with four as with eight).
@pytest.mark.slow
@pytest.mark.parametrize("backend, threads", [("torch", 8), (BACKEND, 8 if ON_GPU else 4)])
def test_threads_each_get_their_own_answer(tmp_path, backend, threads):
    folder, model = save_model(tmp_path)
    tritongpt2.accelerate(on(backend, model), backend=backend)
    native = tritongpt2.GPT2LMHeadModel.from_pretrained(folder, backend=backend)
    engine = tritongpt2.Engine.from_pretrained(folder, backend=backend)
    prompts = [on(backend, ids(rows=1 + i % 3, seq=3 + i, seed=i)) for i in range(threads)]
    calls = {
        "accelerated": lambda x: model(input_ids=x).logits,
        "native": lambda x: native(input_ids=x).logits,
        "engine": lambda x: engine.prefill(x, logits="all").logits,
        "engine generate": lambda x: tritongpt2.generate(engine, x, max_new_tokens=3, eos_token_id=[]),
    }
    with torch.no_grad():
        for name, call in calls.items():
            alone = [call(x) for x in prompts]
            together = concurrent(call, prompts)
            for a, b in zip(alone, together):
                assert torch.equal(a, b), name


@pytest.mark.skipif(ON_GPU, reason="this process compiles the kernels for the GPU")
def test_interpret_backend_refuses_bfloat16(tmp_path):
    folder, model = save_model(tmp_path)
    with pytest.raises(ValueError, match="interpreter computes bfloat16 tl.dot wrongly"):
        tritongpt2.Engine.from_pretrained(folder, backend="interpret", dtype=torch.bfloat16)
    # An accelerated bfloat16 model on the interpreter runs transformers' forward instead, and says why.
    tritongpt2.accelerate(on("interpret", model.to(torch.bfloat16)), backend="interpret")
    with torch.no_grad(), pytest.warns(UserWarning, match="interpreter computes bfloat16"):
        model(input_ids=on("interpret", ids()))
