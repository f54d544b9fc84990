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
        Embedder.from_pretrained(folder.parent / "not-there", pooling="max", backend="torch")  # before reading
    embedder = Embedder.from_pretrained(folder, backend="torch")
    with pytest.raises(ValueError, match="has no tokens"):
        embedder(["fine", ""])
    for texts, message in [
        (["fine", 3], "texts.1. is of type int, not str"),
        (None, "texts must be a str or an iterable of str, got NoneType"),
        (3, "texts must be a str or an iterable of str, got int"),
        (b"bytes", "texts must be a str or an iterable of str, got bytes"),
        ("\ud800", "texts.0. holds a lone surrogate '.ud800' at character 0: not valid Unicode text"),
        (["fine", "a\udfffb"], "texts.1. holds a lone surrogate '.udfff' at character 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            embedder(texts)


def test_any_iterable_of_strings_is_taken(checkpoint):
    folder, _ = checkpoint
    embedder = Embedder.from_pretrained(folder, backend="torch")
    expected = embedder(TEXTS)
    np.testing.assert_array_equal(embedder(text for text in TEXTS), expected)
    np.testing.assert_array_equal(embedder(tuple(TEXTS)), expected)
    np.testing.assert_array_equal(embedder(TEXTS[0]), expected[:1])
    assert embedder([]).shape == (0, 80)


def test_a_text_longer_than_the_context_is_truncated_with_a_warning(checkpoint):
    folder, model = checkpoint
    embedder = Embedder.from_pretrained(folder, backend="torch")
    long_text = " ".join(TEXTS * 6)
    ids = hf_tokenizer(folder).encode(long_text)
    assert len(ids) > 64
    with pytest.warns(UserWarning, match=f"1 text.s. longer than the model's context of max_seq=64 tokens .texts.1. has {len(ids)}.: "
                      "each is embedded from its first 64 tokens"):
        got = embedder(["rain", long_text])
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids[:64]])).last_hidden_state[0].mean(0)
    np.testing.assert_allclose(got[1], expected.numpy(), rtol=1e-4, atol=1e-5)
