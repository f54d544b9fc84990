import json

import pytest

from tritongpt2.engine.config import GPT2Config


def test_defaults_are_transformers_defaults():
    hf = pytest.importorskip("transformers").GPT2Config().to_dict()
    ours = GPT2Config().to_dict()
    for name, value in hf.items():
        if name in ours:
            assert ours[name] == value, name
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                 "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                 "reorder_and_upcast_attn", "summary_type", "summary_use_proj", "summary_activation",
                 "summary_proj_to_labels", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        assert name in hf and name in ours, name


def test_n_inner_none_means_four_times_n_embd():
    assert GPT2Config(n_embd=80, n_head=5).inner_size == 320
    assert GPT2Config(n_embd=80, n_head=5, n_inner=176).inner_size == 176


def test_reads_config_json_with_aliases_and_keeps_unknown_fields(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "model_type": "gpt2", "hidden_size": 80, "num_attention_heads": 5, "num_hidden_layers": 3,
        "max_position_embeddings": 128, "n_ctx": 128, "id2label": {"0": "neg", "1": "neu", "2": "pos"},
        "problem_type": "single_label_classification", "task_specific_params": {"text-generation": {"max_length": 50}},
    }))
    config = GPT2Config.from_json_file(path)
    assert (config.n_embd, config.n_head, config.n_layer, config.n_positions) == (80, 5, 3, 128)
    assert config.hidden_size == 80 and config.num_labels == 3 and config.id2label[2] == "pos"
    assert config.extra["n_ctx"] == 128
    assert GPT2Config.from_dict(config.to_dict()) == config


def test_attention_scale_follows_the_flags():
    assert GPT2Config(n_embd=64, n_head=4).attention_scale(3) == pytest.approx(0.25)
    assert GPT2Config(n_embd=64, n_head=4, scale_attn_weights=False).attention_scale(3) == 1.0
    inverse = GPT2Config(n_embd=64, n_head=4, scale_attn_by_inverse_layer_idx=True)
    assert inverse.attention_scale(3) == pytest.approx(0.25 / 4)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"activation_function": "gelu_magic"}, "unsupported activation 'gelu_magic'; supported: .*gelu_new"),
        ({"n_embd": 80, "n_head": 3}, "n_embd=80 is not divisible by n_head=3"),
        ({"n_layer": 0}, "n_layer=0"),
        ({"n_inner": -4}, "n_inner=-4"),
        ({"add_cross_attention": True}, "add_cross_attention"),
        ({"problem_type": "ranking"}, "problem_type='ranking'"),
    ],
)
def test_bad_configs_are_clear_errors(values, message):
    with pytest.raises(ValueError, match=message):
        GPT2Config.from_dict(values)


def test_other_model_types_are_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' config"):
        GPT2Config.from_json_file(path)


VALID = {"vocab_size": 300, "n_positions": 64, "n_embd": 80, "n_layer": 2, "n_head": 5}


@pytest.mark.parametrize(
    "text,message",
    [
        ("[1, 2]", "config.json holds a JSON list, not an object of config fields"),
        ("null", "config.json holds a JSON NoneType, not an object of config fields"),
        ('"gpt2"', "config.json holds a JSON str"),
        ("", "config.json is not valid JSON"),
        ('{"n_embd": 80,', "config.json is not valid JSON"),
        (b"\xff\xfe{}", "config.json is not valid JSON: 'utf-8' codec"),
    ],
    ids=["list", "null", "string", "empty", "truncated", "not-utf8"],
)
def test_config_files_that_are_not_a_json_object(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message):
        GPT2Config.from_json_file(path)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("layer_norm_epsilon", "1e-5", "layer_norm_epsilon='1e-5' must be a positive number"),
        ("layer_norm_epsilon", 0, "layer_norm_epsilon=0 must be a positive number"),
        ("layer_norm_epsilon", -1e-5, "layer_norm_epsilon=-1e-05 must be a positive number"),
        ("layer_norm_epsilon", True, "layer_norm_epsilon=True must be a positive number"),
        ("eos_token_id", "50256", "eos_token_id='50256' must be a non-negative integer, a list of them, or null"),
        ("eos_token_id", ["1"], r"eos_token_id=\['1'\] must be"),
        ("bos_token_id", 1.5, "bos_token_id=1.5 must be a non-negative integer or null"),
        ("pad_token_id", -1, "pad_token_id=-1 must be a non-negative integer or null"),
        ("id2label", {"a": "x", "b": "y"}, "id2label has keys that are not integers"),
        ("id2label", ["x", "y"], r"id2label=\['x', 'y'\] must be a mapping"),
        ("id2label", {"0": 1}, "id2label=.0: 1. must map label ids to names"),
        ("num_labels", "x", "num_labels='x' must be a non-negative integer"),
        ("num_labels", 2.5, "num_labels=2.5 must be a non-negative integer"),
        ("vocab_size", "300", "vocab_size='300' must be a positive integer"),
        ("vocab_size", 300.0, "vocab_size=300.0 must be a positive integer"),
        ("n_inner", "176", "n_inner='176' must be a positive integer or None"),
        ("n_inner", True, "n_inner=True must be a positive integer or None"),
        ("resid_pdrop", "0.1", "resid_pdrop='0.1' must be a number"),
        ("use_cache", "true", "use_cache='true' must be true or false"),
        ("activation_function", 3, "activation_function=3 must be a string"),
        ("summary_type", 3, "summary_type=3 must be a string"),
        ("architectures", "GPT2LMHeadModel", "architectures='GPT2LMHeadModel' must be a list of class names or null"),
        ("problem_type", ["x"], r"problem_type=\['x'\] is not one of"),
    ],
)
def test_config_fields_of_the_wrong_type_name_the_file_and_the_field(tmp_path, field, value, message):
    path = tmp_path / "config.json"
    values = {**VALID, field: value}
    if field == "num_labels":
        values.pop("id2label", None)
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=f"^{path}: config {message}"):
        GPT2Config.from_json_file(path)


def test_nan_epsilon_and_an_unreadable_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"layer_norm_epsilon": NaN}')
    with pytest.raises(ValueError, match=f"^{path}: config layer_norm_epsilon=nan must be a positive number"):
        GPT2Config.from_json_file(path)
    path.unlink()
    path.mkdir()
    with pytest.raises(ValueError, match=f"^{path} could not be read: Is a directory"):
        GPT2Config.from_json_file(path)


def test_any_positive_epsilon_and_a_field_named_extra_are_taken(tmp_path):
    # transformers' own tests build GPT-2 with layer_norm_epsilon=1.0; an unknown field is kept, whatever its name.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**VALID, "model_type": "gpt2", "layer_norm_epsilon": 1.0, "extra": None, "n_ctx": 64}))
    config = GPT2Config.from_json_file(path)
    assert config.layer_norm_epsilon == 1.0 and config.extra == {"model_type": "gpt2", "extra": None, "n_ctx": 64}
    assert GPT2Config.from_dict(config.to_dict()) == config
