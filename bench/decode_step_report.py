"""One decode step on the GPU, kernel by kernel and whole: each kernel's achieved GB/s, and ms/token
of the graph-captured step against transformers' fastest decode (sdpa, a static cache,
torch.compile), side by side in one process.

Per kernel: the launches of one eager step (the tiles the tuning table gives), each distinct one
replayed alone from a CUDA graph with what it streams rotated out of L2 (bench/launch_timing.py);
every layer launches the same configurations, so a launch's time counts once per layer. Its bytes
are what it streams (STREAMED_ARGUMENTS: weights, a layer's KV cache), so GB/s is the kernel's own
share of the ideal step. Kernels that stream neither (the embedding, which also advances the cache's
bookkeeping each time it runs, so it cannot be replayed in place) are listed, not timed.
"""

from __future__ import annotations

import statistics
from contextlib import nullcontext
from typing import Callable

import torch

from tritongpt2.kernels.launch import LaunchRecord, observing_launches

from .launch_timing import Timing, streamed_bytes, time_launch
from .model_shapes import ModelShape
from .runners import HFCompiledStaticRunner, TritonGPT2Runner
from .suite import GPU_ROUNDS, REPEATS, WARMUP, Workload, build_model, free_memory, prompt_ids


def launch_label(record: LaunchRecord) -> str:
    """The kernel, and for a product its [K x N]: what tells c_attn from c_proj from the LM head."""
    arguments = record.arguments
    shape = f" [{arguments['K']} x {arguments['N']}]" if "N" in arguments and "K" in arguments else ""
    return record.name + shape


def per_kernel(records: list[LaunchRecord], time: Callable[[LaunchRecord], Timing] = time_launch) -> list[dict]:
    """Per distinct launch label: launches per step, microseconds per launch, streamed bytes, GB/s."""
    grouped: dict[str, list[LaunchRecord]] = {}
    for record in records:
        grouped.setdefault(launch_label(record), []).append(record)
    rows = []
    for label, launches in grouped.items():
        row = {"kernel": label, "launches": len(launches), "programs": launches[0].grid, "us": None, "spread_us": None,
               "bytes": streamed_bytes(launches[0]), "gb_s": None}
        if row["bytes"] is not None:
            timing = time(launches[0])
            row |= {"us": round(timing.median_us, 3), "spread_us": round(timing.spread_us, 3),
                    "gb_s": round(row["bytes"] / timing.median_us / 1e3, 1)}
        rows.append(row)
    return rows


def step_report(shape: ModelShape, dtype: torch.dtype, context: int, device: torch.device) -> dict:
    model = build_model(shape, dtype, device)
    work = Workload("decode", 1, context)
    ids = prompt_ids(shape, work, device, WARMUP, REPEATS)
    eager = TritonGPT2Runner(model, backend="triton", cuda_graphs=False)
    step = eager.decode_step(ids, context)
    step()  # compiles every kernel
    records: list[LaunchRecord] = []

    def observe(record: LaunchRecord) -> nullcontext:
        records.append(record)
        return nullcontext()

    with observing_launches(observe):
        step()
    kernels = per_kernel(records)
    eager.release()
    ms_per_token = {}
    for runner in (HFCompiledStaticRunner(model), TritonGPT2Runner(model, backend="triton", cuda_graphs=True)):
        rounds = []
        for _ in range(GPU_ROUNDS):
            rounds.append(runner.decode_ms(ids, context, device, WARMUP, REPEATS))
            runner.release()
        ms_per_token[runner.name] = {"median_ms": round(statistics.median(rounds), 4),
                                     "spread_ms": [round(min(rounds), 4), round(max(rounds), 4)]}
    free_memory(device)
    kernel_us = sum(k["us"] * k["launches"] for k in kernels if k["us"] is not None)
    return {"model": shape.name, "dtype": str(dtype).removeprefix("torch."), "batch": 1, "context": context,
            "kernels": kernels, "kernel_ms_sum": round(kernel_us / 1e3, 4), "ms_per_token": ms_per_token}


def step_markdown(report: dict, device: str) -> str:
    lines = [f"{report['model']} {report['dtype']} decode, batch 1, context {report['context']}, on {device}.", "",
             "| kernel | launches/step | programs | us/launch (spread) | streamed bytes | GB/s |", "|---|---|---|---|---|---|"]
    for k in report["kernels"]:
        timed = "not timed" if k["us"] is None else f"{k['us']} ({k['spread_us']})"
        lines.append(f"| {k['kernel']} | {k['launches']} | {k['programs']} | {timed} | "
                     f"{'' if k['bytes'] is None else format(k['bytes'], ',')} | {'' if k['gb_s'] is None else k['gb_s']} |")
    lines += ["", f"The timed kernels alone, summed over the step: {report['kernel_ms_sum']} ms.", "",
              "| implementation | ms/token (spread) |", "|---|---|"]
    for name, t in report["ms_per_token"].items():
        lines.append(f"| {name} | {t['median_ms']} ({t['spread_ms'][0]}-{t['spread_ms'][1]}) |")
    return "\n".join(lines) + "\n"
