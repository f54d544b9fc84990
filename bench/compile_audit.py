"""Compile every kernel configuration a GPT-2 step launches, for real GPUs, with no GPU present.

The launchers are called on meta tensors inside `recording_launches()`, so the audit compiles exactly
the tiles and flags they would launch. Each configuration is compiled ahead of time with
`triton.compile` for each architecture; registers, spills and static shared memory are read from the
cubin with the cuobjdump that Triton ships, dynamic shared memory from the compile metadata, and
tensor-core use from the PTX.

Quantized weights (QUANTIZATIONS: every format and int4 group) are audited on request, over
QUANTIZED_WORKLOADS: the decode step (split products, the fused MLP, the LM head, the embedding
gathering from it) and the tiled products of prefill, few rows and many. They are some 500
compilations a model, most of an hour on CI's two cores: `python -m tritongpt2.bench.compile_audit
--json F.json --markdown F.md` writes them for gpt2 and gpt2-xl, under the newest triton into
bench/results/compile-audit-quantized.* and under triton 3.6 into compile-audit-quantized-triton3.6.*,
and CI checks that the one of the triton it runs under covers today's launches.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from tritongpt2.engine.config import GPT2Config
from tritongpt2.engine.quantize import VARIANTS, Quantization
from tritongpt2.kernels.launch import LaunchRecord, recording_launches
from tritongpt2.kernels.tiling import SplitTiles, forcing_split_tiles, split_candidates

from .model_shapes import ModelShape

ARCHS = {"sm_90": 90, "sm_80": 80}
# Largest dynamic shared memory a block may opt into.
SHARED_LIMIT = {"sm_90": 232448, "sm_80": 166912}
# Per SM: shared memory, with 1 KiB more reserved per resident block; registers; warps; blocks.
SM_SHARED = {"sm_90": 233472, "sm_80": 167936}
BLOCK_RESERVED_SHARED = 1024
SM_REGISTERS, SM_WARPS, SM_BLOCKS = 65536, 64, 32
REGISTER_GRANULE = 256  # registers are allocated per warp in units of this many
MAX_REGISTERS = 255
# Registers a configuration must leave free below the limit: a newer ptxas, or a small change to a
# kernel, must not push it into spilling.
REGISTER_HEADROOM = 16
TENSOR_CORE_PTX = {"sm_90": ("wgmma", "mma.sync"), "sm_80": ("mma.sync",)}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_TRITON_TYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
    torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
}


@dataclass(frozen=True)
class Workload:
    name: str  # prefill or decode
    batch: int
    seq: int
    context: int


DEFAULT_WORKLOADS = (
    Workload("prefill", 1, 16, 1024),  # embedding latency
    Workload("prefill", 1, 128, 1024),
    Workload("prefill", 64, 128, 1024),  # embedding throughput
    Workload("prefill", 1, 1024, 1024),
    Workload("decode", 1, 1, 1024),
    Workload("decode", 8, 1, 1024),
    Workload("decode", 64, 1, 1024),
)


QUANTIZATIONS = VARIANTS
# A quantized weight changes the products only: the decode step (split-K, the MLP, the head and the
# embedding), a decode of 64 rows (the tiled product of few rows) and a prefill (many rows).
QUANTIZED_WORKLOADS = (
    Workload("decode", 1, 1, 1024),
    Workload("decode", 64, 1, 1024),
    Workload("prefill", 1, 128, 1024),
)


@dataclass(frozen=True)
class CompileJob:
    kernel: Any = field(compare=False, hash=False)
    kernel_name: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    divisible_by_16: tuple[int, ...]
    num_warps: int
    num_stages: int
    max_registers: int | None = None

    @property
    def config(self) -> str:
        shown = [f"{k}={v}" for k, v in self.constexprs if v is not None and k.isupper()]
        # Integer arguments that Triton specialises as multiples of 16 (they change the code).
        aligned = [name for i, (name, kind) in enumerate(self.signature) if i in self.divisible_by_16 and kind[0] == "i"]
        shown += [f"x16:{'+'.join(aligned)}"] if aligned else []
        shown += [f"warps={self.num_warps}", f"stages={self.num_stages}"]
        return ",".join(shown + ([f"maxnreg={self.max_registers}"] if self.max_registers is not None else []))


@dataclass
class CompileResult:
    kernel: str
    config: str
    arch: str
    dtype: str
    used_by: list[str]
    num_warps: int = 4
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    tensor_core: str | None = None
    error: str | None = None
    cubin: bytes | None = field(default=None, repr=False)

    @property
    def blocks_per_sm(self) -> int | None:
        """How many blocks of this configuration an SM holds at once, by its registers, shared
        memory and warps against the architecture's limits."""
        if self.registers is None:
            return None
        per_warp = -(-max(self.registers, 1) * 32 // REGISTER_GRANULE) * REGISTER_GRANULE
        limits = [SM_BLOCKS, SM_WARPS // self.num_warps, SM_REGISTERS // (per_warp * self.num_warps)]
        if self.shared_bytes:
            limits.append(SM_SHARED[self.arch] // (self.shared_bytes + BLOCK_RESERVED_SHARED))
        return min(limits)

    def problems(self) -> list[str]:
        where = f"{self.kernel} [{self.config}] {self.arch} {self.dtype}"
        if self.error is not None:
            return [f"{where}: compile error: {self.error}"]
        found = []
        if self.spill_bytes:
            found.append(f"{where}: spills {self.spill_bytes} bytes to local memory")
        if self.registers > MAX_REGISTERS - REGISTER_HEADROOM:
            found.append(f"{where}: {self.registers} registers per thread, within {REGISTER_HEADROOM} of the {MAX_REGISTERS} limit")
        if self.shared_bytes > SHARED_LIMIT[self.arch]:
            found.append(f"{where}: {self.shared_bytes} bytes of shared memory > {SHARED_LIMIT[self.arch]}")
        return found


def step_launches(
    shape: ModelShape, dtype: torch.dtype, workload: Workload, quantization: Quantization | None = None
) -> list[LaunchRecord]:
    """The launches of one GPT-2 step, recorded from `gpt2_step` itself (the engine's forward) over
    the Triton launchers on meta tensors: the embedding, one layer (every layer launches the same
    configurations), ln_f and the LM head on each row's last position, and for prefill the final
    hidden states too. With a quantization, the weights quantize_weights makes of the model's."""
    from tritongpt2.engine.forward import gpt2_step
    from tritongpt2.engine.kv_cache import StaticKVCache
    from tritongpt2.engine.quantize import quantize_weights
    from tritongpt2.engine.weights import expected_shapes, weights_from_state_dict
    from tritongpt2.kernels import launchers

    config = _one_layer_config(shape)
    state = {key: torch.empty(size, dtype=dtype, device="meta") for key, size in expected_shapes(config).items()}
    weights = weights_from_state_dict(config, state)
    if quantization is not None:
        weights = quantize_weights(weights, config, quantization)
    b, t = workload.batch, workload.seq
    cache = StaticKVCache(1, b, shape.n_head, workload.context, shape.head_dim, dtype=dtype, device="meta")
    ids = torch.empty(b, t, dtype=torch.int64, device="meta")
    mask = torch.empty(b, t, dtype=torch.int32, device="meta")
    new_tokens = torch.empty(1, dtype=torch.int64, device="meta")
    with recording_launches() as records:
        gpt2_step(launchers, config, weights, cache, ids, mask, new_tokens, logits="last", hidden=t > 1)
    return records


def _one_layer_config(shape: ModelShape) -> GPT2Config:
    return GPT2Config(vocab_size=shape.vocab_size, n_positions=shape.n_positions, n_embd=shape.n_embd, n_layer=1,
                      n_head=shape.n_head)


def quantization_misfit(shape: ModelShape, quantization: Quantization) -> str | None:
    """Why the model cannot take the quantization (a group that does not divide its n_embd or
    n_inner: int4 in groups of 128 at gpt2-xl's 1600), or None when it can."""
    try:
        quantization.check_model(_one_layer_config(shape))
    except ValueError as error:
        return str(error)
    return None


def _specialize(value: Any) -> tuple[str, Any, bool]:
    """(signature type, constexpr value or None, divisible by 16), as Triton's runtime specializes."""
    if value is None:
        return "constexpr", None, False
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype], None, True  # allocations are 16-byte aligned
    if isinstance(value, bool):
        return "i1", None, False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1, False
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"cannot specialize a kernel argument of type {type(value).__name__}")


def compile_job(record: LaunchRecord) -> CompileJob:
    kernel = record.kernel
    names = kernel.arg_names
    declared = record.constexprs()
    signature, constexprs, divisible = {}, {}, []
    for i, name in enumerate(names):
        value = record.arguments[name]
        if name in declared:
            signature[name], constexprs[name] = "constexpr", value
            continue
        if kernel.params[i].do_not_specialize:
            signature[name] = "i32" if isinstance(value, int) else _specialize(value)[0]
            continue
        kind, constant, aligned = _specialize(value)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = constant
        if aligned:
            divisible.append(i)
    ordered = tuple((name, signature[name]) for name in names)
    return CompileJob(
        kernel, kernel.__name__, ordered, tuple((n, constexprs[n]) for n in names if n in constexprs),
        tuple(divisible), record.num_warps, record.num_stages, record.max_registers,
    )


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def compile_for(job: CompileJob, arch: str, dtype: str, used_by: list[str]) -> CompileResult:
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    result = CompileResult(job.kernel_name, job.config, arch, dtype, used_by, num_warps=job.num_warps)
    attrs = {(i,): BaseBackend.parse_attr("D") for i in job.divisible_by_16}
    source = ASTSource(job.kernel, dict(job.signature), dict(job.constexprs), attrs)
    try:
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", ARCHS[arch], 32),
            options={"num_warps": job.num_warps, "num_stages": job.num_stages, "maxnreg": job.max_registers},
        )
    except Exception as error:  # noqa: BLE001 - any compiler failure is a finding of the audit
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        return result
    usage = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    result.registers = usage.get("REG", 0)
    result.spill_bytes = usage.get("LOCAL", 0) + usage.get("STACK", 0)
    result.shared_bytes = compiled.metadata.shared + usage.get("SHARED", 0)
    result.tensor_core = next((op for op in TENSOR_CORE_PTX[arch] if op in ptx), None)
    result.cubin = compiled.asm["cubin"]
    return result


def run_compile_audit(
    shapes: Iterable[ModelShape],
    archs: Iterable[str] = tuple(ARCHS),
    dtypes: Iterable[str] = tuple(DTYPES),
    workloads: Iterable[Workload] = DEFAULT_WORKLOADS,
    workers: int | None = None,
    quantizations: Iterable[str] = (),
    quantized_workloads: Iterable[Workload] = QUANTIZED_WORKLOADS,
) -> list[CompileResult]:
    """Compile every distinct configuration that the workloads launch at the given model shapes, with
    float weights, and that the quantized workloads launch with each quantization the model can take
    (QUANTIZATIONS' names; bench/results/compile-audit-quantized.json holds them all: `python -m
    tritongpt2.bench.compile_audit`)."""
    _require_compiled_kernels()
    archs, dtypes = _checked(archs, dtypes)
    runs = [(None, workload) for workload in workloads]
    for name in quantizations:
        if name not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {name!r}; choose from {', '.join(QUANTIZATIONS)}")
        runs += [(name, workload) for workload in quantized_workloads]
    jobs: dict[tuple[str, CompileJob], list[str]] = {}
    for shape in shapes:
        fitting = [(name, workload) for name, workload in runs if not (name and quantization_misfit(shape, QUANTIZATIONS[name]))]
        for dtype in dtypes:
            for name, workload in fitting:
                label = f"{shape.name}{f' {name}' if name else ''} {workload.name} b{workload.batch}x{workload.seq} ctx{workload.context}"
                quantization = QUANTIZATIONS[name] if name else None
                _add_jobs(jobs, dtype, label, step_launches(shape, DTYPES[dtype], workload, quantization))
    return _compile_jobs(jobs, archs, workers)


CANDIDATE_WORKLOAD = Workload("decode", 1, 1, 1024)


def candidate_label(model: str, key: str, tiles: SplitTiles) -> str:
    """How the candidate audit names a candidate in `used_by`, and the tuner finds the ones it must skip."""
    return (f"{model} candidate {key} {tiles.block_n}x{tiles.block_k} splits={tiles.splits} "
            f"warps={tiles.num_warps} stages={tiles.num_stages}")


def run_candidate_audit(
    shapes: Iterable[ModelShape],
    archs: Iterable[str] = tuple(ARCHS),
    dtypes: Iterable[str] = ("float16", "bfloat16"),
    workers: int | None = None,
) -> list[CompileResult]:
    """Compile every distinct configuration that a decode step launches with each tuning candidate
    forced in turn (the tuner writes half-precision entries only). k_per_split and splits are run-time
    arguments, so many candidates share a compiled configuration; each result's used_by names the
    candidates (candidate_label) that launch it."""
    _require_compiled_kernels()
    archs, dtypes = _checked(archs, dtypes)
    return _compile_jobs(candidate_jobs(shapes, dtypes), archs, workers)


def candidate_jobs(shapes: Iterable[ModelShape], dtypes: Iterable[str]) -> dict[tuple[str, CompileJob], list[str]]:
    """The configuration of the launch computing each decode product with each of its candidates
    forced, the other products at their defaults, by dtype. The MLP compiles its two products into one
    kernel: each candidate of one is compiled beside the other's default, not beside every candidate
    of the other (144 pairs a model); the pair the tuner writes is compiled by the plain audit of the
    tuned table, which CI runs on the committed table (bench/gpu.sh's tuned table, once committed)."""
    from .decode_tuning import decode_products, product_launch

    jobs: dict[tuple[str, CompileJob], list[str]] = {}
    for shape in shapes:
        for dtype in dtypes:
            element_size = DTYPES[dtype].itemsize
            for product in decode_products(shape):
                key = product.key(element_size)
                for tiles in split_candidates(product.n, product.k, element_size):
                    with forcing_split_tiles({key: tiles}):
                        records = step_launches(shape, DTYPES[dtype], CANDIDATE_WORKLOAD)
                    label = candidate_label(shape.name, key, tiles)
                    _add_jobs(jobs, dtype, label, [product_launch(records, product)])
    return jobs


def _add_jobs(jobs: dict[tuple[str, CompileJob], list[str]], dtype: str, label: str, records: list[LaunchRecord]) -> None:
    for record in records:
        used_by = jobs.setdefault((dtype, compile_job(record)), [])
        if label not in used_by:
            used_by.append(label)


def _compile_jobs(jobs: dict[tuple[str, CompileJob], list[str]], archs: list[str], workers: int | None) -> list[CompileResult]:
    tasks = [(job, arch, dtype, used_by) for (dtype, job), used_by in jobs.items() for arch in archs]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda task: compile_for(*task), tasks))


def _checked(archs: Iterable[str], dtypes: Iterable[str]) -> tuple[list[str], list[str]]:
    archs, dtypes = list(archs), list(dtypes)
    for arch in archs:
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return archs, dtypes


def _require_compiled_kernels() -> None:
    from tritongpt2.kernels.backend import kernel_mode

    if kernel_mode() == "interpret" or (kernel_mode() is None and os.environ.get("TRITON_INTERPRET", "0") != "0"):
        raise ValueError(
            "the compile audit needs kernels built for the GPU, but this process runs Triton's "
            "interpreter (TRITON_INTERPRET is set); run it in a process without TRITON_INTERPRET"
        )


def toolchain() -> dict[str, str]:
    """The versions that decide the audit's numbers: triton, and the ptxas it ships."""
    import triton

    ptxas = Path(_cuobjdump()).with_name("ptxas")
    try:
        text = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True, check=True).stdout
        found = re.search(r"release ([\d.]+)", text)
        ptxas_version = found.group(1) if found else text.strip().splitlines()[-1]
    except (OSError, subprocess.CalledProcessError) as error:
        ptxas_version = f"unknown ({error})"
    return {"triton": triton.__version__, "ptxas": ptxas_version}


def markdown_table(results: list[CompileResult]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in toolchain().items())
    lines = [
        f"Compiled with {versions}.",
        "",
        "| kernel | config | arch | dtype | registers | spills (B) | shared (B) | blocks/SM | tensor cores | used by |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r.kernel, r.config, r.arch, r.dtype)):
        if r.error is not None:
            lines.append(f"| {r.kernel} | {r.config} | {r.arch} | {r.dtype} | compile error: {r.error} | | | | | |")
            continue
        lines.append(
            f"| {r.kernel} | {r.config} | {r.arch} | {r.dtype} | {r.registers} | {r.spill_bytes} | "
            f"{r.shared_bytes} | {r.blocks_per_sm} | {r.tensor_core or 'none'} | {'; '.join(r.used_by)} |"
        )
    return "\n".join(lines)


def dump_cubins(results: list[CompileResult], folder: Path) -> list[Path]:
    """Write each cubin as <kernel>-<arch>-<dtype>-<hash of its configuration>.cubin (a configuration
    spelt out is longer than a file name may be) and index.json, mapping each file name to its kernel,
    configuration, arch, dtype and the workloads that launch it."""
    folder.mkdir(parents=True, exist_ok=True)
    index, written = {}, []
    for r in results:
        if r.cubin is None:
            continue
        digest = hashlib.sha1(r.config.encode()).hexdigest()[:12]
        name = f"{r.kernel}-{r.arch}-{r.dtype}-{digest}.cubin"
        (folder / name).write_bytes(r.cubin)
        index[name] = {"kernel": r.kernel, "config": r.config, "arch": r.arch, "dtype": r.dtype, "used_by": r.used_by}
        written.append(folder / name)
    (folder / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return written


def results_document(models: list[str], results: list[CompileResult], not_applicable: dict | None = None) -> dict:
    """The JSON document of an audit: its models, toolchain and results (without the cubins), and the
    quantizations a model cannot take, with why, by model."""
    rows = [{**{k: v for k, v in vars(r).items() if k != "cubin"}, "blocks_per_sm": r.blocks_per_sm} for r in results]
    document = {"models": models, "toolchain": toolchain(), "results": rows}
    return document if not_applicable is None else {**document, "not_applicable": not_applicable}


def main(argv: list[str] | None = None) -> int:
    """The quantized audit: every configuration of QUANTIZED_WORKLOADS under each quantization."""
    import argparse
    import sys

    from .model_shapes import model_shape

    parser = argparse.ArgumentParser(prog="python -m tritongpt2.bench.compile_audit", description=main.__doc__)
    parser.add_argument("--models", default="gpt2,gpt2-xl", help="comma-separated GPT-2 sizes")
    parser.add_argument("--quantizations", default=",".join(QUANTIZATIONS), help="comma-separated, of " + ", ".join(QUANTIZATIONS))
    parser.add_argument("--json", required=True, help="write the results as JSON to this file")
    parser.add_argument("--markdown", help="and as a markdown table to this file")
    args = parser.parse_args(argv)
    models, names = args.models.split(","), args.quantizations.split(",")
    results = run_compile_audit([model_shape(m) for m in models], workloads=(), quantizations=names)
    not_applicable = {model: {name: why for name in names if (why := quantization_misfit(model_shape(model), QUANTIZATIONS[name]))}
                      for model in models}
    Path(args.json).write_text(json.dumps(results_document(models, results, not_applicable), indent=1))
    if args.markdown:
        skipped = [f"{model} {name} ({why})" for model, misfits in not_applicable.items() for name, why in misfits.items()]
        note = f"\n\nNot audited, the model cannot take them: {'; '.join(skipped)}." if skipped else ""
        Path(args.markdown).write_text(markdown_table(results) + note + "\n")
    problems = [problem for r in results for problem in r.problems()]
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print(f"{len(results)} configurations compiled, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
