"""bench/gpu.sh on a machine without a network or a recent setuptools: tritongpt2 imports from a fresh
venv through the symlinked package (no pip), the preflight stops a run that cannot work with a clear
message, and README's GPU table is rendered between its markers."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tritongpt2.bench import preflight
from tritongpt2.bench.package_overlay import build_overlay, package_dirs
from tritongpt2.bench.readme_table import END, START, render, replace_between_markers

ROOT = Path(__file__).resolve().parent.parent


def test_package_dirs_reads_pyproject_as_tomllib_does():
    tomllib = pytest.importorskip("tomllib")
    text = (ROOT / "pyproject.toml").read_text()
    assert package_dirs(text) == tomllib.loads(text)["tool"]["setuptools"]["package-dir"]


def test_tritongpt2_imports_in_a_fresh_venv_without_pip(tmp_path):
    # As on the lent GPU: the interpreter's own setuptools (65.5 here, older than 70.1) and no `wheel`,
    # where `pip install --no-index -e .` stops at "invalid command 'bdist_wheel'"; the system's
    # packages (torch, triton) seen through --system-site-packages.
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", env_dir], check=True, timeout=300)
    python = env_dir / "bin" / "python"
    overlay = subprocess.run([python, ROOT / "bench" / "package_overlay.py", tmp_path / "overlay"], capture_output=True,
                             text=True, timeout=120, check=True).stdout.strip()
    probe = ("import pathlib, tritongpt2, tritongpt2.cli, tritongpt2.kernels.launchers, tritongpt2.bench.suite; "
             "print(pathlib.Path(tritongpt2.__file__).parent); print(pathlib.Path(tritongpt2.kernels.__file__).resolve().parent)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")} | {"PYTHONPATH": overlay}
    # cwd: not the checkout, so nothing imports from it by accident; a system-wide tritongpt2 is shadowed.
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    package, kernels = result.stdout.split()
    assert Path(package) == tmp_path / "overlay" / "tritongpt2" and Path(kernels) == ROOT / "kernels"
    help_text = subprocess.run([python, "-m", "tritongpt2.cli", "bench", "--help"], capture_output=True, text=True,
                               env=env, cwd=tmp_path, timeout=300)
    assert help_text.returncode == 0 and "--update-committed" in help_text.stdout


def test_overlay_follows_the_package_dir_mapping(tmp_path):
    build_overlay(tmp_path)
    package = tmp_path / "tritongpt2"
    assert (package / "cli.py").resolve() == ROOT / "tritongpt2" / "cli.py"
    for name, folder in package_dirs((ROOT / "pyproject.toml").read_text()).items():
        if name != "tritongpt2":  # the top package is a folder of links to its files
            assert (tmp_path / Path(*name.split("."))).resolve() == (ROOT / folder).resolve()
    build_overlay(tmp_path)  # again over the same folder: links are replaced, not an error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what gpu.sh does without a GPU")
def test_gpu_script_stops_at_the_preflight_without_cuda(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHON": sys.executable}
    result = subprocess.run(["bash", ROOT / "bench" / "gpu.sh", tmp_path], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    assert "preflight: torch.cuda.is_available() is False" in result.stdout + result.stderr
    assert "gpu.sh: preflight failed" in result.stderr
    assert "torch " + torch.__version__ in (tmp_path / "device.txt").read_text()
    assert not (tmp_path / "summary.txt").exists()  # no step ran


def test_preflight_names_a_missing_compiler_and_header(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(preflight.shutil, "which", lambda name: None)
    # preflight's own sysconfig only: triton, imported by main() when no test has yet, reads the real one.
    monkeypatch.setattr(preflight, "sysconfig", SimpleNamespace(get_paths=lambda: {"include": str(tmp_path)}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "a GPU")
    assert preflight.main() == 1
    err = capsys.readouterr().err
    assert "no C compiler (cc or gcc)" in err and f"no {tmp_path / 'Python.h'}" in err


def test_readme_table_names_the_device_between_the_markers():
    document = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-01-02", "versions": {"torch": "2.13.0"}, "rounds": 3,
                "peak": {"copy_gb_s": 2900.0, "matmul_tflop_s": 700.0}, "results": [
                    {"model": "gpt2", "dtype": "float16", "workload": "decode", "batch": 1, "context": 1024, "impl": impl,
                     "median_ms": ms, "spread_ms": [ms * 0.99, ms * 1.01]} for impl, ms in (("hf-eager", 9.5), ("tritongpt2", 0.14))
                ] + [{"model": "gpt2", "dtype": "float16", "workload": "embed", "batch": 1, "seq": 16, "impl": "hf-sdpa",
                      "error": "RuntimeError: boom"}]}
    readme = (ROOT / "README.md").read_text()
    assert START in readme and END in readme
    updated = replace_between_markers(readme, render(document, "NVIDIA-H100-80GB-HBM3-2026-01-02.json"))
    table = updated[updated.index(START):updated.index(END)]
    assert "**NVIDIA H100 80GB HBM3**" in table and "No GPU has been measured" not in table
    assert "| gpt2 | float16 | decode, batch 1, context 1024 | 9.5 (9.4-9.6) | **0.14 (0.139-0.141)** |  |" in table
    assert "| gpt2 | float16 | embed 1 x 16 |  |  | failed |" in table
    assert updated.replace(table, "") == readme.replace(readme[readme.index(START):readme.index(END)], "")
    with pytest.raises(ValueError, match="markers"):
        replace_between_markers("# a README without them\n", "table")


STUB_PYTHON = """#!/usr/bin/env bash
# Stands in for python on a GPU machine: records each command; a benchmark writes a results file.
echo "$*" >> "$STUB_CALLS"
case "$*" in
  *tests/test_gpu.py*) sleep "${STUB_TESTS_SLEEP:-0}" ;;
  *"tritongpt2.cli bench"*) mkdir -p "${@: -1}" && echo '{}' > "${@: -1}/results.json" ;;
esac
"""


def run_gpu_script(tmp_path, timeout=120, **env):
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    calls = tmp_path / "calls.txt"
    environment = {k: v for k, v in os.environ.items() if k not in ("GPU_BUDGET_S", "GPU_STEPS")}
    environment |= {"PYTHON": str(stub), "STUB_CALLS": str(calls), **env}
    result = subprocess.run(["bash", ROOT / "bench" / "gpu.sh", tmp_path / "out"], capture_output=True, text=True,
                            env=environment, timeout=timeout)
    called = calls.read_text().splitlines() if calls.exists() else []
    summary = tmp_path / "out" / "summary.txt"
    return result, [line for line in called if line.startswith("-m ")], summary.read_text() if summary.exists() else ""


def test_gpu_script_runs_the_most_valuable_steps_first_within_its_budget(tmp_path):
    # The default budget fits one command of a 15-minute loan: the GPU-only tests, gpt2's benchmark
    # (then README's table from it) and tuning gpt2's tiles; the whole suite and the full benchmark
    # need more than is left, and say so.
    result, commands, summary = run_gpu_script(tmp_path)
    assert result.returncode == 0, result.stderr
    assert [c.split()[1] for c in commands] == [
        "pytest", "tritongpt2.cli", "tritongpt2.bench.readme_table", "tritongpt2.cli"]
    assert "tests/test_gpu.py" in commands[0]
    assert "bench --models gpt2 --dtypes float16 --workloads decode 1x1024,decode 8x1024,embed 1x128,prefill 1x1024" in commands[1]
    assert "tune --models gpt2 --output" in commands[3]
    assert "== tests-all: skipped" in summary and "== bench-all: skipped" in summary
    assert "of a 480 s budget" in summary


def test_gpu_script_takes_its_steps_and_budget_from_the_environment(tmp_path):
    result, commands, summary = run_gpu_script(tmp_path, GPU_STEPS="tune,bench-all", GPU_BUDGET_S="1800")
    assert result.returncode == 0, result.stderr
    assert "tune --models gpt2,gpt2-medium,gpt2-large,gpt2-xl" in commands[0]  # a long loan tunes every size
    assert "cli bench --output" in commands[1] and "readme_table" in commands[2]
    result, _, _ = run_gpu_script(tmp_path, GPU_STEPS="bench, tune")  # spaces around the names are dropped
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("env,message", [
    ({"GPU_STEPS": "tune,benchmark"}, "GPU_STEPS names an unknown step, 'benchmark'"),
    ({"GPU_BUDGET_S": "8m"}, "GPU_BUDGET_S must be whole seconds, got '8m'"),
])
def test_bad_settings_stop_the_script_before_anything_runs(tmp_path, env, message):
    result, commands, summary = run_gpu_script(tmp_path, **env)
    assert result.returncode == 2 and message in result.stderr
    assert commands == [] and summary == "" and not (tmp_path / "calls.txt").exists()


def test_a_step_past_the_budget_is_cut_short_and_the_rest_skipped(tmp_path):
    # 31 s, less the 10 s kept for killing a step that ignores SIGINT: about 20 s for the tests.
    result, commands, summary = run_gpu_script(tmp_path, GPU_BUDGET_S="31", STUB_TESTS_SLEEP="60")
    assert result.returncode == 1
    assert re.search(r"== tests-gpu \(at most 2[01] s\)", summary) and "cut short after" in summary
    assert "== bench: skipped" in summary and "== tune: skipped" in summary
    assert len(commands) == 1


def test_a_skipped_step_is_no_failure(tmp_path):
    result, commands, summary = run_gpu_script(tmp_path, GPU_STEPS="bench", GPU_BUDGET_S="30")
    assert result.returncode == 0 and commands == [] and "== bench: skipped" in summary


def test_tune_refuses_to_run_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("checks what tune does without a GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tritongpt2.cli", "tune", "--output", "unused"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert "tune times kernels on a GPU, but torch.cuda.is_available() is False" in result.stderr
