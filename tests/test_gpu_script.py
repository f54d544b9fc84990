"""bench/gpu.sh on a machine without a network or a recent setuptools: tritongpt2 imports from a fresh
venv through the symlinked package (no pip), the preflight stops a run that cannot work with a clear
message, and README's GPU table is rendered between its markers."""

import os
import subprocess
import sys
from pathlib import Path

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
    monkeypatch.setattr(preflight.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
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


def test_gpu_script_tunes_first_and_keeps_what_it_measured(tmp_path):
    # The tune step runs before the tests and the benchmark, so both run with the tuned table; it
    # writes into the output folder (the only thing that comes back from the GPU machine).
    script = (ROOT / "bench" / "gpu.sh").read_text()
    steps = [line.split()[1] for line in script.splitlines() if line.startswith("step ")]
    assert steps[:3] == ["tune", "tests", "bench"], steps
    assert 'step tune "$python" -m tritongpt2.cli tune --output "$out/tune"' in script
    assert "compile-audit-candidates" in steps and steps.index("compile-audit") < steps.index("compile-audit-candidates")
    header = script[:script.index("set -uo pipefail")]
    assert "2. tune (about 5 minutes on an H100" in header and "30 minutes" in header


def test_tune_refuses_to_run_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("checks what tune does without a GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tritongpt2.cli", "tune", "--output", "unused"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert "tune times kernels on a GPU, but torch.cuda.is_available() is False" in result.stderr
