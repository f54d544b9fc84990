"""The engine against transformers' eager GPT-2, in float32, on the interpreter and the torch backend.
The reference runs on the CPU; the engine's inputs go to its backend's device (numerics.on), and its
outputs come back to the CPU to be compared."""

import pytest
import torch

from checkpoints import save_model
from numerics import BACKEND, on, relative_error
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.generation import generate
from tritongpt2.kernels.activations import ACTIVATIONS

pytest.importorskip("transformers")

BACKENDS = ["torch", BACKEND]
TOLERANCE = 2e-5
CONFIGS = {
    "default": {},
    "no-scale": {"scale_attn_weights": False},
    "inverse-layer-idx": {"scale_attn_by_inverse_layer_idx": True, "n_layer": 3},
    "reorder-and-upcast": {"reorder_and_upcast_attn": True},
    "relu-4x-inner": {"activation_function": "relu", "n_inner": None},
    "gelu": {"activation_function": "gelu"},
    "silu": {"activation_function": "silu"},
    "tanh": {"activation_function": "tanh"},
    "quick-gelu": {"activation_function": "quick_gelu"},
    "gelu-pytorch-tanh": {"activation_function": "gelu_pytorch_tanh"},
    "head-dim-64": {"n_embd": 128, "n_head": 2, "n_inner": None},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = save_model(tmp_path_factory.mktemp(name), **CONFIGS[name])
        return cache[name]

    return get


def hf_logits(model, ids, mask=None, token_type_ids=None, position_ids=None):
    if position_ids is None and mask is not None:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=token_type_ids, position_ids=position_ids).logits


def prompts(batch, seq, vocab=300, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(models, name, backend):
    folder, model = models(name)
    engine = Engine.from_pretrained(folder, backend=backend)
    ids = prompts(2, 7)
    expected = hf_logits(model, ids)
    assert relative_error(engine.prefill(on(backend, ids), logits="all").logits, expected) < TOLERANCE
    assert relative_error(engine.prefill(on(backend, ids)).logits, expected[:, -1]) < TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_and_right_padding(models, backend):
    folder, model = models("default")
    engine = Engine.from_pretrained(folder, backend=backend)
    ids = prompts(3, 9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    expected = hf_logits(model, ids, mask)
    out = engine.prefill(on(backend, ids), on(backend, mask), logits="all", hidden=True)
    real = mask.bool()
    assert relative_error(out.logits.cpu()[real], expected[real]) < TOLERANCE
    last = torch.tensor([8, 5, 8])
    assert relative_error(engine.prefill(on(backend, ids), on(backend, mask)).logits, expected[torch.arange(3), last]) < TOLERANCE
    with torch.no_grad():
        hidden = model.transformer(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    assert relative_error(out.hidden_states.cpu()[real], hidden.last_hidden_state[real]) < TOLERANCE
    assert not torch.isnan(out.hidden_states).any(), "padding positions must not produce NaN"


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_type_ids_and_explicit_positions(models, backend):
    folder, model = models("default")
    engine = Engine.from_pretrained(folder, backend=backend)
    ids, types = prompts(2, 6), prompts(2, 6, seed=7)
    positions = torch.tensor([[3, 4, 5, 6, 7, 8], [0, 2, 4, 6, 8, 10]])
    expected = hf_logits(model, ids, token_type_ids=types, position_ids=positions)
    out = engine.prefill(on(backend, ids), token_type_ids=on(backend, types), position_ids=on(backend, positions), logits="all")
    assert relative_error(out.logits, expected) < TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
def test_continuing_from_the_cache(models, backend):
    folder, model = models("inverse-layer-idx")
    engine = Engine.from_pretrained(folder, backend=backend)
    ids = prompts(2, 12)
    expected = hf_logits(model, ids)
    engine.prefill(on(backend, ids[:, :5]))
    middle = engine.prefill(on(backend, ids[:, 5:11]), reset=False, logits="all").logits
    assert relative_error(middle, expected[:, 5:11]) < TOLERANCE
    last = engine.decode(on(backend, ids[:, 11])).logits
    assert relative_error(last, expected[:, 11]) < TOLERANCE
    assert engine.cache.used == 12


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_equals_transformers(models, backend):
    folder, model = models("default")
    engine = Engine.from_pretrained(folder, backend=backend)
    ids = prompts(3, 6, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    with torch.no_grad():
        expected = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    ours = generate(engine, on(backend, ids), on(backend, mask), max_new_tokens=10, eos_token_id=[])  # on the CPU
    assert torch.equal(ours, expected)
    continuations = {tuple(row[6:].tolist()) for row in ours}
    assert len(continuations) == 3, "random weights too blind: every prompt continues the same way"


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_embeds_instead_of_ids(models, backend):
    folder, model = models("default")
    engine = Engine.from_pretrained(folder, backend=backend)
    ids, types = prompts(2, 5), prompts(2, 5, seed=9)
    embeds = torch.randn(2, 5, 80)
    with torch.no_grad():
        expected = model(inputs_embeds=embeds, token_type_ids=types).logits
    out = engine.prefill(inputs_embeds=on(backend, embeds), token_type_ids=on(backend, types), logits="all")
    assert relative_error(out.logits, expected) < TOLERANCE
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        engine.prefill(on(backend, ids), inputs_embeds=on(backend, embeds))
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, seq, 80\], got shape \(2, 5, 7\)"):
        engine.prefill(inputs_embeds=on(backend, torch.randn(2, 5, 7)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_continuing_with_a_mask_that_covers_the_cached_tokens(models, backend):
    folder, model = models("default")
    engine = Engine.from_pretrained(folder, backend=backend)
    ids = prompts(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = hf_logits(model, ids, mask, position_ids=positions)
    engine.prefill(on(backend, ids[:, :6]), on(backend, mask[:, :6]))
    out = engine.prefill(on(backend, ids[:, 6:]), on(backend, mask), reset=False, logits="all")  # the mask as transformers takes it: past + new
    assert relative_error(out.logits, expected[:, 6:]) < TOLERANCE
    assert torch.equal(engine.cache.key_mask[:2, :9].cpu(), mask.int())


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_end_to_end(tmp_path, activation):
    folder, model = save_model(tmp_path, n_layer=1, activation_function=activation)
    engine = Engine.from_pretrained(folder, backend=BACKEND)
    ids = prompts(1, 5)
    assert relative_error(engine.prefill(on(BACKEND, ids), logits="all").logits, hf_logits(model, ids)) < TOLERANCE
