"""The tokenizer from a checkpoint folder: tokenizer.json, or vocab.json with merges.txt, and the
settings of tokenizer_config.json."""

import json

import pytest

from tokenizer_files import hf_tokenizer, write_tokenizer
from tritongpt2.engine.tokenizer import GPT2Tokenizer

transformers = pytest.importorskip("transformers")
TEXT = "Hello world, the quick brown fox<|endoftext|> jumps"


def test_vocab_and_merges_encode_as_transformers(tmp_path):
    write_tokenizer(tmp_path)
    ours, theirs = GPT2Tokenizer.from_pretrained(tmp_path), hf_tokenizer(tmp_path)
    assert ours.encode(TEXT) == theirs.encode(TEXT)
    assert ours.decode(ours.encode(TEXT)) == TEXT
    assert ours.eos_token_id == theirs.convert_tokens_to_ids("<|endoftext|>")


def test_tokenizer_config_settings_are_honoured(tmp_path):
    write_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_prefix_space": True, "add_bos_token": True}))
    ours = GPT2Tokenizer.from_pretrained(tmp_path)
    theirs = hf_tokenizer(tmp_path, add_prefix_space=True)
    assert ours.encode("Hello world") == [ours.bos_token_id] + theirs.encode("Hello world")
    (tmp_path / "tokenizer_config.json").unlink()
    assert ours.encode("Hello")[1:] == GPT2Tokenizer.from_pretrained(tmp_path).encode(" Hello")


def test_tokenizer_json_is_preferred(tmp_path):
    write_tokenizer(tmp_path)
    hf_tokenizer(tmp_path).backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "vocab.json").unlink()
    assert GPT2Tokenizer.from_pretrained(tmp_path).encode(TEXT) == hf_tokenizer_from_json(tmp_path).encode(TEXT)


def hf_tokenizer_from_json(folder):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer in"):
        GPT2Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("vocab.json", "garbage", "vocab.json and .*merges.txt: not a readable tokenizer: Error while reading BPE files"),
        ("tokenizer.json", '{"x":', "tokenizer.json: not a readable tokenizer"),
        ("tokenizer_config.json", "{not json", "tokenizer_config.json is not a readable JSON file"),
        ("tokenizer_config.json", "[1]", "tokenizer_config.json holds a JSON list, not an object of settings"),
    ],
)
def test_broken_tokenizer_files_are_a_value_error_naming_them(tmp_path, name, text, message):
    write_tokenizer(tmp_path)
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        GPT2Tokenizer.from_pretrained(tmp_path)
