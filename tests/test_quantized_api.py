"""The quantization API: EngineOptions' quantization, the engine quantizing once when built, every
from_pretrained, save_pretrained of a quantized model and its loading back as saved, accelerate's
quantized copies, the refusal of models transformers loaded quantized, and the CLI's options."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import warnings

import pytest
import torch

import tritongpt2
from checkpoints import save_model
from tokenizer_files import save_model_with_tokenizer
from tritongpt2.cli import QUANTIZATIONS, main
from tritongpt2.engine import quantize as quantize_module
from tritongpt2.engine.checkpoint import QUANTIZED_SAFETENSORS
from tritongpt2.engine.quantize import Quantization, quantize_matrix
from tritongpt2.heads.base import QuantizedLMHead
from tritongpt2.kernels.backend import BACKENDS, Backend
from tritongpt2.kernels.quantized_weight import FORMATS, QuantizedWeight
from tritongpt2.kernels.reference import dequantize, matrix

pytest.importorskip("transformers")

# Wide enough for every group: n_embd and n_inner are multiples of 128.
WIDE = dict(n_embd=128, n_head=4, n_inner=256)
QUANTIZATIONS_ASKED = {
    "int8": dict(quantization="int8"),
    "int4-32": dict(quantization="int4", group_size=32),
    "int4-128": dict(quantization="int4", group_size=128),
    "nf4": dict(quantization="nf4"),
    "nf4-double": dict(quantization="nf4", double_quant=True),
}
MATMULS = ("attn_weight", "attn_proj_weight", "fc_weight", "mlp_proj_weight")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("wide"), **WIDE)


def quantized_weights(weights):
    """Every QuantizedWeight of an engine's weights, by name."""
    named = {f"h.{i}.{name}": getattr(layer, name) for i, layer in enumerate(weights.layers) for name in MATMULS}
    return {**named, "lm_head": weights.lm_head}


def assert_same_quantized(ours: QuantizedWeight, theirs: QuantizedWeight) -> None:
    assert (ours.format, ours.group_size, ours.shape) == (theirs.format, theirs.group_size, theirs.shape)
    assert ours.tensors().keys() == theirs.tensors().keys()
    for name, tensor in ours.tensors().items():
        assert torch.equal(tensor, theirs.tensors()[name]), name


# --- options -------------------------------------------------------------------------------------


def test_options_are_validated_into_a_quantization():
    assert tritongpt2.EngineOptions().quantization is None
    assert tritongpt2.EngineOptions(quantization="NF4", double_quant=True).quantization == Quantization("nf4", 64, True)
    assert tritongpt2.EngineOptions(quantization="int4").quantization == Quantization("int4", 64)
    assert tritongpt2.EngineOptions(quantization="int4", group_size=128).quantization.group_size == 128
    given = Quantization("int4", 32)
    assert tritongpt2.EngineOptions(quantization=given).quantization is given
    assert tritongpt2.EngineOptions.of(tritongpt2.EngineOptions(quantization="nf4"), double_quant=True).quantization.double_quant
    assert tritongpt2.EngineOptions(quantization="int8").quantization.describe() == "int8 (per-channel scales)"
    double = tritongpt2.Quantization("nf4", double_quant=True)
    assert tritongpt2.EngineOptions(quantization=double, group_size=64).quantization == double


BAD_OPTIONS = [
    (dict(quantization="fp8"), "quantization='fp8' is not a format; choose one of int8, int4, nf4"),
    (dict(quantization=4), "quantization=4 is not a format"),
    (dict(quantization="int4", group_size=48), "group_size=48 is not one of int4's 32, 64, 128"),
    (dict(quantization="int4", group_size=0), "group_size=0 is not one of int4's"),
    (dict(quantization="int4", group_size="64"), "group_size='64' must be an integer"),
    (dict(quantization="nf4", group_size=128), "group_size=128: nf4 quantizes in bitsandbytes' blocks of 64"),
    (dict(quantization="int8", group_size=64), "group_size=64 does not apply to int8"),
    (dict(quantization="int8", double_quant=True), "double_quant applies to nf4's absmax, not to int8"),
    (dict(quantization="int4", double_quant=True), "double_quant applies to nf4's absmax, not to int4"),
    (dict(quantization="nf4", double_quant="yes"), "double_quant='yes' must be True or False"),
    (dict(group_size=64), "group_size=64 and double_quant=False need a quantization format"),
    (dict(double_quant=True), "double_quant=True need a quantization format"),
]


@pytest.mark.parametrize("options,message", BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_bad_quantization_options_name_the_value(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tritongpt2.EngineOptions(**options)


@pytest.mark.parametrize("entry_point", ["Engine", "Embedder", *tritongpt2.heads.models.MODEL_CLASSES])
def test_every_from_pretrained_refuses_bad_quantization_before_reading(tmp_path, entry_point):
    load = getattr(tritongpt2, entry_point).from_pretrained
    with pytest.raises(ValueError, match=re.escape("group_size=48 is not one of int4's")):
        load(tmp_path / "not-there", quantization="int4", group_size=48)
    with pytest.raises(ValueError, match=re.escape("quantization='q3' is not a format")):
        load(tmp_path / "not-there", options=tritongpt2.EngineOptions(backend="torch"), quantization="q3")


@pytest.mark.parametrize(
    "config,asked,message",
    [
        (dict(n_embd=96, n_head=4, n_inner=256), dict(quantization="int4", group_size=64), "group_size=64 does not divide n_embd=96"),
        (dict(n_embd=96, n_head=4, n_inner=256), dict(quantization="nf4"), "group_size=64 does not divide n_embd=96"),
        (dict(n_embd=128, n_head=4, n_inner=320), dict(quantization="int4", group_size=128), "group_size=128 does not divide n_inner=320"),
    ],
)
def test_a_group_that_does_not_divide_the_model_names_both(tmp_path, config, asked, message):
    folder, model = save_model(tmp_path, **config)
    with pytest.raises(ValueError, match=re.escape(message)):
        tritongpt2.Engine.from_pretrained(folder, backend="torch", **asked)
    with pytest.raises(ValueError, match=re.escape(message)):
        tritongpt2.GPT2LMHeadModel.from_pretrained(folder, backend="torch", **asked)
    with pytest.raises(ValueError, match=re.escape(message)):
        tritongpt2.accelerate(model, backend="torch", **asked)
    assert not hasattr(model, "tritongpt2") and "forward" not in vars(model)


def test_int8_runs_on_any_width(tmp_path):
    folder, _ = save_model(tmp_path)  # n_embd 80, n_inner 176: no group divides them, int8 has none
    assert tritongpt2.Engine.from_pretrained(folder, backend="torch", quantization="int8").weights.quantization == "int8"


# --- backends -------------------------------------------------------------------------------------


def test_every_backend_runs_every_format_today():
    for backend in BACKENDS.values():
        assert backend.quantizations == FORMATS
        for fmt in FORMATS:
            backend.check_quantization(fmt)


def test_a_backend_that_lacks_a_format_is_refused_naming_both(wide):
    folder, _ = wide
    limited = dataclasses.replace(BACKENDS["torch"], name="limited", quantizations=("int8",))
    with pytest.raises(ValueError, match=re.escape("the limited backend does not run nf4-quantized weights (the formats it runs: int8)")):
        tritongpt2.Engine.from_pretrained(folder, backend=limited, quantization="nf4")
    with pytest.raises(ValueError, match="the limited backend does not run int4-quantized weights"):
        tritongpt2.GPT2LMHeadModel.from_pretrained(folder, backend=limited, quantization="int4")
    assert tritongpt2.Engine.from_pretrained(folder, backend=limited, quantization="int8").quantization == Quantization("int8")
    with pytest.raises(ValueError, match="the limited backend does not run nf4-quantized weights"):
        tritongpt2.accelerate(wide[1], backend=limited, quantization="nf4")
    assert not hasattr(wide[1], "tritongpt2")
    bare = Backend("bare", "cpu", "tritongpt2.kernels.torch_ops", cuda_graphs=False, dtypes=(torch.float32,), quantizations=())
    with pytest.raises(ValueError, match=re.escape("the bare backend does not run int8-quantized weights (the formats it runs: none)")):
        tritongpt2.Engine.from_pretrained(folder, backend=bare, quantization="int8")
    assert tritongpt2.Engine.from_pretrained(folder, backend=bare).quantization is None


def test_a_quantized_checkpoint_is_refused_by_a_backend_that_lacks_its_format(wide, tmp_path):
    folder, _ = wide
    tritongpt2.GPT2LMHeadModel.from_pretrained(folder, backend="torch", quantization="nf4").save_pretrained(tmp_path / "nf4")
    limited = dataclasses.replace(BACKENDS["torch"], name="limited", quantizations=("int8",))
    with pytest.raises(ValueError, match="the limited backend does not run nf4-quantized weights"):
        tritongpt2.Engine.from_pretrained(tmp_path / "nf4", backend=limited)


# --- the engine and the classes -------------------------------------------------------------------


@pytest.mark.parametrize("asked", QUANTIZATIONS_ASKED.values(), ids=QUANTIZATIONS_ASKED)
def test_the_engine_quantizes_its_weights_once_when_built(wide, asked):
    folder, _ = wide
    engine = tritongpt2.Engine.from_pretrained(folder, backend="torch", **asked)
    expected = tritongpt2.EngineOptions(**asked).quantization
    assert engine.quantization == expected and engine.weights.quantization == expected.format
    float_engine = tritongpt2.Engine.from_pretrained(folder, backend="torch")
    assert float_engine.quantization is None and float_engine.weights.quantization is None
    for name, weight in quantized_weights(engine.weights).items():
        assert isinstance(weight, QuantizedWeight), name
    assert engine.weights.wte is engine.weights.lm_head, "a tied wte is the LM head's QuantizedWeight"
    layer = float_engine.weights.layers[1]
    assert_same_quantized(engine.weights.layers[1].fc_weight, quantize_matrix(layer.fc_weight, expected))
    assert_same_quantized(engine.weights.lm_head, quantize_matrix(float_engine.weights.wte.T, expected))
    assert engine.weights.layers[0].fc_bias.dtype == torch.float32 and engine.weights.wpe.dtype == torch.float32
    assert engine.cache.keys.dtype == torch.float32


def test_an_untied_lm_head_is_quantized_and_wte_stays_float(tmp_path):
    folder, _ = save_model(tmp_path, "GPT2LMHeadModel", tie_word_embeddings=False, **WIDE)
    engine = tritongpt2.Engine.from_pretrained(folder, backend="torch", quantization="int4")
    assert isinstance(engine.weights.lm_head, QuantizedWeight) and isinstance(engine.weights.wte, torch.Tensor)


@pytest.mark.parametrize("name", list(tritongpt2.heads.models.MODEL_CLASSES))
def test_every_class_loads_quantized(tmp_path, name):
    folder, reference = save_model(tmp_path, name, pad_token_id=0, **WIDE)
    model = getattr(tritongpt2, name).from_pretrained(folder, backend="torch", quantization="nf4")
    assert model.engine.weights.quantization == "nf4"
    for key, tensor in model.state_dict().items():  # the heads' own modules load as they do unquantized
        assert torch.equal(tensor, reference.state_dict()[key]), key
    head = model.get_output_embeddings()
    if name in ("GPT2LMHeadModel", "GPT2DoubleHeadsModel"):
        assert isinstance(head, QuantizedLMHead) and head.quantized is model.engine.weights.lm_head
        assert "lm_head.weight" not in model.state_dict() and not any(p is None for p in model.parameters())
    else:
        assert head is None


def test_the_quantized_lm_head_dequantizes_on_demand(wide):
    folder, reference = wide
    model = tritongpt2.GPT2LMHeadModel.from_pretrained(folder, backend="torch", quantization="int8")
    head = model.lm_head
    assert (head.in_features, head.out_features) == (128, 300)
    assert torch.equal(head.weight, dequantize(model.engine.weights.lm_head).T)
    wte = reference.transformer.wte.weight.detach()
    assert ((head.weight - wte).norm() / wte.norm()).item() < 0.01  # int8's per-channel rounding
    hidden = torch.randn(3, 128)
    torch.testing.assert_close(head(hidden), hidden @ matrix(model.engine.weights.lm_head, torch.float32))
    assert "int8" in repr(head)


def test_the_embedder_loads_quantized(tmp_path):
    folder, _ = save_model_with_tokenizer(tmp_path, n_layer=1, **WIDE)
    embedder = tritongpt2.Embedder.from_pretrained(folder, backend="torch", quantization="int4", group_size=32)
    assert embedder.engine.quantization == Quantization("int4", 32)


# --- save_pretrained and loading back ------------------------------------------------------------


@pytest.mark.parametrize("asked", QUANTIZATIONS_ASKED.values(), ids=QUANTIZATIONS_ASKED)
def test_a_quantized_model_saves_its_quantized_tensors_and_loads_them_back_as_saved(wide, tmp_path, monkeypatch, asked):
    from safetensors.torch import load_file

    folder, _ = wide
    model = tritongpt2.GPT2LMHeadModel.from_pretrained(folder, backend="torch", **asked)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    q = model.engine.quantization
    assert config["quantization_config"] == {
        "quant_method": "tritongpt2", "format": q.format, "group_size": q.group_size, "double_quant": q.double_quant, "version": 1,
    }
    assert config["architectures"] == ["GPT2LMHeadModel"]
    saved = load_file(tmp_path / "saved" / QUANTIZED_SAFETENSORS)
    assert not (tmp_path / "saved" / "model.safetensors").exists()
    fc = model.engine.weights.layers[0].fc_weight
    for field, tensor in fc.tensors().items():
        assert torch.equal(saved[f"transformer.h.0.mlp.c_fc.weight.q{field}"], tensor)
    assert "transformer.h.0.mlp.c_fc.weight" not in saved and "transformer.wte.weight" not in saved
    assert "transformer.wte.weight.qdata" in saved and not any(key.startswith("lm_head") for key in saved)
    assert saved["transformer.wte.weight.qdata"].shape[0] == 300, "stored N-major: wte-shaped"

    def no_quantizing(*args, **kwargs):
        raise AssertionError("a quantized checkpoint must load without quantizing again")

    monkeypatch.setattr(quantize_module, "quantize_matrix", no_quantizing)
    for again in (dict(), asked):  # the same quantization asked for again is no conflict
        back = tritongpt2.GPT2LMHeadModel.from_pretrained(tmp_path / "saved", backend="torch", **again)
        assert back.engine.quantization == q
        ours, theirs = quantized_weights(model.engine.weights), quantized_weights(back.engine.weights)
        for name in ours:
            assert_same_quantized(theirs[name], ours[name])
        assert back.engine.weights.wte is back.engine.weights.lm_head
        for name in ("wpe", "ln_f_weight", "ln_f_bias"):
            assert torch.equal(getattr(back.engine.weights, name), getattr(model.engine.weights, name))
        assert torch.equal(back.engine.weights.layers[1].attn_bias, model.engine.weights.layers[1].attn_bias)


def test_an_untied_quantized_head_and_the_heads_own_weights_round_trip(tmp_path):
    folder, _ = save_model(tmp_path / "model", "GPT2LMHeadModel", tie_word_embeddings=False, **WIDE)
    model = tritongpt2.GPT2LMHeadModel.from_pretrained(folder, backend="torch", quantization="int4", group_size=32)
    model.save_pretrained(tmp_path / "saved")
    back = tritongpt2.GPT2LMHeadModel.from_pretrained(tmp_path / "saved", backend="torch")
    assert_same_quantized(back.engine.weights.lm_head, model.engine.weights.lm_head)
    assert torch.equal(back.engine.weights.wte, model.engine.weights.wte)

    folder, _ = save_model(tmp_path / "classifier", "GPT2ForSequenceClassification", pad_token_id=0, **WIDE)
    model = tritongpt2.GPT2ForSequenceClassification.from_pretrained(folder, backend="torch", quantization="int8")
    model.save_pretrained(tmp_path / "classifier-saved")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every head weight is found: no "newly initialised" warning
        back = tritongpt2.GPT2ForSequenceClassification.from_pretrained(tmp_path / "classifier-saved", backend="torch")
    assert torch.equal(back.score.weight, model.score.weight)
    assert_same_quantized(back.engine.weights.layers[1].attn_weight, model.engine.weights.layers[1].attn_weight)


def test_the_base_model_saves_without_the_transformer_prefix(wide, tmp_path):
    from safetensors.torch import load_file

    model = tritongpt2.GPT2Model.from_pretrained(wide[0], backend="torch", quantization="nf4")
    model.save_pretrained(tmp_path)
    assert "h.0.attn.c_attn.weight.qdata" in load_file(tmp_path / QUANTIZED_SAFETENSORS)
    back = tritongpt2.GPT2Model.from_pretrained(tmp_path, backend="torch")
    assert_same_quantized(back.engine.weights.layers[0].attn_weight, model.engine.weights.layers[0].attn_weight)


def test_a_float_model_saves_what_transformers_loads(wide, tmp_path):
    import transformers

    folder, reference = wide
    tritongpt2.GPT2LMHeadModel.from_pretrained(folder, backend="torch").save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    expected = reference.state_dict()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[key]), key


def test_transformers_refuses_a_quantized_folder_rather_than_initialising_its_weights(wide, tmp_path):
    import transformers

    tritongpt2.GPT2LMHeadModel.from_pretrained(wide[0], backend="torch", quantization="int8").save_pretrained(tmp_path)
    with pytest.raises(OSError, match="model.safetensors"):
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    # Saved float over the same folder: the quantized file goes, and transformers reads the new one.
    tritongpt2.GPT2LMHeadModel.from_pretrained(wide[0], backend="torch").save_pretrained(tmp_path)
    assert not (tmp_path / QUANTIZED_SAFETENSORS).exists()
    transformers.GPT2LMHeadModel.from_pretrained(tmp_path)


def test_a_conflicting_quantization_for_a_quantized_folder_names_both(wide, tmp_path):
    tritongpt2.GPT2LMHeadModel.from_pretrained(wide[0], backend="torch", quantization="nf4").save_pretrained(tmp_path)
    message = re.escape(f"quantization=int4 (groups of 64) asked for, but {tmp_path} is saved quantized as nf4 (groups of 64)")
    for load in (tritongpt2.Engine.from_pretrained, tritongpt2.GPT2LMHeadModel.from_pretrained, tritongpt2.Embedder.from_pretrained):
        with pytest.raises(ValueError, match=message):
            load(tmp_path, backend="torch", quantization="int4")
    with pytest.raises(ValueError, match=re.escape("asked for, but") + ".*" + re.escape("as nf4 (groups of 64); load it")):
        tritongpt2.Engine.from_pretrained(tmp_path, backend="torch", quantization="nf4", double_quant=True)


def test_an_engine_over_quantized_weights_refuses_another_quantization(wide):
    engine = tritongpt2.Engine.from_pretrained(wide[0], backend="torch", quantization="int8")
    with pytest.raises(ValueError, match=re.escape("quantization=nf4 (groups of 64) asked for, but the weights are already int8")):
        tritongpt2.Engine(engine.config, engine.weights, tritongpt2.EngineOptions(backend="torch", quantization="nf4"))
    again = tritongpt2.Engine(engine.config, engine.weights, tritongpt2.EngineOptions(backend="torch"))
    assert again.quantization == Quantization("int8") and again.weights is engine.weights


def _edit_saved(folder, change):
    from safetensors.torch import load_file, save_file

    state = load_file(folder / QUANTIZED_SAFETENSORS)
    change(state)
    save_file(state, str(folder / QUANTIZED_SAFETENSORS))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s.pop("transformer.h.1.mlp.c_fc.weight.qscale"), "h.1.mlp.c_fc.weight.qscale is missing"),
        (lambda s: s.update({"transformer.h.0.attn.c_proj.weight.qzero": torch.zeros(128, 2, dtype=torch.uint8)}),
         "h.0.attn.c_proj.weight.qzero does not belong to nf4 (groups of 64)"),
        (lambda s: s.update({"transformer.h.0.attn.c_attn.weight.qdata": torch.zeros(384, 32, dtype=torch.uint8)}),
         "h.0.attn.c_attn.weight.qdata is (384, 32) torch.uint8, expected (384, 64) torch.uint8"),
        (lambda s: s.update({"transformer.wte.weight.qscale": torch.zeros(300, 2, dtype=torch.float16)}),
         "wte.weight.qscale is (300, 2) torch.float16, expected (300, 2) torch.float32"),
        (lambda s: [s.pop(k) for k in list(s) if k.startswith("transformer.h.1.mlp.c_proj.weight.")],
         "holds no quantized h.1.mlp.c_proj.weight"),
    ],
    ids=["missing", "unexpected", "misshapen", "mistyped", "absent"],
)
def test_a_broken_quantized_checkpoint_names_the_key(wide, tmp_path, change, message):
    """Keys are named as the base model's, without transformer., as for float checkpoints."""
    tritongpt2.GPT2LMHeadModel.from_pretrained(wide[0], backend="torch", quantization="nf4").save_pretrained(tmp_path)
    _edit_saved(tmp_path, change)
    with pytest.raises(ValueError, match=re.escape(message)):
        tritongpt2.Engine.from_pretrained(tmp_path, backend="torch")


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "holds weights quantized by bitsandbytes"),
        ({"quant_method": "tritongpt2", "format": "nf4", "group_size": 64, "version": 2}, "quantization_config version 2"),
        ({"quant_method": "tritongpt2", "format": "nf5", "group_size": 64, "version": 1}, "quantization='nf5' is not a format"),
    ],
)
def test_a_quantization_config_that_is_not_ours_is_refused(wide, tmp_path, setting, message):
    tritongpt2.GPT2LMHeadModel.from_pretrained(wide[0], backend="torch").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": setting}))
    with pytest.raises(ValueError, match=re.escape(message)):
        tritongpt2.Engine.from_pretrained(tmp_path, backend="torch")


# --- accelerate -----------------------------------------------------------------------------------


def test_accelerate_quantizes_its_own_copies_and_says_how_much_memory_they_take(wide):
    _, reference = wide
    model = copy.deepcopy(reference)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"its own nf4 \(groups of 64\) copies of the matmul weights, 0\.2 MB, beside the "
                      r"model's float ones, 1\.1 MB"):
        tritongpt2.accelerate(model, backend="torch", quantization="nf4")
    engine = model.tritongpt2.engine
    assert engine.quantization == Quantization("nf4")
    products = [engine.weights.lm_head] + [getattr(layer, name) for layer in engine.weights.layers for name in MATMULS]
    assert model.tritongpt2.weight_memory() == {
        "float_mb": sum(p.numel() * 4 for p in [model.transformer.wte.weight] + [
            getattr(block, part).weight for h in model.transformer.h
            for block, part in ((h.attn, "c_attn"), (h.attn, "c_proj"), (h.mlp, "c_fc"), (h.mlp, "c_proj"))
        ]) / 2**20,
        "quantized_mb": sum(p.nbytes for p in products) / 2**20,
    }
    fc = model.transformer.h[1].mlp.c_fc.weight
    assert_same_quantized(engine.weights.layers[1].fc_weight, quantize_matrix(fc, Quantization("nf4")))
    for key, tensor in model.state_dict().items():  # the transformers parameters stay as they are
        assert torch.equal(tensor, before[key]), key
    assert tritongpt2.accelerate(copy.deepcopy(reference), backend="torch").tritongpt2.weight_memory() == {}


def test_accelerate_quantizes_the_current_parameters_again_on_rebuild(wide):
    with pytest.warns(UserWarning, match="copies of the matmul weights"):
        model = tritongpt2.accelerate(copy.deepcopy(wide[1]), backend="torch", quantization="int4", group_size=32)
    first = model.tritongpt2.engine
    model.tritongpt2.refresh()
    assert model.tritongpt2.engine is first, "nothing changed: no rebuild"
    fc = model.transformer.h[0].mlp.c_fc.weight
    with torch.no_grad():
        fc.mul_(2)  # in place: the quantized copy would be stale
    model.tritongpt2.refresh()
    assert model.tritongpt2.engine is not first
    assert_same_quantized(model.tritongpt2.engine.weights.layers[0].fc_weight, quantize_matrix(fc, Quantization("int4", 32)))
    model.transformer.h[1].attn.c_proj.weight = torch.nn.Parameter(torch.randn(128, 128) * 0.2)  # a new parameter
    model.tritongpt2.refresh()
    assert_same_quantized(model.tritongpt2.engine.weights.layers[1].attn_proj_weight,
                          quantize_matrix(model.transformer.h[1].attn.c_proj.weight, Quantization("int4", 32)))
    with torch.no_grad():
        fc.data.mul_(2)  # through .data: no version change, seen only when asked to
    model.tritongpt2.refresh(force=True)
    assert_same_quantized(model.tritongpt2.engine.weights.layers[0].fc_weight, quantize_matrix(fc, Quantization("int4", 32)))


def test_the_fallback_path_runs_the_float_parameters(wide):
    _, reference = wide
    ids = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    with pytest.warns(UserWarning, match="copies of the matmul weights"):
        model = tritongpt2.accelerate(copy.deepcopy(reference), backend="torch", quantization="int8")
    with torch.no_grad(), pytest.warns(UserWarning, match="output_attentions"):
        out = model(input_ids=ids, output_attentions=True)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)


def _mimic_bitsandbytes(model, how):
    from transformers import BitsAndBytesConfig

    if how == "is_loaded_in_4bit":
        object.__setattr__(model, "is_loaded_in_4bit", True)
    elif how == "is_loaded_in_8bit":
        object.__setattr__(model, "is_loaded_in_8bit", True)
    elif how == "quantization_config":
        model.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True)
    elif how == "hf_quantizer":
        object.__setattr__(model, "hf_quantizer", object())
    else:
        linear4bit = type("Linear4bit", (torch.nn.Linear,), {})
        model.transformer.h[0].mlp.c_fc = linear4bit(128, 256)


@pytest.mark.parametrize("how", ["is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_config", "hf_quantizer", "Linear4bit"])
def test_accelerate_refuses_a_model_transformers_loaded_quantized(tmp_path, how):
    _, model = save_model(tmp_path, **WIDE)
    _mimic_bitsandbytes(model, how)
    with pytest.raises(ValueError, match=r"was loaded quantized \(.+\); load the float model and pass quantization='nf4'"):
        tritongpt2.accelerate(model, backend="torch")
    assert not hasattr(model, "tritongpt2") and "forward" not in vars(model)


def test_accelerate_refuses_a_model_transformers_loaded_in_4_bits_with_bitsandbytes(wide):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")  # transformers' bitsandbytes loading needs it
    from transformers import BitsAndBytesConfig, GPT2LMHeadModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' notes about its CPU kernels
        model = GPT2LMHeadModel.from_pretrained(wide[0], quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    with pytest.raises(ValueError, match=re.escape("was loaded quantized (load_in_4bit); load the float model and pass quantization='nf4'")):
        tritongpt2.accelerate(model, backend="torch")
    assert not hasattr(model, "tritongpt2")


# --- the command line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_with_tokenizer(tmp_path_factory):
    return save_model_with_tokenizer(tmp_path_factory.mktemp("cli-wide"), n_layer=1, **WIDE)


def run_main(capsys, *args):
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_the_cli_knows_the_formats():
    assert QUANTIZATIONS == FORMATS


@pytest.mark.parametrize("command", ["generate", "embed", "serve"])
def test_the_cli_passes_quantization_to_the_engine(wide_with_tokenizer, capsys, monkeypatch, command):
    folder, _ = wide_with_tokenizer
    built = []

    def recording(cls, checkpoint, options=None):
        built.append(options.quantization)
        raise ValueError("stop after the options")

    monkeypatch.setattr(tritongpt2.Engine, "from_checkpoint", classmethod(recording))
    if command == "serve":
        from tritongpt2.serve import server

        monkeypatch.setattr(server, "serve_forever", lambda *args, **kwargs: None)
    status, _, err = run_main(capsys, command, "--model", folder, "--backend", "torch", "--quantization", "nf4", "--double-quant",
                              *(["hello"] if command != "serve" else []))
    assert (status, err) == (2, "tritongpt2: error: stop after the options\n")
    assert built == [Quantization("nf4", 64, True)]


@pytest.mark.parametrize(
    "options,message",
    [
        (["--quantization", "int4", "--group-size", "48"], "group_size=48 is not one of int4's 32, 64, 128"),
        (["--quantization", "int8", "--double-quant"], "double_quant applies to nf4's absmax, not to int8"),
        (["--group-size", "64"], "group_size=64 and double_quant=False need a quantization format"),
        (["--quantization", "nf4", "--group-size", "128"], "group_size=128: nf4 quantizes in bitsandbytes' blocks of 64"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "embed"])
def test_bad_quantization_options_are_one_line_and_status_2(wide_with_tokenizer, capsys, command, options, message):
    status, out, err = run_main(capsys, command, "--model", wide_with_tokenizer[0], "--backend", "torch", *options, "hello")
    assert status == 2 and out == ""
    assert err == f"tritongpt2: error: {message}\n"


def test_an_unknown_format_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--model", "x", "--quantization", "fp8", "hi"])
    assert exited.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def test_a_group_that_does_not_divide_the_model_is_one_line(tmp_path, capsys):
    folder, _ = save_model_with_tokenizer(tmp_path, n_layer=1)  # n_embd 80
    capsys.readouterr()
    status, _, err = run_main(capsys, "embed", "--model", folder, "--backend", "torch", "--quantization", "nf4", "hello")
    assert status == 2 and err == "tritongpt2: error: group_size=64 does not divide n_embd=80 (nf4 groups run along it)\n"


# --- outputs (these run the quantized ops of the backend) -------------------------------------


def dequantized_reference(reference, engine):
    """A copy of the transformers model with its matmul weights replaced by the engine's dequantized ones."""
    model = copy.deepcopy(reference)
    weights = engine.weights
    with torch.no_grad():
        for h, layer in zip(model.transformer.h, weights.layers):
            for module, name in ((h.attn.c_attn, "attn_weight"), (h.attn.c_proj, "attn_proj_weight"),
                                 (h.mlp.c_fc, "fc_weight"), (h.mlp.c_proj, "mlp_proj_weight")):
                module.weight.copy_(dequantize(getattr(layer, name)))
        model.transformer.wte.weight.copy_(dequantize(weights.lm_head).T)
    return model


@pytest.mark.parametrize("asked", QUANTIZATIONS_ASKED.values(), ids=QUANTIZATIONS_ASKED)
def test_a_saved_quantized_model_gives_the_same_outputs(wide, tmp_path, asked):
    model = tritongpt2.GPT2LMHeadModel.from_pretrained(wide[0], backend="torch", **asked)
    model.save_pretrained(tmp_path)
    back = tritongpt2.GPT2LMHeadModel.from_pretrained(tmp_path, backend="torch")
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(4))
    assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    assert torch.equal(back.generate(ids, max_new_tokens=5), model.generate(ids, max_new_tokens=5))


def test_the_kernels_backend_runs_a_quantized_checkpoint_as_the_torch_backend_does(tmp_path):
    folder, _ = save_model(tmp_path / "model", n_embd=64, n_head=2, n_inner=128, n_layer=1)
    tritongpt2.GPT2LMHeadModel.from_pretrained(folder, backend="torch", quantization="nf4", double_quant=True).save_pretrained(tmp_path / "nf4")
    ids = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(6))
    kernels, torch_ops = (tritongpt2.GPT2LMHeadModel.from_pretrained(tmp_path / "nf4", backend=b) for b in ("interpret", "torch"))
    assert torch.equal(kernels.generate(ids, max_new_tokens=3), torch_ops.generate(ids, max_new_tokens=3))


@pytest.mark.parametrize("asked", [QUANTIZATIONS_ASKED["int8"], QUANTIZATIONS_ASKED["nf4-double"]], ids=["int8", "nf4-double"])
def test_accelerated_quantized_logits_are_the_dequantized_models(wide, asked):
    _, reference = wide
    with pytest.warns(UserWarning, match="copies of the matmul weights"):
        model = tritongpt2.accelerate(copy.deepcopy(reference), backend="torch", **asked)
    oracle = dequantized_reference(reference, model.tritongpt2.engine)
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, out = oracle(input_ids=ids).logits, model(input_ids=ids).logits
    assert ((out - expected).norm() / expected.norm()).item() < 1e-4


def test_the_cli_generates_with_a_quantized_engine(wide_with_tokenizer, capsys):
    folder, _ = wide_with_tokenizer
    status, out, err = run_main(capsys, "generate", "--model", folder, "--backend", "torch", "--quantization", "int4",
                                "--max-new-tokens", 4, "Hello")
    assert status == 0, err
    assert out.startswith("Hello")
