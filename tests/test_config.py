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
