"""Embedder parity with transformers' hidden states pooled the same way."""

import threading

import numpy as np
import pytest
import torch

from numerics import BACKEND
from tokenizer_files import hf_tokenizer, save_model_with_tokenizer
from tritongpt2.embedder import Embedder

pytest.importorskip("transformers")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hi", "Once upon a time there was a model", "rain"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_model_with_tokenizer(tmp_path_factory.mktemp("embedder"), "GPT2Model")


def expected(folder, model, texts, pooling, normalize):
    tokenizer = hf_tokenizer(folder)
    rows = []
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text)])
        with torch.no_grad():
            hidden = model(input_ids=ids).last_hidden_state[0]
        vector = {"mean": hidden.mean(0), "last": hidden[-1], "first": hidden[0]}[pooling]
        rows.append(torch.nn.functional.normalize(vector, dim=0) if normalize else vector)
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("backend", ["torch", BACKEND])
@pytest.mark.parametrize("pooling,normalize", [("mean", False), ("last", True), ("first", False)])
def test_embeddings_match_transformers_pooled_hidden_states(checkpoint, backend, pooling, normalize):
    folder, model = checkpoint
    embedder = Embedder.from_pretrained(folder, pooling=pooling, normalize=normalize, backend=backend, max_batch=2)
    got = embedder(TEXTS)
    assert got.shape == (4, 80) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected(folder, model, TEXTS, pooling, normalize), rtol=1e-4, atol=1e-5)


def test_safe_from_several_threads(checkpoint):
    folder, _ = checkpoint
    embedder = Embedder.from_pretrained(folder, backend="torch", max_batch=2)
    reference = embedder(TEXTS)
    results = [None] * 6

    def work(i):
        results[i] = embedder(TEXTS[i % 4:] + TEXTS[: i % 4])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in enumerate(results):
        np.testing.assert_allclose(got, np.roll(reference, -(i % 4), axis=0), rtol=1e-5, atol=1e-6)


def test_bad_input(checkpoint):
    folder, _ = checkpoint
    with pytest.raises(ValueError, match="pooling='max'"):
        Embedder.from_pretrained(folder, pooling="max", backend="torch")
    embedder = Embedder.from_pretrained(folder, backend="torch")
    with pytest.raises(ValueError, match="has no tokens"):
        embedder(["fine", ""])
    with pytest.raises(ValueError, match="texts must be strings"):
        embedder(["fine", 3])
