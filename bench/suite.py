"""The benchmark: every implementation on every workload, side by side in one process.

Figures are medians of CUDA-event (GPU) or perf_counter (CPU) timings, warm-up excluded, taken in
rounds: each implementation is timed once per round, in turn, and a figure is the median of its
rounds' medians, reported with their spread (min-max). Each record carries its % of the roofline from
peaks measured in the same run: the ideal time (bench/ideal.py: the larger of the bytes a step must
move over the measured copy bandwidth and its FLOPs over the measured matmul rate) over the median.
bandwidth_pct is those bytes alone over the copy bandwidth: what bounds decode, and on a CPU what an
app embedding text is bound by.

A failure of one implementation on one workload becomes an error row, and the suite goes on.
"""

from __future__ import annotations

import copy
import datetime
import gc
import importlib
import platform
import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from .ctranslate2_runner import COMPUTE_TYPES, CTranslate2Runner, ctranslate2_installed
from .ideal import ideal_bytes, ideal_flops
from .model_shapes import ModelShape
from .peaks import Peaks, measure_peaks
from .progress import Progress
from tritongpt2.engine.quantize import Quantization

from .runners import HFCompiledStaticRunner, HFRunner, QuantizedTritonGPT2Runner, Runner, TritonGPT2Runner

WARMUP, REPEATS = 3, 10
# The parity check's relative error allowed against transformers in float64, before adding twice
# transformers' own error in the same dtype (parity_limit); the tests' numerics.TOLERANCE.
PARITY_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Timings drift with whatever else the machine runs (on a CPU in bursts of seconds): every
# implementation is timed in each of several short rounds, taken in turn.
CPU_ROUNDS, CPU_REPEATS = 6, 4
GPU_ROUNDS, QUICK_ROUNDS = 3, 2


@dataclass(frozen=True)
class Workload:
    kind: str  # embed | prefill | decode | generate
    batch: int
    seq: int  # tokens in (embed, prefill, generate prompt) or the cache context (decode)
    new_tokens: int = 0  # generate only

    @property
    def tokens(self) -> int:
        """Cache slots the workload fills."""
        return self.seq + self.new_tokens

    @property
    def label(self) -> str:
        return f"{self.kind} {self.batch}x{self.seq}" + (f"+{self.new_tokens}" if self.new_tokens else "")


GPU_WORKLOADS = (
    Workload("embed", 1, 16), Workload("embed", 1, 128), Workload("embed", 1, 512), Workload("embed", 64, 128),
    Workload("prefill", 1, 1024),
    *(Workload("decode", b, c) for b in (1, 8, 64) for c in (128, 1024)),
    Workload("generate", 1, 128, 128),
)
CPU_WORKLOADS = (Workload("embed", 1, 16), Workload("embed", 1, 128), Workload("decode", 1, 128))
QUICK_WORKLOADS = (Workload("embed", 2, 16), Workload("prefill", 1, 32), Workload("decode", 2, 32), Workload("generate", 1, 8, 8))
QUICK_SHAPE = ModelShape("tiny", 64, 4, 2, vocab_size=512, n_positions=128)
GPU_IMPLS = ("hf-eager", "hf-sdpa", "hf-compile-static", "tritongpt2-nograph", "tritongpt2")
# tritongpt2 on weight-only quantized weights, side by side with CTranslate2 int8 on the CPU: (format,
# activation dtype). int8 runs a native kernel with bfloat16 activations and the float32 route with
# float32 ones (kernels/cpu_quantized.py); int4 natively in bfloat16; nf4 has no native kernel.
CPU_QUANTIZED = (("int8", torch.bfloat16), ("int8", torch.float32), ("int4", torch.bfloat16), ("nf4", torch.bfloat16))
CPU_QUANTIZED_WORKLOADS = ("embed 1x16", "decode 1x128")  # the labels of the workloads they time
CPU_IMPLS = ("hf-eager", "hf-sdpa", "tritongpt2",
             *(f"tritongpt2-{f}-{str(d).removeprefix('torch.')}" for f, d in CPU_QUANTIZED),
             *(f"ctranslate2-{c}" for c in COMPUTE_TYPES))

RunnerFactories = list[tuple[str, Callable[[], Runner]]]


# CPU features that decide which matmul routes are fast (bfloat16 ones above all), named after the
# vector instructions torch dispatches to: two CPUs of one model name can differ in them.
CPU_FEATURES = (("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX"))
CPUINFO = "/proc/cpuinfo"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with the instruction sets that its figures depend on, e.g.
    "CPU AMD EPYC (AVX2)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open(CPUINFO):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    features = [torch.backends.cpu.get_cpu_capability(), *(name for flag, name in CPU_FEATURES if flag in flags)]
    return f"CPU {model} ({', '.join(features)})"


def versions() -> dict[str, str]:
    import triton

    import tritongpt2

    found = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
             "tritongpt2": tritongpt2.__version__}
    for package in ("transformers", "ctranslate2"):
        try:
            found[package] = importlib.import_module(package).__version__
        except ImportError:
            pass
    if torch.cuda.is_available():
        found["cuda"] = torch.version.cuda or ""
    return found


def build_model(shape: ModelShape, dtype: torch.dtype, device: torch.device, seed: int = 0, *,
                initializer_range: float = 0.2) -> torch.nn.Module:
    """A random-weight transformers GPT2LMHeadModel at the shape (initializer_range 0.2 unless given,
    so that generations depend on the prompt)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=shape.vocab_size, n_positions=shape.n_positions, n_embd=shape.n_embd,
                        n_layer=shape.n_layer, n_head=shape.n_head, initializer_range=initializer_range)
    with torch.device(device):
        model = GPT2LMHeadModel(config)
    return model.to(dtype).eval()


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def bytes_read(shape: ModelShape, work: Workload, element: int, weight_scale: float = 1.0) -> int | None:
    """The bytes a step must move (bench/ideal.py), None for generate."""
    if work.kind == "generate":
        return None
    return ideal_bytes(shape, work.kind, work.batch, work.seq, element, weight_scale=weight_scale)


def roofline_pct(shape: ModelShape, work: Workload, element: int, ms: float, peaks: Peaks, weight_scale: float = 1.0) -> float | None:
    """100 x the ideal time over ms: the larger of the bytes over the copy bandwidth and the FLOPs
    over the matmul rate."""
    needed = bytes_read(shape, work, element, weight_scale)
    if needed is None:
        return None
    flops = ideal_flops(shape, work.kind, work.batch, work.seq)
    ideal_ms = max(needed / (peaks.copy_gb_s * 1e6), flops / (peaks.matmul_tflop_s * 1e9))
    return round(100 * ideal_ms / ms, 1)


def bandwidth_pct(shape: ModelShape, work: Workload, element: int, ms: float, peaks: Peaks, weight_scale: float = 1.0) -> float | None:
    """The bytes a step must move, per ms, as a % of the copy bandwidth (what bounds decode)."""
    needed = bytes_read(shape, work, element, weight_scale)
    return None if needed is None else round(100 * needed / (peaks.copy_gb_s * 1e6) / ms, 1)


def _time(runner: Runner, work: Workload, ids: torch.Tensor, device: torch.device, warmup: int, repeats: int) -> float:
    if work.kind == "embed":
        return runner.embed_ms(ids, device, warmup, repeats)
    if work.kind == "prefill":
        return runner.prefill_ms(ids, device, warmup, repeats)
    if work.kind == "decode":
        return runner.decode_ms(ids, work.seq, device, warmup, repeats)
    return runner.generate_ms(ids, work.new_tokens, device, 1, max(1, repeats // 3))


def prompt_ids(shape: ModelShape, work: Workload, device: torch.device, warmup: int, repeats: int) -> torch.Tensor:
    # A decode measurement appends warmup + repeats tokens: start that far below the context.
    seq = work.seq - warmup - repeats if work.kind == "decode" else work.seq
    generator = torch.Generator().manual_seed(work.batch * 7919 + seq)
    return torch.randint(0, shape.vocab_size, (work.batch, seq), generator=generator).to(device)


def runners_for(model: torch.nn.Module, device: torch.device) -> RunnerFactories:
    """The implementations to time on this model, by name (GPU_IMPLS or CPU_IMPLS), each made when
    the model is, so that a failure to make one is that implementation's error."""
    made: RunnerFactories = [("hf-eager", lambda: HFRunner(model, "eager")), ("hf-sdpa", lambda: HFRunner(model, "sdpa"))]
    if device.type == "cuda":
        made += [
            ("hf-compile-static", lambda: HFCompiledStaticRunner(model)),
            ("tritongpt2-nograph", lambda: TritonGPT2Runner(model, backend="triton", cuda_graphs=False)),
            ("tritongpt2", lambda: TritonGPT2Runner(model, backend="triton", cuda_graphs=True)),
        ]
    else:
        made.append(("tritongpt2", lambda: TritonGPT2Runner(model, backend="torch", cuda_graphs=False)))
        if model.dtype == torch.float32:  # quantized from the float32 weights
            made += [(f"tritongpt2-{f}-{str(d).removeprefix('torch.')}",
                      lambda f=f, d=d: QuantizedTritonGPT2Runner(model, Quantization(f), d, only=CPU_QUANTIZED_WORKLOADS))
                     for f, d in CPU_QUANTIZED]
        if ctranslate2_installed() and model.dtype == torch.float32:
            made += [(f"ctranslate2-{c}", lambda c=c: CTranslate2Runner(model, c)) for c in COMPUTE_TYPES]
    return made


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    got, reference = got.double().cpu(), reference.double().cpu()
    return ((got - reference).norm() / reference.norm()).item()


def float64_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """transformers eager's last-position logits in float64, on the CPU: the parity check's oracle."""
    return HFRunner(copy.deepcopy(model).to(device="cpu", dtype=torch.float64), "eager").prefill(ids.cpu())


def parity_limit(dtype: torch.dtype, hf_eager_error: float) -> float:
    """The error vs float64 a check may reach: PARITY_TOLERANCE for the dtype plus twice the error
    transformers eager makes itself in that dtype, as the tests earn theirs (tests/numerics.py)."""
    return PARITY_TOLERANCE[dtype] + 2 * hf_eager_error


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip()[:500]


def free_memory(device: torch.device) -> None:
    """Drop what a model left behind: dynamo's compiled graphs (they count toward its recompile
    limit), unreachable tensors and, on a GPU, the allocator's cached blocks."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def default_workloads(device: torch.device, quick: bool) -> tuple[Workload, ...]:
    return QUICK_WORKLOADS if quick else GPU_WORKLOADS if device.type == "cuda" else CPU_WORKLOADS


def default_rounds(device: torch.device, quick: bool) -> tuple[int, int]:
    """(rounds, repeats per round)."""
    if quick:
        return QUICK_ROUNDS, REPEATS
    return (GPU_ROUNDS, REPEATS) if device.type == "cuda" else (CPU_ROUNDS, CPU_REPEATS)


def run_suite(
    shapes: list[ModelShape],
    dtypes: list[torch.dtype],
    device: torch.device,
    *,
    quick: bool = False,
    workloads: tuple[Workload, ...] | None = None,
    runners: Callable[[torch.nn.Module, torch.device], RunnerFactories] | None = None,
    warmup: int = WARMUP,
    repeats: int | None = None,
    rounds: int | None = None,
    peaks: Peaks | None = None,
    on_results: Callable[[dict], None] | None = None,
    progress: Progress | None = None,
) -> dict:
    """Run every workload for every model and dtype; returns the results document, also handed to
    on_results after each workload and after each model's parity check (to write what is done
    before what may fail, or run out of time, next).
    runners: the implementations to time on a model (default runners_for); peaks: measured here
    unless given."""
    workloads = workloads or default_workloads(device, quick)
    runners = runners or runners_for
    default_r, default_repeats = default_rounds(device, quick)
    rounds, repeats = rounds or default_r, repeats or default_repeats
    progress = progress or Progress(len(shapes) * len(dtypes) * len(workloads) * rounds)
    peaks = peaks or measure_peaks(device, dtypes[0], copy_mb=64 if quick else 512, matmul_n=512 if quick else 4096)
    document = {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "peak": peaks.as_dict(),
        "quick": quick,
        "rounds": rounds,
        "parity": [],
        "results": [],
    }
    free_memory(device)  # each model starts with nothing compiled, whatever the process compiled before
    for shape in shapes:
        for dtype in dtypes:
            model = build_model(shape, dtype, device)
            try:
                made = _make_runners(runners(model, device))

                def workload_done(records: list[dict]) -> None:
                    document["results"] += records
                    add_ratios(document["results"])
                    if on_results is not None:
                        on_results(document)

                _time_model(shape, dtype, model, made, workloads, device, peaks, warmup=warmup, repeats=repeats,
                            rounds=rounds, progress=progress, on_workload=workload_done)
                document["parity"] += _check_parity(shape, dtype, model, made, device, quick)
            finally:
                made = model = None  # unreferenced, so that free_memory frees them
                free_memory(device)
            if on_results is not None:
                on_results(document)
    return document


def _make_runners(factories: RunnerFactories) -> dict[str, Runner | str]:
    """Each runner by name, or the error that making it raised."""
    made: dict[str, Runner | str] = {}
    for name, make in factories:
        try:
            made[name] = make()
        except Exception as error:
            made[name] = describe(error)
    return made


def _record(shape: ModelShape, dtype: torch.dtype, work: Workload, impl: str) -> dict:
    return {"model": shape.name, "dtype": str(dtype).removeprefix("torch."), "workload": work.kind,
            "batch": work.batch, ("context" if work.kind == "decode" else "seq"): work.seq, "impl": impl}


def _time_model(
    shape: ModelShape, dtype: torch.dtype, model: torch.nn.Module, made: dict[str, Runner | str],
    workloads: tuple[Workload, ...], device: torch.device, peaks: Peaks, *, warmup: int, repeats: int, rounds: int,
    progress: Progress, on_workload: Callable[[list[dict]], None],
) -> None:
    """Time each workload on every runner, handing each workload's records to on_workload."""
    model_bytes = weight_bytes(model)
    for work in workloads:
        records = []
        ids = prompt_ids(shape, work, device, warmup, repeats)
        errors = {name: r for name, r in made.items() if isinstance(r, str)}
        timed = {name: r for name, r in made.items() if not isinstance(r, str) and r.runs(work)}
        rounds_ms: dict[str, list[float]] = {name: [] for name in timed}
        for round_index in range(rounds):
            for name, runner in timed.items():
                if name in errors:
                    continue
                progress.show(f"{shape.name} {str(dtype).removeprefix('torch.')} {work.label} · {name} · round {round_index + 1}/{rounds}")
                try:
                    rounds_ms[name].append(_time(runner, work, ids, device, warmup, repeats))
                except Exception as error:
                    errors[name] = describe(error)
                finally:
                    runner.release()
                    if device.type == "cuda":
                        # A reference cycle would hold a released cache (20 GB at batch 64 x 1024 for
                        # gpt2-xl) until the next collection: collect before the next allocates its own.
                        gc.collect()
                        torch.cuda.empty_cache()
            progress.advance()
        for name, runner in made.items():
            record = _record(shape, dtype, work, name)
            if name in errors:
                records.append(record | {"error": errors[name]})
            elif name in timed:
                # Activations and cache at `element` bytes; the weights' bytes over theirs at `element`.
                element = (runner.activation_dtype or dtype).itemsize
                scale = runner.weight_bytes / (model_bytes / dtype.itemsize * element) if runner.weight_bytes else 1.0
                records.append(record | _timing(shape, work, element, rounds_ms[name], peaks, scale))
                if work.kind == "embed" and runner.embed_note:
                    records[-1]["note"] = runner.embed_note
        on_workload(records)


def _timing(shape: ModelShape, work: Workload, element: int, rounds_ms: list[float], peaks: Peaks, weight_scale: float) -> dict:
    ms = statistics.median(rounds_ms)
    tokens = work.batch * (work.new_tokens if work.kind == "generate" else 1 if work.kind == "decode" else work.seq)
    return {
        "median_ms": round(ms, 4), "spread_ms": [round(min(rounds_ms), 4), round(max(rounds_ms), 4)],
        "rounds_ms": [round(t, 4) for t in rounds_ms], "tokens_per_s": round(tokens / ms * 1e3, 1),
        "roofline_pct": roofline_pct(shape, work, element, ms, peaks, weight_scale),
        "bandwidth_pct": bandwidth_pct(shape, work, element, ms, peaks, weight_scale),
    }


def _check_parity(
    shape: ModelShape, dtype: torch.dtype, model: torch.nn.Module, made: dict[str, Runner | str], device: torch.device, quick: bool,
) -> list[dict]:
    checked = [r for r in made.values() if isinstance(r, TritonGPT2Runner) and r.checks_parity]
    if quick:
        # The kernels themselves, under the interpreter: checked, not timed (its speed means
        # nothing), and after the timings, whose CPU it would disturb.
        checked.append(TritonGPT2Runner(model, backend="interpret", cuda_graphs=False))
    ids = torch.randint(0, shape.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    oracle = float64_logits(model, ids)
    hf_eager = HFRunner(model, "eager").prefill(ids)
    hf_eager_error = relative_error(hf_eager, oracle)
    checks = []
    for runner in checked:
        check = {"model": shape.name, "dtype": str(dtype).removeprefix("torch."), "impl": f"{runner.name} ({runner.backend})",
                 "hf_eager_error_vs_float64": hf_eager_error, "limit": parity_limit(dtype, hf_eager_error)}
        try:
            got = runner.prefill(ids)
            check["relative_error_vs_float64"] = relative_error(got, oracle)
            check["relative_error_vs_hf_eager"] = relative_error(got, hf_eager)
        except Exception as error:
            check["error"] = describe(error)
        finally:
            runner.release()
        checks.append(check)
    return checks


def add_ratios(results: list[dict]) -> None:
    """Give each tritongpt2 record its speed-up over every baseline of the same workload (the ratio of
    medians) and, where rounds were recorded, the spread of the per-round ratios (the rounds are
    taken in turn, so a round's ratio compares timings made moments apart)."""
    def key(r: dict) -> tuple:
        return (r["model"], r["dtype"], r["workload"], r["batch"], r.get("seq"), r.get("context"))

    by_key: dict[tuple, list[dict]] = {}
    for record in results:
        if "error" not in record:
            by_key.setdefault(key(record), []).append(record)
    for group in by_key.values():
        baselines = {r["impl"]: r for r in group if not r["impl"].startswith("tritongpt2")}
        for record in group:
            if not record["impl"].startswith("tritongpt2"):
                continue
            record["speedup_vs"] = {name: round(b["median_ms"] / record["median_ms"], 2) for name, b in baselines.items()}
            spreads = {}
            for name, b in baselines.items():
                ratios = [theirs / ours for theirs, ours in zip(b.get("rounds_ms", []), record.get("rounds_ms", []))]
                if ratios:
                    spreads[name] = [round(min(ratios), 2), round(max(ratios), 2)]
            if spreads:
                record["speedup_spread_vs"] = spreads
