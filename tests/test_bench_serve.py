"""`tritongpt2 bench --serve` runs end to end on a tiny model and writes its figures (the figures
themselves are measured by the command, not checked here)."""

import json

import pytest
import torch

pytest.importorskip("openai")
pytest.importorskip("transformers")

from tritongpt2 import cli  # noqa: E402
from tritongpt2.bench.serve_load import LoadSettings, run_serve_load, serve_results_stem, write_serve_results  # noqa: E402
from tritongpt2.bench.suite import QUICK_SHAPE  # noqa: E402


def test_the_load_figures_are_measured_and_written(tmp_path):
    settings = LoadSettings(prompt_tokens=4, max_tokens=8, requests_per_stream=2, embed_tokens=4, embed_requests=4, rounds=2, max_seq=64)
    document = run_serve_load(QUICK_SHAPE, torch.float32, torch.device("cpu"), settings=settings, streams=(1, 3),
                              embed_clients=(1, 2))
    assert [g["streams"] for g in document["generation"]] == [1, 3]
    assert all(g["tokens"] > 0 and g["tokens_per_s"] > 0 for g in document["generation"])
    assert document["generation"][0]["speedup_vs_1_stream"] == 1.0 and len(document["load_average_1min_per_round"]) == 2
    assert [(e["clients"], e["requests"]) for e in document["embedding"]] == [(1, 8), (2, 8)]
    assert all(0 < e["p50_ms"] <= e["p99_ms"] for e in document["embedding"])
    json_path, markdown_path = write_serve_results(document, tmp_path)
    assert json.loads(json_path.read_text())["backend"] == "torch" and document["settings"]["max_batch"] == 3
    assert "| 3 |" in markdown_path.read_text() and "p99 ms" in markdown_path.read_text()


def test_serve_load_takes_one_model_and_dtype(capsys):
    assert cli.main(["bench", "--serve", "--models", "gpt2,distilgpt2"]) == 2
    assert "one model in one dtype" in capsys.readouterr().err


def test_runs_of_other_dtypes_are_named_beside_the_default():
    # A bfloat16 run on the same device and day must not overwrite the float32 one's files.
    document = {"device": "CPU Test", "date": "2026-12-07"}
    stems = [serve_results_stem({**document, "model": model, "dtype": dtype})
             for model, dtype in [("gpt2", "float32"), ("gpt2", "bfloat16"), ("distilgpt2", "float32")]]
    assert stems == ["serve-CPU-Test-2026-12-07", "serve-CPU-Test-gpt2-bfloat16-2026-12-07",
                     "serve-CPU-Test-distilgpt2-float32-2026-12-07"]
