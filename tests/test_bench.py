"""The benchmark suite runs (bench --quick on the CPU backends, with its parity check), and a CPU
timing of the engine as a pytest-benchmark test."""

import json
import os
import subprocess
import sys

import pytest
import torch

from checkpoints import save_model
from tritongpt2.bench.suite import add_ratios, roofline_pct, QUICK_SHAPE, Workload
from tritongpt2.bench.peaks import Peaks
from tritongpt2.engine.engine import Engine

pytest.importorskip("transformers")
RECORD_KEYS = {"model", "dtype", "workload", "batch", "impl", "median_ms", "tokens_per_s", "roofline_pct"}


def test_quick_bench_runs_and_checks_parity(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "tritongpt2.cli", "bench", "--quick", "--output", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = list(tmp_path.glob("*.json"))
    document = json.loads(path.read_text())
    assert document["device"].startswith("CPU") and document["quick"] is True
    assert {"torch", "triton"} <= set(document["versions"]) and set(document["peak"]) == {"copy_gb_s", "matmul_tflop_s"}
    assert {r["workload"] for r in document["results"]} == {"embed", "prefill", "decode", "generate"}
    assert {r["impl"] for r in document["results"]} == {"hf-eager", "hf-sdpa", "tritongpt2"}
    for record in document["results"]:
        assert RECORD_KEYS <= set(record) and ("seq" in record or "context" in record)
        if record["impl"] == "tritongpt2":
            assert set(record["speedup_vs"]) == {"hf-eager", "hf-sdpa"}
    assert {c["impl"] for c in document["parity"]} == {"tritongpt2 (torch)", "tritongpt2 (interpret)"}
    assert all(c["relative_error_vs_hf_eager"] < 1e-4 for c in document["parity"])
    assert path.with_suffix(".md").exists()


def test_roofline_and_ratios_arithmetic():
    peaks = Peaks(copy_gb_s=1000.0, matmul_tflop_s=100.0)
    model = torch.nn.Linear(1000, 1000, bias=False)  # 4 MB of float32 weights
    decode = roofline_pct(QUICK_SHAPE, model, Workload("decode", 1, 0), ms=0.008, peaks=peaks)
    assert decode == pytest.approx(50.0)  # 4 MB at 1 TB/s is 4 us: half of 8 us
    records = [{"model": "m", "dtype": "f", "workload": "decode", "batch": 1, "context": 8, "impl": impl, "median_ms": ms}
               for impl, ms in [("hf-eager", 4.0), ("tritongpt2", 1.0)]]
    add_ratios(records)
    assert records[1]["speedup_vs"] == {"hf-eager": 4.0} and "speedup_vs" not in records[0]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder, _ = save_model(tmp_path_factory.mktemp("bench"))
    return Engine.from_pretrained(folder, backend="torch")


def test_engine_embedding_speed(benchmark, engine):
    ids = torch.randint(0, 300, (1, 16))
    out = benchmark(lambda: engine.prefill(ids, logits=None, hidden=True))
    assert out.hidden_states.shape == (1, 16, 80)
