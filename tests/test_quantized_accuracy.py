"""A quantized engine against float32 on the same weights (bench/quantization_accuracy.py): the engine's
quantized matmuls add almost nothing to the format's own error, CTranslate2's int8 adds to it, and the
memory figures are the tensors'."""

from __future__ import annotations

import pytest
import torch

from numerics import BACKEND
from tritongpt2.bench.model_shapes import ModelShape, model_shape
from tritongpt2.bench.quantization_accuracy import (
    MEASURED, Int8AgainstCTranslate2Row, int8_against_ctranslate2, measure, measured_weights_mb, memory_table, weights_mb,
)
from tritongpt2.engine.config import GPT2Config
from tritongpt2.engine.quantize import quantize_weights
from tritongpt2.engine.weights import shared_weights
from tritongpt2.bench.suite import build_model

TINY = ModelShape("tiny", 128, 4, 2, vocab_size=320, n_positions=64)
# The bound: the engine's logits error within 1.3x of plain quantize-then-dequantize.
KERNEL_RATIO = 1.3


# The kernels under the interpreter are slow: one format of each kind there (tests/test_quantized_kernels.py
# holds every format's kernels to the reference).
@pytest.mark.slow
@pytest.mark.parametrize("backend, tokens, formats", [
    ("torch", 32, MEASURED), (BACKEND, 3, (MEASURED[0], MEASURED[2], MEASURED[5])),
], ids=["torch", BACKEND])
def test_quantized_engine_error_is_the_formats_own(backend: str, tokens: int, formats: tuple) -> None:
    rows = measure(TINY, formats, new_tokens=tokens, backend=backend)
    assert [row.format for row in rows] == [q.describe() for q in formats]
    for row in rows:
        # The format does change the logits (a blind comparison would show 0 here) ...
        assert row.plain_rel_error > 1e-4, row
        # ... and the engine adds almost nothing beyond it.
        assert row.kernel_ratio <= KERNEL_RATIO, row
        assert 0 < row.layer_rel_error < row.logits_rel_error, row
        assert 0 <= row.greedy_prefix <= row.top1_agreement <= tokens


def test_ctranslate2_int8_adds_error_where_ours_adds_none() -> None:
    """The CPU benchmark's int8 baseline quantizes the products' input rows too: its logits carry more
    than int8's own error, where tritongpt2's weight-only int8 adds nothing in float32 activations and
    stays within the issue's bound in bfloat16 ones (which round the activations themselves)."""
    pytest.importorskip("ctranslate2")
    rows = int8_against_ctranslate2(TINY, tokens=32)
    impls = ["tritongpt2 int8, float32 activations", "tritongpt2 int8, bfloat16 activations", "ctranslate2 int8"]
    assert [(row.layers, row.impl) for row in rows] == [(layers, impl) for layers in (1, 2) for impl in impls]
    for layers in (1, 2):
        ours, ours_bfloat16, theirs = (row for row in rows if row.layers == layers)
        assert ours.int8_rel_error > 1e-3, ours  # int8 does change the logits: the ratios are not 0 / 0
        assert ours.ratio == pytest.approx(1.0, abs=1e-4), ours
        assert ours_bfloat16.ratio <= KERNEL_RATIO, ours_bfloat16
        assert theirs.ratio > 1.2, theirs


def test_greedy_agreement_is_not_blind() -> None:
    """int8 follows float32's continuation; the continuation itself depends on the prompt."""
    rows = measure(TINY, (MEASURED[0],), new_tokens=24, seed=1)
    assert rows[0].top1_agreement >= 20
    model = build_model(TINY, torch.float32, torch.device("cpu"), seed=1)
    a = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    b = model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert not torch.equal(a[0, 3:], b[0, 3:])


@pytest.mark.parametrize("quantization", MEASURED, ids=str)
def test_memory_formula_is_the_quantized_tensors(quantization) -> None:
    model = build_model(TINY, torch.float32, torch.device("cpu"))
    config = GPT2Config.from_dict(model.config.to_dict())
    weights = quantize_weights(shared_weights(model, config), config, quantization)
    assert measured_weights_mb(weights) == pytest.approx(weights_mb(TINY, quantization, 4), rel=1e-9)


def test_memory_table_orders_the_formats() -> None:
    table = {row["model"]: row for row in memory_table([model_shape("gpt2"), model_shape("gpt2-xl")])}
    gpt2, xl = table["gpt2"], table["gpt2-xl"]
    assert gpt2["float32"] == pytest.approx(2 * gpt2["float16"])
    for row in (gpt2, xl):
        assert row["float16"] > row["int8 (per-channel scales)"] > row["int4 (groups of 32)"] > row["nf4 (groups of 64)"]
        assert row["nf4 (groups of 64)"] > row["nf4 (groups of 64, double quantization)"]
    assert 6000 < xl["float32"] < 6400  # 1.56 billion weights


def test_audit_quantization_writes_the_measurement(tmp_path, monkeypatch, capsys) -> None:
    import json

    from tritongpt2.bench import ctranslate2_runner, quantization_accuracy
    from tritongpt2.cli import main

    real = quantization_accuracy.measure
    asked = {}

    def on_tiny(shape, **options):
        asked.update(options, model=shape.name)
        return real(TINY, MEASURED[:2], **options)

    def against(shape):
        asked["against"] = shape.name
        return [Int8AgainstCTranslate2Row("ctranslate2 int8", 1, 0.3, 0.2, 1.5)]

    monkeypatch.setattr(quantization_accuracy, "measure", on_tiny)
    monkeypatch.setattr(quantization_accuracy, "int8_against_ctranslate2", against)
    monkeypatch.setattr(ctranslate2_runner, "ctranslate2_installed", lambda: True)
    assert main(["audit", "quantization", "--model", "gpt2", "--tokens", "4", "--output", str(tmp_path)]) == 0
    assert asked == {"model": "gpt2", "new_tokens": 4, "dtype": torch.float32, "against": "gpt2"}
    document = json.loads((tmp_path / "quantization-gpt2-float32.json").read_text())
    assert [row["format"] for row in document["rows"]] == [q.describe() for q in MEASURED[:2]]
    assert {row["model"] for row in document["memory_mb"]} == {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}
    assert document["int8_against_ctranslate2"] == [
        {"impl": "ctranslate2 int8", "layers": 1, "logits_rel_error": 0.3, "int8_rel_error": 0.2, "ratio": 1.5}]
    text = (tmp_path / "quantization-gpt2-float32.md").read_text()
    assert "| int8 (per-channel scales) |" in text and "| 1 | ctranslate2 int8 | 0.30000 | 0.20000 | 1.500 |" in text

    # Without ctranslate2 the comparison is left out, and the run says so.
    monkeypatch.setattr(ctranslate2_runner, "ctranslate2_installed", lambda: False)
    assert main(["audit", "quantization", "--model", "gpt2", "--tokens", "4", "--output", str(tmp_path)]) == 0
    assert "int8 is not compared with CTranslate2's" in capsys.readouterr().err
    assert "int8_against_ctranslate2" not in json.loads((tmp_path / "quantization-gpt2-float32.json").read_text())
    assert "CTranslate2" not in (tmp_path / "quantization-gpt2-float32.md").read_text()
