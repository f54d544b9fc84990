"""The tritongpt2 command end to end, on a random-weight checkpoint with GPT-2's tokenizer files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tokenizer_files import hf_tokenizer, save_model_with_tokenizer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model_with_tokenizer(tmp_path_factory.mktemp("cli"), n_layer=2)


def cli(*args, stdin=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "tritongpt2.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=env, timeout=600)


def hf_greedy_text(folder, model, prompt, new_tokens):
    tokenizer = hf_tokenizer(folder)
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return prompt + tokenizer.decode(out[0, ids.shape[1]:])


def test_greedy_generation_text_equals_transformers(checkpoint):
    folder, model = checkpoint
    prompt = "Hello, my name is"
    result = cli("generate", "--model", folder, "--max-new-tokens", 12, prompt)
    assert result.returncode == 0, result.stderr
    assert result.stdout == hf_greedy_text(folder, model, prompt, 12) + "\n"


def test_prompt_from_standard_input_and_sampling(checkpoint):
    folder, _ = checkpoint
    first = cli("generate", "--model", folder, "--max-new-tokens", 6, "--top-k", 5, "--seed", 3, stdin="The weather\n")
    again = cli("generate", "--model", folder, "--max-new-tokens", 6, "--top-k", 5, "--seed", 3, stdin="The weather\n")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("The weather") and first.stdout == again.stdout


def test_errors_are_one_clear_line(checkpoint, tmp_path):
    result = cli("generate", "--model", tmp_path / "missing", "hi")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"tritongpt2: error: no checkpoint folder at {tmp_path / 'missing'}"]
    folder, _ = checkpoint
    result = cli("embed", "--model", folder)
    assert result.returncode == 2 and result.stderr.strip() == "tritongpt2: error: no text to embed"


@pytest.mark.parametrize("pooling", ["mean", "last", "first"])
def test_embed_writes_json_and_npy(checkpoint, tmp_path, pooling):
    folder, model = checkpoint
    texts = ["The quick brown fox", "Hello"]
    result = cli("embed", "--model", folder, "--pooling", pooling, "--normalize", *texts)
    assert result.returncode == 0, result.stderr
    vectors = np.array(json.loads(result.stdout)["embeddings"])
    assert vectors.shape == (2, 80)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    out = tmp_path / "vectors.npy"
    assert cli("embed", "--model", folder, "--pooling", pooling, "--normalize", "--output", out, *texts).returncode == 0
    np.testing.assert_allclose(np.load(out), vectors, rtol=1e-6)
