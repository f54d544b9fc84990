"""The benchmark suite runs (bench --quick on the CPU backends, with its parity check), and a CPU
timing of the engine as a pytest-benchmark test (timed when pytest runs in one process; under
xdist's workers, as README's test command runs, pytest-benchmark runs it once, untimed)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from checkpoints import in_float64, save_model
from numerics import assert_close
from tritongpt2.bench.ctranslate2_runner import CTranslate2Runner
from tritongpt2.bench.runners import HFRunner
from tritongpt2.bench.ideal import ideal_bytes
from tritongpt2.bench.suite import add_ratios, bandwidth_pct, build_model, roofline_pct, QUICK_SHAPE, Workload
from tritongpt2.bench.peaks import Peaks
from tritongpt2.engine.engine import Engine

pytest.importorskip("transformers")
BASELINES = {"hf-eager", "hf-sdpa", "ctranslate2-float32", "ctranslate2-int8"}
RECORD_KEYS = {"model", "dtype", "workload", "batch", "impl", "median_ms", "spread_ms", "rounds_ms", "tokens_per_s",
               "roofline_pct", "bandwidth_pct"}


@pytest.mark.slow
def test_quick_bench_runs_and_checks_parity(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "tritongpt2.cli", "bench", "--quick", "--output", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    # Progress on stderr, and none of transformers' own bars and messages.
    assert "left" in result.stderr and "hf-eager · round 2/2" in result.stderr
    for noise in ("Writing model shards", "Loading weights", "[transformers]"):
        assert noise not in result.stderr
    [path] = list(tmp_path.glob("*.json"))
    document = json.loads(path.read_text())
    assert document["device"].startswith("CPU") and document["quick"] is True and document["rounds"] == 2
    assert {"torch", "triton"} <= set(document["versions"]) and set(document["peak"]) == {"copy_gb_s", "matmul_tflop_s"}
    assert {r["workload"] for r in document["results"]} == {"embed", "prefill", "decode", "generate"}
    assert {r["impl"] for r in document["results"]} == BASELINES | {"tritongpt2"}
    for record in document["results"]:
        assert RECORD_KEYS <= set(record) and ("seq" in record or "context" in record)
        assert record["median_ms"] > 0 and record["tokens_per_s"] > 0 and len(record["rounds_ms"]) == 2
        assert record["spread_ms"] == [min(record["rounds_ms"]), max(record["rounds_ms"])]
        if record["impl"] == "tritongpt2":
            assert set(record["speedup_vs"]) == set(record["speedup_spread_vs"]) == BASELINES
        assert ("note" in record) == (record["impl"].startswith("ctranslate2") and record["workload"] == "embed")
    assert {c["impl"] for c in document["parity"]} == {"tritongpt2 (torch)", "tritongpt2 (interpret)"}
    assert all(c["relative_error_vs_float64"] <= c["limit"] < 1e-4 for c in document["parity"])
    assert "includes the LM head" in path.with_suffix(".md").read_text()
    assert path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_roofline_and_ratios_arithmetic():
    peaks = Peaks(copy_gb_s=1000.0, matmul_tflop_s=100.0)
    # Decode is bound by its bytes (weights and the KV cache up to the context): at 1 TB/s they take
    # bytes / 1e12 s, so a step of twice that is at 50% of the roofline.
    decode = Workload("decode", 1, 100)
    needed = ideal_bytes(QUICK_SHAPE, "decode", 1, 100, 4)
    kv = 2 * QUICK_SHAPE.n_layer * QUICK_SHAPE.n_embd * 4 * 100  # 100 cached tokens, float32
    assert needed > kv
    ms = 2 * needed / 1e12 * 1e3
    assert roofline_pct(QUICK_SHAPE, decode, 4, ms, peaks) == pytest.approx(50.0)
    assert bandwidth_pct(QUICK_SHAPE, decode, 4, ms, peaks) == pytest.approx(50.0)
    # A converted copy of the weights at a quarter of their bytes (int8) has a smaller ideal.
    assert roofline_pct(QUICK_SHAPE, decode, 4, ms, peaks, weight_scale=0.25) < 50.0
    # Embedding 1 x 4096 tokens: compute-bound, so the roofline is FLOPs over the matmul rate, while
    # the bandwidth figure still counts only the bytes.
    embed = Workload("embed", 1, 4096)
    c, layers = QUICK_SHAPE.n_embd, QUICK_SHAPE.n_layer
    flops = 2 * 4096 * 12 * layers * c**2 + 2 * layers * 4096**2 * c
    embed_bytes = ideal_bytes(QUICK_SHAPE, "embed", 1, 4096, 4)
    assert flops / 100e12 > embed_bytes / 1e12
    assert roofline_pct(QUICK_SHAPE, embed, 4, ms=1.0, peaks=peaks) == pytest.approx(100 * flops / 100e12 / 1e-3, abs=0.05)
    assert bandwidth_pct(QUICK_SHAPE, embed, 4, ms=1.0, peaks=peaks) == pytest.approx(100 * embed_bytes / 1e12 / 1e-3, abs=0.05)
    assert roofline_pct(QUICK_SHAPE, Workload("generate", 1, 8, 8), 4, ms=1.0, peaks=peaks) is None
    records = [{"model": "m", "dtype": "f", "workload": "decode", "batch": 1, "context": 8, "impl": impl, "median_ms": ms,
                "rounds_ms": rounds} for impl, ms, rounds in [("hf-eager", 4.0, [4.0, 5.0]), ("tritongpt2", 1.0, [1.0, 2.0])]]
    records.append(records[0] | {"impl": "hf-sdpa", "error": "RuntimeError: boom"})
    add_ratios(records)
    assert records[1]["speedup_vs"] == {"hf-eager": 4.0} and "speedup_vs" not in records[0]
    assert records[1]["speedup_spread_vs"] == {"hf-eager": [2.5, 4.0]}  # round by round: 4/1 and 5/2


def test_engine_embedding_speed(benchmark, tmp_path):
    folder, model = save_model(tmp_path)
    engine = Engine.from_pretrained(folder, backend="torch")
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    out = benchmark(lambda: engine.prefill(ids, logits=None, hidden=True))
    with torch.no_grad():
        same_dtype = model.transformer(input_ids=ids).last_hidden_state
        oracle = in_float64(model).transformer(input_ids=ids).last_hidden_state
    assert_close(out.hidden_states, oracle, same_dtype)


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(QUICK_SHAPE, torch.float32, torch.device("cpu"))


def test_ctranslate2_baseline_computes_gpt2(tiny_model):
    runner = CTranslate2Runner(tiny_model, "float32")
    ids = torch.randint(0, QUICK_SHAPE.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    reference = HFRunner(tiny_model, "eager")
    expected = reference.prefill(ids)
    assert ((runner.prefill(ids) - expected).norm() / expected.norm()).item() < 1e-4
    hf_greedy = reference.generate(ids, 6)[:, ids.shape[1]:]
    assert torch.equal(runner.generate(ids, 6), hf_greedy)
    assert runner.decode_ms(ids, 16, torch.device("cpu"), warmup=1, repeats=3) > 0
    quantized = CTranslate2Runner(tiny_model, "int8")
    assert quantized.weight_bytes < runner.weight_bytes / 2


def test_ctranslate2_runs_in_a_process_of_its_own(tmp_path):
    # CTranslate2's OpenMP runtime and torch's slow each other down in one process (ctranslate2_runner.py):
    # the benchmark's process never loads it.
    script = (
        "import sys, torch\n"
        "from tritongpt2.bench.ctranslate2_runner import CTranslate2Runner\n"
        "from tritongpt2.bench.suite import QUICK_SHAPE, build_model\n"
        "runner = CTranslate2Runner(build_model(QUICK_SHAPE, torch.float32, torch.device('cpu')), 'int8')\n"
        "assert runner.embed_ms(torch.zeros(1, 4, dtype=torch.long), torch.device('cpu'), 1, 2) > 0\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'ctranslate2'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_ctranslate2_baseline_rejects_what_it_cannot_run(tiny_model):
    with pytest.raises(ValueError, match="'int4'"):
        CTranslate2Runner(tiny_model, "int4")
    with pytest.raises(ValueError, match="bfloat16"):
        CTranslate2Runner(build_model(QUICK_SHAPE, torch.bfloat16, torch.device("cpu")), "float32")
