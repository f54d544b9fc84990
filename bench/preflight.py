"""What bench/gpu.sh needs before it starts, checked in a second rather than found missing an hour in:
CUDA visible to torch, a C compiler and Python's headers (Triton compiles its launcher with them), and
the packages the tests and baselines import. Prints the versions; exits non-zero naming what is missing.

Run as a script (`python bench/preflight.py`): it imports nothing of tritongpt2, which is not
importable yet when it runs.
"""

from __future__ import annotations

import importlib
import platform
import shutil
import sys
import sysconfig
from pathlib import Path

PACKAGES = ("torch", "triton", "numpy", "transformers", "safetensors", "tokenizers", "pytest", "pytest_benchmark")


def versions() -> tuple[dict[str, str], list[str]]:
    """({package: version}, problems) for python and PACKAGES."""
    found, problems = {"python": platform.python_version()}, []
    for name in PACKAGES:
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "unknown")
        except ImportError as error:
            problems.append(f"{name} cannot be imported ({error}): bring it as a wheel and pip install --no-index it")
    return found, problems


def compiler_problems() -> list[str]:
    problems = []
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        problems.append("no C compiler (cc or gcc) on PATH: Triton compiles its CUDA launcher with one")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.is_file():
        problems.append(f"no {header}: Triton's launcher needs Python's headers (e.g. apt-get install python3-dev)")
    return problems


def cuda_problems() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return [f"torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA {torch.version.cuda}): "
                "no GPU visible, or a CPU-only torch"]
    return []


def main() -> int:
    found, problems = versions()
    print(" ".join(f"{name} {version}" for name, version in found.items()))
    problems += compiler_problems()
    if "torch" in found:
        problems += cuda_problems()
        if not problems:
            import torch

            print(f"GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    for problem in problems:
        print(f"preflight: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
