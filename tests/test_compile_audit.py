"""Every kernel, with the tiles its launcher picks at gpt2 and gpt2-xl shapes, compiles for sm_90 and
sm_80 in float16 and bfloat16, fits in shared memory and does not spill. No GPU needed."""

import json
import os
import subprocess
import sys

import pytest

from numerics import OPS
from tritongpt2.bench.compile_audit import SHARED_LIMIT


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "audit.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "tritongpt2.cli", "audit", "compile", "--models", "gpt2,gpt2-xl", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    return result, json.loads(out.read_text())["results"] if out.exists() else []


def test_every_configuration_compiles_within_limits(audit):
    result, rows = audit
    assert result.returncode == 0, result.stderr[-4000:]
    for row in rows:
        assert row["error"] is None, row
        assert row["spill_bytes"] == 0, row
        assert row["shared_bytes"] <= SHARED_LIMIT[row["arch"]], row


def test_every_kernel_is_compiled_for_each_arch_and_dtype(audit):
    _, rows = audit
    kernels = {kernel.fn.__name__ for kernel in OPS.KERNELS}
    for arch in ("sm_90", "sm_80"):
        for dtype in ("float16", "bfloat16"):
            compiled = {row["kernel"] for row in rows if row["arch"] == arch and row["dtype"] == dtype}
            assert compiled == kernels, (arch, dtype, kernels ^ compiled)


def test_matmuls_and_prefill_attention_use_tensor_cores(audit):
    _, rows = audit
    for row in rows:
        if row["kernel"] in ("linear_kernel", "flash_attention_kernel"):
            assert row["tensor_core"] is not None, row
        if row["kernel"] == "linear_kernel" and row["arch"] == "sm_90" and "BLOCK_M=128" in row["config"]:
            assert row["tensor_core"] == "wgmma", row
