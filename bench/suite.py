"""The benchmark: every implementation on every workload, side by side in one process.

Figures are medians of CUDA-event (GPU) or perf_counter (CPU) timings, warm-up excluded. Each
record carries its % of the roofline from peaks measured in the same run: bytes (weights read once,
KV cache up to the context) over the copy bandwidth for decode; the larger of FLOPs over the matmul
rate and bytes over the bandwidth for embedding and prefill. bandwidth_pct is those bytes alone over
the copy bandwidth, for every workload: on a CPU, what an app embedding text is bound by.
"""

from __future__ import annotations

import datetime
import importlib
import platform
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from tritongpt2.bench.model_shapes import ModelShape, model_shape

from .ctranslate2_runner import COMPUTE_TYPES, CTranslate2Runner, ctranslate2_installed
from .peaks import Peaks, measure_peaks
from .runners import HFCompiledStaticRunner, HFRunner, Runner, TritonGPT2Runner
from .timing import median_ms

WARMUP, REPEATS = 3, 10
# The CPU's timings drift with whatever else the machine runs, in bursts of seconds: every
# implementation is timed in each of several short rounds, taken in turn, and a figure is the median
# of its rounds' medians.
CPU_ROUNDS, CPU_REPEATS = 6, 4


@dataclass(frozen=True)
class Workload:
    kind: str  # embed | prefill | decode | generate
    batch: int
    seq: int  # tokens in (embed, prefill, generate prompt) or the cache context (decode)
    new_tokens: int = 0  # generate only


GPU_WORKLOADS = (
    Workload("embed", 1, 16), Workload("embed", 1, 128), Workload("embed", 1, 512), Workload("embed", 64, 128),
    Workload("prefill", 1, 1024),
    *(Workload("decode", b, c) for b in (1, 8, 64) for c in (128, 1024)),
    Workload("generate", 1, 128, 128),
)
CPU_WORKLOADS = (Workload("embed", 1, 16), Workload("embed", 1, 128), Workload("decode", 1, 128))
QUICK_WORKLOADS = (Workload("embed", 2, 16), Workload("prefill", 1, 32), Workload("decode", 2, 32), Workload("generate", 1, 8, 8))
QUICK_SHAPE = ModelShape("tiny", 64, 4, 2, vocab_size=512, n_positions=128)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()}"


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


def build_model(shape: ModelShape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A random-weight transformers GPT2LMHeadModel at the shape (initializer_range 0.2, so that
    generations depend on the prompt)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=shape.vocab_size, n_positions=shape.n_positions, n_embd=shape.n_embd,
                        n_layer=shape.n_layer, n_head=shape.n_head, initializer_range=0.2)
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


def bytes_read(shape: ModelShape, weights: int, size: int, work: Workload) -> int | None:
    """The bytes a step must read at least: the weights, and for decode the KV cache up to the context.
    weights: bytes of weights a step reads; size: bytes per KV element."""
    if work.kind == "decode":
        return weights + work.batch * work.seq * 2 * shape.n_layer * shape.n_embd * size
    return weights if work.kind in ("embed", "prefill") else None


def roofline_pct(shape: ModelShape, weights: int, size: int, work: Workload, ms: float, peaks: Peaks) -> float | None:
    """100 x the ideal time over ms: bytes over the copy bandwidth for decode, the larger of that and
    FLOPs over the matmul rate for embed and prefill."""
    needed = bytes_read(shape, weights, size, work)
    if needed is None:
        return None
    ideal_ms = needed / (peaks.copy_gb_s * 1e6)
    if work.kind in ("embed", "prefill"):
        tokens = work.batch * work.seq
        dense = 2 * tokens * 12 * shape.n_layer * shape.n_embd**2
        attention = 2 * shape.n_layer * work.batch * work.seq**2 * shape.n_embd  # causal: half of 4 * T^2 * C
        head = 2 * work.batch * shape.n_embd * shape.vocab_size if work.kind == "prefill" else 0
        ideal_ms = max(ideal_ms, (dense + attention + head) / (peaks.matmul_tflop_s * 1e9))
    return round(100 * ideal_ms / ms, 1)


def bandwidth_pct(shape: ModelShape, weights: int, size: int, work: Workload, ms: float, peaks: Peaks) -> float | None:
    """The bytes a step must read, per ms, as a % of the copy bandwidth (what bounds decode)."""
    needed = bytes_read(shape, weights, size, work)
    return None if needed is None else round(100 * needed / (peaks.copy_gb_s * 1e6) / ms, 1)


def _time(runner: Runner, work: Workload, ids: torch.Tensor, device: torch.device, warmup: int, repeats: int) -> float:
    if work.kind == "embed":
        return median_ms(lambda: runner.embed(ids), device, warmup=warmup, repeats=repeats)
    if work.kind == "prefill":
        return median_ms(lambda: runner.prefill(ids), device, warmup=warmup, repeats=repeats)
    if work.kind == "decode":
        return runner.decode_ms(ids, device, warmup, repeats)
    return median_ms(lambda: runner.generate(ids, work.new_tokens), device, warmup=1, repeats=max(1, repeats // 3))


def prompt_ids(shape: ModelShape, work: Workload, device: torch.device, warmup: int, repeats: int) -> torch.Tensor:
    # A decode measurement appends warmup + repeats tokens: start that far below the context.
    seq = work.seq - warmup - repeats if work.kind == "decode" else work.seq
    generator = torch.Generator().manual_seed(work.batch * 7919 + seq)
    return torch.randint(0, shape.vocab_size, (work.batch, seq), generator=generator).to(device)


def runners_for(model: torch.nn.Module, device: torch.device, max_batch: int, max_seq: int) -> list[Callable[[], Runner]]:
    made: list[Callable[[], Runner]] = [lambda: HFRunner(model, "eager"), lambda: HFRunner(model, "sdpa")]
    if device.type == "cuda":
        made.append(lambda: HFCompiledStaticRunner(model))
        made.append(lambda: TritonGPT2Runner(model, backend="triton", cuda_graphs=False, max_batch=max_batch, max_seq=max_seq))
        made.append(lambda: TritonGPT2Runner(model, backend="triton", cuda_graphs=True, max_batch=max_batch, max_seq=max_seq))
    else:
        made.append(lambda: TritonGPT2Runner(model, backend="torch", cuda_graphs=False, max_batch=max_batch, max_seq=max_seq))
        if ctranslate2_installed() and model.dtype == torch.float32:
            made += [lambda c=compute_type: CTranslate2Runner(model, c) for compute_type in COMPUTE_TYPES]
    return made


def parity(model: torch.nn.Module, runner: Runner, ids: torch.Tensor) -> float:
    """Relative error of the runner's last-position logits against transformers eager."""
    reference = HFRunner(model, "eager").prefill(ids).float()
    got = runner.prefill(ids).float()
    return ((got - reference).norm() / reference.norm()).item()


def progress(done: int, total: int, label: str) -> None:
    print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)


def run_suite(
    models: list[str],
    dtypes: list[torch.dtype],
    device: torch.device,
    *,
    quick: bool = False,
    warmup: int = WARMUP,
    repeats: int | None = None,
    rounds: int | None = None,
) -> dict:
    """Run every workload for every model and dtype; returns the results document."""
    shapes = [QUICK_SHAPE] if quick else [model_shape(name) for name in models]
    workloads = QUICK_WORKLOADS if quick else GPU_WORKLOADS if device.type == "cuda" else CPU_WORKLOADS
    timed_once = quick or device.type == "cuda"
    rounds = rounds or (1 if timed_once else CPU_ROUNDS)
    repeats = repeats or (REPEATS if timed_once else CPU_REPEATS)
    peaks = measure_peaks(device, dtypes[0], copy_mb=64 if quick else 512, matmul_n=512 if quick else 4096)
    results, checks = [], []
    total = len(shapes) * len(dtypes) * len(workloads)
    done = 0
    for shape in shapes:
        for dtype in dtypes:
            model = build_model(shape, dtype, device)
            max_batch = max(2, *(w.batch for w in workloads))  # 2: the parity check's batch
            runners = [make() for make in runners_for(model, device, max_batch, shape.n_positions)]
            for work in workloads:
                done += 1
                progress(done, total, f"{shape.name} {dtype} {work.kind} b{work.batch}x{work.seq}")
                ids = prompt_ids(shape, work, device, warmup, repeats)
                timings = [[_time(runner, work, ids, device, warmup, repeats) for runner in runners] for _ in range(rounds)]
                for runner, ms in zip(runners, map(statistics.median, zip(*timings))):
                    tokens = work.batch * (work.new_tokens if work.kind == "generate" else 1 if work.kind == "decode" else work.seq)
                    weights = runner.weight_bytes or weight_bytes(model)
                    record = {
                        "model": shape.name, "dtype": str(dtype).removeprefix("torch."), "workload": work.kind,
                        "batch": work.batch, ("context" if work.kind == "decode" else "seq"): work.seq,
                        "impl": runner.name, "median_ms": round(ms, 4), "tokens_per_s": round(tokens / ms * 1e3, 1),
                        "roofline_pct": roofline_pct(shape, weights, dtype.itemsize, work, ms, peaks),
                        "bandwidth_pct": bandwidth_pct(shape, weights, dtype.itemsize, work, ms, peaks),
                    }
                    if work.kind == "embed" and runner.embed_note:
                        record["note"] = runner.embed_note
                    results.append(record)
            checked = [r for r in runners if r.name.startswith("tritongpt2")]
            if quick:
                # The kernels themselves, under the interpreter: checked, not timed (its speed means
                # nothing), and after the timings, whose CPU it would disturb.
                checked.append(TritonGPT2Runner(model, backend="interpret", cuda_graphs=False, max_batch=2, max_seq=32))
            ids = torch.randint(0, shape.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
            for runner in checked:
                checks.append({"model": shape.name, "dtype": str(dtype).removeprefix("torch."),
                               "impl": f"{runner.name} ({runner.engine.backend})",
                               "relative_error_vs_hf_eager": parity(model, runner, ids)})
            del runners, checked, model
    add_ratios(results)
    return {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "peak": peaks.as_dict(),
        "quick": quick,
        "parity": checks,
        "results": results,
    }


def add_ratios(results: list[dict]) -> None:
    """Give each tritongpt2 record its speed-up over every baseline of the same workload."""
    def key(r: dict) -> tuple:
        return (r["model"], r["dtype"], r["workload"], r["batch"], r.get("seq"), r.get("context"))

    by_key: dict[tuple, list[dict]] = {}
    for record in results:
        by_key.setdefault(key(record), []).append(record)
    for group in by_key.values():
        baselines = {r["impl"]: r["median_ms"] for r in group if not r["impl"].startswith("tritongpt2")}
        for record in group:
            if record["impl"].startswith("tritongpt2"):
                record["speedup_vs"] = {name: round(ms / record["median_ms"], 2) for name, ms in baselines.items()}
