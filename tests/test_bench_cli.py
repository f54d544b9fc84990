"""The bench and audit commands, in process, with their long work replaced by canned results: where
they write, which device --quick picks, the cubin dump's file names."""

import json
import os
from pathlib import Path

import pytest
import torch

from tritongpt2 import cli
from tritongpt2.bench import compile_audit, report, suite, traffic_audit
from tritongpt2.bench.compile_audit import CompileResult

pytest.importorskip("transformers")
COMMITTED = Path(report.__file__).resolve().parent / "results"


def canned_document(device: str = "CPU test", quick: bool = True) -> dict:
    record = {"model": "tiny", "dtype": "float32", "workload": "decode", "batch": 2, "context": 32, "impl": "hf-eager",
              "median_ms": 1.0, "spread_ms": [0.9, 1.1], "rounds_ms": [0.9, 1.1], "tokens_per_s": 2000.0,
              "roofline_pct": 5.0, "bandwidth_pct": 5.0}
    return {"device": device, "date": "2026-01-01", "versions": {"torch": torch.__version__}, "quick": quick,
            "peak": {"copy_gb_s": 10.0, "matmul_tflop_s": 0.1}, "rounds": 2, "parity": [], "results": [record]}


def snapshot(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


@pytest.fixture
def fake_suite(monkeypatch):
    """run_suite replaced by one that records its arguments and returns a canned document."""
    seen = {}

    def run_suite(shapes, dtypes, device, **options):
        seen.update(shapes=shapes, dtypes=dtypes, device=device, **options)
        return canned_document(quick=options.get("quick", False))

    monkeypatch.setattr(suite, "run_suite", run_suite)
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))  # --quick sets it: restored after
    return seen


def test_quick_runs_on_the_cpu_where_cuda_is_available(fake_suite, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.main(["bench", "--quick", "--output", str(tmp_path)]) == 0
    assert fake_suite["device"] == torch.device("cpu")
    # The implementations it times there run on the CPU: tritongpt2 on the torch backend.
    device = fake_suite["device"]
    made = dict(suite.runners_for(suite.build_model(suite.QUICK_SHAPE, torch.float32, device), device))
    assert "tritongpt2-nograph" not in made and made["tritongpt2"]().backend == "torch"
    assert cli.main(["bench", "--quick", "--device", "cuda", "--output", str(tmp_path)]) == 2


def test_bench_writes_a_new_folder_per_run_by_default(fake_suite, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    before = snapshot(COMMITTED)
    assert cli.main(["bench", "--quick"]) == 0
    [run] = (tmp_path / "tritongpt2-results").iterdir()
    assert run.name.startswith("CPU-") and {p.suffix for p in run.iterdir()} >= {".json", ".md"}
    assert snapshot(COMMITTED) == before


def test_update_committed_writes_the_checkouts_results_on_purpose(fake_suite, monkeypatch, tmp_path):
    monkeypatch.setattr(report, "committed_results_folder", lambda: tmp_path / "committed")
    assert cli.main(["bench", "--quick", "--update-committed"]) == 0
    assert list((tmp_path / "committed" / "quick").glob("*.json"))
    assert cli.main(["bench", "--quick", "--update-committed", "--output", str(tmp_path)]) == 2


def test_workloads_picks_a_subset_of_the_devices_workloads_by_label(fake_suite, tmp_path):
    assert cli.main(["bench", "--quick", "--workloads", "decode 2x32, embed 2x16", "--output", str(tmp_path)]) == 0
    assert [work.label for work in fake_suite["workloads"]] == ["decode 2x32", "embed 2x16"]
    assert cli.main(["bench", "--quick", "--output", str(tmp_path)]) == 0
    assert fake_suite["workloads"] is None  # every one


def test_an_unknown_workload_is_refused_by_name(fake_suite, tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--workloads", "decode 2x32,decode 9x9", "--output", str(tmp_path)]) == 2
    assert "--workloads decode 9x9: not among this device's workloads (embed 2x16, " in capsys.readouterr().err


def test_the_results_are_written_after_each_model(fake_suite, tmp_path):
    assert cli.main(["bench", "--quick", "--output", str(tmp_path)]) == 0
    fake_suite["on_results"](canned_document(device="CPU partial"))
    assert (tmp_path / "CPU-partial-2026-01-01-quick.json").exists()


def test_error_rows_make_the_command_fail(monkeypatch, tmp_path):
    document = canned_document()
    document["results"].append(document["results"][0] | {"impl": "hf-sdpa", "error": "RuntimeError: boom"})
    monkeypatch.setattr(suite, "run_suite", lambda *args, **options: document)
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    assert cli.main(["bench", "--quick", "--output", str(tmp_path)]) == 1
    assert "failed: RuntimeError: boom" in next(tmp_path.glob("*.md")).read_text()


TRAFFIC_ROW = {"model": "gpt2", "workload": "decode", "batch": 1, "context": 1024, "n_layer": 12, "dtype": "float16",
               "impl": "tritongpt2", "quantization": None, "bytes": 2, "ideal_bytes": 1, "ratio_to_ideal": 2.0,
               "distinct_bytes": 1, "distinct_ratio_to_ideal": 1.0, "launches": 56,
               "launches_per_layer": 4, "fewest_programs": 144, "programs_per_kernel": {}, "per_layer_bytes": {}}


def test_traffic_audit_leaves_the_committed_file_alone_by_default(monkeypatch, tmp_path):
    monkeypatch.setattr(traffic_audit, "run_traffic_audit", lambda *args: [dict(TRAFFIC_ROW)])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.chdir(tmp_path)
    before = snapshot(COMMITTED)
    assert cli.main(["audit", "traffic"]) == 0
    [written] = (tmp_path / "tritongpt2-results").glob("traffic-*/traffic-gpt2.json")
    assert json.loads(written.read_text())["results"] == [TRAFFIC_ROW]
    assert snapshot(COMMITTED) == before
    monkeypatch.setattr(report, "committed_results_folder", lambda: tmp_path / "committed")
    assert cli.main(["audit", "traffic", "--update-committed"]) == 0
    assert (tmp_path / "committed" / "traffic-gpt2.json").exists()


def test_cubin_dump_has_short_file_names_and_an_index(monkeypatch, tmp_path):
    config = ",".join(f"BLOCK_{i}={2 ** (i % 8)}" for i in range(40)) + ",x16:stride_am+stride_bk+N+K,warps=8,stages=3"
    results = [CompileResult("linear_kernel", config + suffix, arch, "float16", ["gpt2 decode"], registers=128,
                             spill_bytes=0, shared_bytes=1024, tensor_core="mma.sync", cubin=b"cubin " + suffix.encode())
               for suffix in ("", ",LAYER_NORM=True") for arch in ("sm_90", "sm_80")]
    assert len(f"{results[0].kernel}-{results[0].config}") > 255
    monkeypatch.setattr(compile_audit, "run_compile_audit", lambda shapes, archs, dtypes: results)
    assert cli.main(["audit", "compile", "--models", "gpt2", "--dump", str(tmp_path)]) == 0
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(index) == 4 and all(len(name) < 100 and (tmp_path / name).exists() for name in index)
    for name, entry in index.items():
        [result] = [r for r in results if (r.config, r.arch) == (entry["config"], entry["arch"])]
        assert (tmp_path / name).read_bytes() == result.cubin and name.startswith("linear_kernel-" + result.arch)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--models", "notamodel"], "argument --models: unknown model 'notamodel'; known: distilgpt2, gpt2"),
        (["--quick", "--models", "notamodel"], "argument --models: unknown model 'notamodel'"),
        (["--models", "gpt2,gpt3"], "unknown model 'gpt3'"),
        (["--dtypes", "float64"], "argument --dtypes: unknown dtype 'float64'; known: float32, float16, bfloat16"),
    ],
)
def test_unknown_models_and_dtypes_fail_before_anything_runs(fake_suite, capsys, tmp_path, args, message):
    with pytest.raises(SystemExit) as exited:
        cli.main(["bench", *args, "--output", str(tmp_path)])
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert not fake_suite


def test_quick_refuses_models_it_would_not_run(fake_suite, capsys, tmp_path):
    assert cli.main(["bench", "--quick", "--models", "gpt2", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "tritongpt2: error: --quick times its own tiny model; --models does not apply to it\n"
    assert not fake_suite


@pytest.mark.parametrize("error,status", [(0.9e-5, 0), (1.1e-5, 1)])
def test_parity_is_held_to_its_earned_limit(monkeypatch, tmp_path, capsys, error, status):
    document = canned_document()
    document["parity"] = [{"model": "tiny", "dtype": "float32", "impl": "tritongpt2 (torch)", "hf_eager_error_vs_float64": 2e-7,
                           "limit": suite.parity_limit(torch.float32, 2e-7), "relative_error_vs_float64": error,
                           "relative_error_vs_hf_eager": error}]
    assert document["parity"][0]["limit"] == pytest.approx(1.04e-5)
    monkeypatch.setattr(suite, "run_suite", lambda *args, **options: document)
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    assert cli.main(["bench", "--quick", "--output", str(tmp_path)]) == status
    assert ("PARITY FAILED" in capsys.readouterr().err) == bool(status)
    assert f"| tiny float32 | tritongpt2 (torch) | {error:.2e} | 1.04e-05 | {error:.2e} |" in next(tmp_path.glob("*.md")).read_text()
