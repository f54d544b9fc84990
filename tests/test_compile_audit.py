"""Every kernel, with the tiles its launcher picks at gpt2 and gpt2-xl shapes, compiles for sm_90 and
sm_80 in float16, bfloat16 and float32, fits in shared memory, does not spill and leaves 16 registers
of headroom. No GPU needed. CI runs this under the newest triton and under the GPU machine's 3.6."""

import json
import os
import re
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest

from numerics import OPS
from tritongpt2.bench.compile_audit import ARCHS, MAX_REGISTERS, REGISTER_HEADROOM, SHARED_LIMIT, candidate_label
from tritongpt2.bench.decode_tuning import decode_products, failed_candidates
from tritongpt2.bench.model_shapes import MODEL_SHAPES
from tritongpt2.kernels.tiling import UNCAPPED_FROM, default_split_tiles, split_candidates
from tritongpt2.kernels.toolchain import triton_release

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")

MATMUL_KERNELS = ("linear_kernel", "split_linear_kernel", "decode_mlp_kernel", "flash_attention_kernel")


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "audit.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "tritongpt2.cli", "audit", "compile", "--models", "gpt2,gpt2-xl", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    document = json.loads(out.read_text()) if out.exists() else {"results": [], "toolchain": {}}
    return result, document["results"], document["toolchain"]


def test_every_configuration_compiles_within_limits(audit):
    result, rows, toolchain = audit
    assert result.returncode == 0, result.stderr[-4000:]
    assert set(toolchain) == {"triton", "ptxas"}
    for row in rows:
        assert row["error"] is None, row
        assert row["spill_bytes"] == 0, row
        assert row["registers"] <= MAX_REGISTERS - REGISTER_HEADROOM, row
        assert row["shared_bytes"] <= SHARED_LIMIT[row["arch"]], row
        assert row["blocks_per_sm"] >= 1, row


def test_every_kernel_is_compiled_for_each_arch_and_dtype(audit):
    _, rows, _ = audit
    kernels = {kernel.fn.__name__ for kernel in OPS.KERNELS}
    for arch in ("sm_90", "sm_80"):
        for dtype in ("float16", "bfloat16", "float32"):
            compiled = {row["kernel"] for row in rows if row["arch"] == arch and row["dtype"] == dtype}
            assert compiled == kernels, (arch, dtype, kernels ^ compiled)


def test_matmuls_and_prefill_attention_use_tensor_cores(audit):
    # In half precision. float32 asks tl.dot for exact IEEE products (input_precision="ieee", to
    # match a float32 reference), which are FMA instructions, not tensor cores.
    _, rows, _ = audit
    for row in rows:
        if row["kernel"] in MATMUL_KERNELS and row["dtype"] != "float32":
            assert row["tensor_core"] is not None, row
        if row["kernel"] == "linear_kernel" and row["arch"] == "sm_90" and "BLOCK_M=128" in row["config"]:
            assert row["tensor_core"] == "wgmma", row


def test_blocks_per_sm_follow_registers_shared_memory_and_warps():
    from tritongpt2.bench.compile_audit import CompileResult

    def blocks(registers, shared, warps, arch="sm_90"):
        return CompileResult("k", "c", arch, "float16", [], num_warps=warps, registers=registers,
                             spill_bytes=0, shared_bytes=shared).blocks_per_sm

    # 128 registers x 256 threads = 32K of the SM's 64K; 99 KB of shared memory (+1 KB reserved) twice in 228 KB.
    assert blocks(128, 99000, 8) == 2
    # 184 registers round up to 5,888 per warp: one 8-warp block needs 47K, so one fits.
    assert blocks(184, 0, 8) == 1
    assert blocks(32, 120000, 4, "sm_80") == 1 and blocks(32, 0, 1) == 32


@pytest.mark.parametrize("name", ["compile-audit-candidates.json", "compile-audit-candidates-triton3.6.json"])
def test_every_tuning_candidate_is_in_the_committed_candidate_audit(name):
    # Compiling every candidate takes most of an hour on CI's two cores, so CI checks the committed
    # audit (tritongpt2 audit compile --candidates, under each triton) names today's candidates,
    # each compiled for every arch and dtype. A candidate with a problem is left out by the tuner
    # (decode_tuning.failed_candidates); a default launches until a table entry replaces it, so it has none.
    document = json.loads((RESULTS / name).read_text())
    assert set(document["models"]) == set(GPT2_SIZES)
    candidates = {candidate_label(model, p.key(2), tiles) for model in GPT2_SIZES for p in decode_products(MODEL_SHAPES[model])
                  for tiles in split_candidates(p.n, p.k, 2)}
    for arch in ARCHS:
        for dtype in ("float16", "bfloat16"):
            audited = {label for r in document["results"] if (r["arch"], r["dtype"]) == (arch, dtype) for label in r["used_by"]}
            missing = candidates - audited
            assert not missing, (f"{len(missing)} candidates are not in bench/results/{name} for {arch} {dtype}: rerun tritongpt2 "
                                 f"audit compile --candidates --models {','.join(GPT2_SIZES)} --json ...", sorted(missing)[:3])
    defaults = {candidate_label(model, p.key(2), default_split_tiles(p.n, p.k, 2))
                for model in GPT2_SIZES for p in decode_products(MODEL_SHAPES[model])}
    failed = failed_candidates([document])
    assert not failed & defaults, sorted(failed & defaults)
    for row in document["results"]:
        if not set(row["used_by"]) <= failed:
            assert row["error"] is None and row["spill_bytes"] == 0, row
            assert row["registers"] <= MAX_REGISTERS - REGISTER_HEADROOM, row
            assert row["shared_bytes"] <= SHARED_LIMIT[row["arch"]], row


def _constexpr_prefix(record) -> str:
    """The start of a compiled configuration's name that a launch record fixes: its upper-case constexprs."""
    shown = [f"{k}={v}" for k, v in record.constexprs().items() if v is not None and k.isupper()]
    return ",".join(shown) + ","


QUANTIZED_AUDITS = ("compile-audit-quantized.json", "compile-audit-quantized-triton3.6.json")


def committed_quantized_audit() -> dict:
    """The committed quantized audit compiled by this triton's release, else the newest triton's."""
    documents = [json.loads((RESULTS / name).read_text()) for name in QUANTIZED_AUDITS]
    running = triton_release()
    return next((d for d in documents if triton_release(d["toolchain"]["triton"]) == running), documents[0])


def test_the_quantized_audits_are_of_the_newest_and_the_gpu_machines_triton():
    newest, gpu_machine = (json.loads((RESULTS / name).read_text())["toolchain"]["triton"] for name in QUANTIZED_AUDITS)
    assert triton_release(gpu_machine) == (3, 6)
    assert triton_release(newest) >= UNCAPPED_FROM


def _register_cap(config: str) -> str:
    found = re.search(r",maxnreg=\d+$", config)
    return found.group(0) if found else ""


@pytest.mark.slow
def test_every_quantized_configuration_is_in_the_committed_quantized_audit():
    # The quantized audit is 674 compilations for gpt2 and gpt2-xl (python -m
    # tritongpt2.bench.compile_audit --json bench/results/compile-audit-quantized.json,
    # and -triton3.6.json under the GPU machine's triton): CI checks the one of the triton it runs under
    # covers every launch a quantized step of each makes today, register cap included, for every arch
    # and dtype, within limits.
    from tritongpt2.bench.compile_audit import DTYPES, QUANTIZATIONS, QUANTIZED_WORKLOADS, quantization_misfit, step_launches

    document = committed_quantized_audit()
    assert {"gpt2", "gpt2-xl"} <= set(document["models"])
    misfits = {model: {name: why for name, q in QUANTIZATIONS.items() if (why := quantization_misfit(MODEL_SHAPES[model], q))}
               for model in document["models"]}
    assert document["not_applicable"] == misfits and "int4g128" in misfits["gpt2-xl"]
    rows = document["results"]
    for row in rows:
        assert row["error"] is None and row["spill_bytes"] == 0, row
        assert row["registers"] <= MAX_REGISTERS - REGISTER_HEADROOM, row
        assert row["shared_bytes"] <= SHARED_LIMIT[row["arch"]], row
        if row["kernel"] in MATMUL_KERNELS and row["dtype"] != "float32":
            assert row["tensor_core"] is not None, row
    for model, name, dtype, workload in product(document["models"], QUANTIZATIONS, DTYPES, QUANTIZED_WORKLOADS):
        if name in misfits[model]:
            continue
        label = f"{model} {name} {workload.name} b{workload.batch}x{workload.seq} ctx{workload.context}"
        for record in step_launches(MODEL_SHAPES[model], DTYPES[dtype], workload, QUANTIZATIONS[name]):
            cap = "" if record.max_registers is None else f",maxnreg={record.max_registers}"
            for arch in ARCHS:
                assert any(r["kernel"] == record.name and r["arch"] == arch and r["dtype"] == dtype
                           and r["config"].startswith(_constexpr_prefix(record)) and label in r["used_by"]
                           and _register_cap(r["config"]) == cap
                           for r in rows), (label, record.name, arch, dtype, _constexpr_prefix(record), cap)


def test_quantized_tiles_read_one_group_per_k_step():
    from tritongpt2.bench.compile_audit import DTYPES, QUANTIZATIONS, QUANTIZED_WORKLOADS, step_launches

    for name, quantization in QUANTIZATIONS.items():
        for workload in QUANTIZED_WORKLOADS:
            records = step_launches(MODEL_SHAPES["gpt2"], DTYPES["float16"], workload, quantization)
            formats = {r.name: {k: v for k, v in r.constexprs().items() if k.endswith("FORMAT")} for r in records}
            for kernel, found in formats.items():
                if kernel in ("linear_kernel", "split_linear_kernel", "decode_mlp_kernel", "embedding_kernel"):
                    assert set(found.values()) == {"nf4dq" if quantization.double_quant else quantization.format}, (kernel, found)
            if quantization.format != "int8":
                for record in records:
                    blocks = {k: v for k, v in record.constexprs().items() if k.endswith("BLOCK_K")}
                    assert set(blocks.values()) <= {quantization.group_size}, (record.name, blocks)
