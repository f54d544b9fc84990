"""The CPU benchmark's quantized tritongpt2 rows: made from the same model, labelled with format and
activation dtype, timed on their workloads only, running quantized weights, and left out of the
float parity check."""

import pytest
import torch

from tritongpt2.bench import suite
from tritongpt2.bench.peaks import Peaks
from tritongpt2.bench.runners import QuantizedTritonGPT2Runner
from tritongpt2.bench.suite import CPU_IMPLS, CPU_QUANTIZED, CPU_QUANTIZED_WORKLOADS, QUICK_SHAPE, Workload, build_model, run_suite
from tritongpt2.engine.quantize import Quantization
from tritongpt2.kernels import torch_ops
from tritongpt2.kernels.quantized_weight import QuantizedWeight

pytest.importorskip("transformers")
CPU = torch.device("cpu")
PEAKS = Peaks(copy_gb_s=10.0, matmul_tflop_s=0.1)
QUANTIZED_NAMES = [f"tritongpt2-{f}-{str(d).removeprefix('torch.')}" for f, d in CPU_QUANTIZED]


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(QUICK_SHAPE, torch.float32, CPU)


@pytest.fixture
def products(monkeypatch):
    """(format, activation dtype) of every quantized product and row gather the torch backend runs."""
    seen = []
    matmul, gather = torch_ops.quantized_matmul, torch_ops.gather_rows

    def spy_matmul(rows, weight, bias=None):
        seen.append(("matmul", weight.format, rows.dtype))
        return matmul(rows, weight, bias)

    def spy_gather(weight, index):
        seen.append(("gather", weight.format, None))
        return gather(weight, index)

    monkeypatch.setattr(torch_ops, "quantized_matmul", spy_matmul)
    monkeypatch.setattr(torch_ops, "gather_rows", spy_gather)
    return seen


def test_the_cpu_suite_makes_every_quantized_runner(tiny_model):
    made = dict(suite.runners_for(tiny_model, CPU))
    assert set(QUANTIZED_NAMES) <= set(made) and set(QUANTIZED_NAMES) <= set(CPU_IMPLS)
    assert {"tritongpt2-int8-bfloat16", "tritongpt2-int8-float32", "tritongpt2-int4-bfloat16", "tritongpt2-nf4-bfloat16"} <= set(made)
    runner = made["tritongpt2-int8-bfloat16"]()
    assert runner.only == CPU_QUANTIZED_WORKLOADS and runner.backend == "torch"
    # No quantized rows for a model that is not float32: they quantize the float32 weights.
    assert not set(QUANTIZED_NAMES) & set(dict(suite.runners_for(build_model(QUICK_SHAPE, torch.bfloat16, CPU), CPU)))


@pytest.mark.parametrize("fmt,dtype", CPU_QUANTIZED, ids=QUANTIZED_NAMES)
def test_a_quantized_runner_runs_quantized_weights_in_its_activation_dtype(tiny_model, products, fmt, dtype):
    runner = QuantizedTritonGPT2Runner(tiny_model, Quantization(fmt), dtype)
    layer = runner.weights.layers[0]
    assert isinstance(layer.fc_weight, QuantizedWeight) and layer.fc_weight.format == fmt
    assert runner.weights.wte is runner.weights.lm_head and runner.weights.dtype == dtype
    assert layer.fc_bias.dtype == dtype and runner.weights.ln_f_weight.dtype == dtype
    float_bytes = sum(p.numel() * p.element_size() for p in tiny_model.parameters())  # the tied wte once
    assert runner.weight_bytes < float_bytes / (2 if dtype == torch.float32 else 3)
    ids = torch.randint(0, QUICK_SHAPE.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    hidden = runner.embed(ids)
    assert hidden.dtype == dtype and hidden.shape == (1, 12, QUICK_SHAPE.n_embd)
    products.clear()
    logits = runner.decode_step(ids, 16)()
    assert torch.isfinite(logits.float()).all() and logits.shape == (1, QUICK_SHAPE.vocab_size)
    runner.release()
    # The prompt's prefill (no logits) and one step: every layer's four products and the step's LM
    # head ran quantized, on rows in the activation dtype; the embedding gathered quantized rows.
    assert ("gather", fmt, None) in products
    matmuls = [p for p in products if p[0] == "matmul"]
    assert len(matmuls) == 8 * QUICK_SHAPE.n_layer + 1 and set(matmuls) == {("matmul", fmt, dtype)}


def test_quantized_rows_are_labelled_and_timed_on_their_workloads_only(tiny_model):
    def runners(model, device):
        return [(name, make) for name, make in suite.runners_for(model, device)
                if name in ("hf-eager", "tritongpt2", "tritongpt2-int8-bfloat16", "tritongpt2-nf4-bfloat16")]

    workloads = (Workload("embed", 1, 16), Workload("embed", 1, 8), Workload("decode", 1, 128))
    document = run_suite([QUICK_SHAPE], [torch.float32], CPU, workloads=workloads, runners=runners, rounds=1,
                         warmup=1, repeats=2, peaks=PEAKS)
    rows = {(r["workload"], r.get("seq", r.get("context")), r["impl"]): r for r in document["results"]}
    assert not [r for r in document["results"] if "error" in r]
    for impl in ("tritongpt2-int8-bfloat16", "tritongpt2-nf4-bfloat16"):
        for key in (("embed", 16, impl), ("decode", 128, impl)):
            assert rows[key]["median_ms"] > 0 and set(rows[key]["speedup_vs"]) == {"hf-eager"}
        assert ("embed", 8, impl) not in rows  # not one of CPU_QUANTIZED_WORKLOADS
    assert ("embed", 8, "tritongpt2") in rows
    # The float parity check holds the float runner only: quantized logits are not the float model's.
    assert [c["impl"] for c in document["parity"]] == ["tritongpt2 (torch)"]
    # Roofline figures count the quantized weights' bytes and bfloat16 activations: int8 moves fewer.
    int8, ours = rows[("decode", 128, "tritongpt2-int8-bfloat16")], rows[("decode", 128, "tritongpt2")]
    assert int8["bandwidth_pct"] * int8["median_ms"] < ours["bandwidth_pct"] * ours["median_ms"]
