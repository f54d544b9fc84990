"""One recorded kernel launch timed alone on the GPU, at DRAM bandwidth.

A launch of a decode step takes a few microseconds, less than launching it from Python: it is
replayed from a CUDA graph (as a decode step is), so the events time the kernels, not the launches.
What the kernel streams (a weight, a layer's KV cache: STREAMED_ARGUMENTS) is rotated through copies
that together exceed twice an H100's 50 MB L2, so each launch reads them from DRAM as it would in a
step, where every layer has its own. Those arguments are also the kernel's bytes for its GB/s.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from tritongpt2.kernels.launch import LaunchRecord

# Per kernel, the arguments it streams from DRAM once per launch: the least it must read.
STREAMED_ARGUMENTS = {
    "split_linear_kernel": ("w_ptr",),
    "decode_mlp_kernel": ("fc_w_ptr", "proj_w_ptr"),
    "decode_attention_kernel": ("k_ptr", "v_ptr"),  # a layer's cache, sized to the context
}
ROTATION_BYTES = 100 * 2**20


@dataclass(frozen=True)
class Timing:
    median_us: float
    spread_us: float  # max - min over the rounds


def streamed_bytes(record: LaunchRecord) -> int | None:
    """Bytes of the launch's streamed arguments; None for a kernel that streams none."""
    names = STREAMED_ARGUMENTS.get(record.name)
    if names is None:
        return None
    return sum(record.arguments[name].numel() * record.arguments[name].element_size() for name in names)


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy with the same strides (the LM head's weight is wte's transpose)."""
    return torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device=tensor.device).copy_(tensor)


@torch.no_grad()
def time_launch(record: LaunchRecord, *, rounds: int = 5) -> Timing:
    """Microseconds per launch of `record` replayed from a CUDA graph, its streamed arguments rotated."""
    names = STREAMED_ARGUMENTS.get(record.name, ())
    copies = max(2, math.ceil(ROTATION_BYTES / max(1, streamed_bytes(record) or 0))) if names else 1
    variants = [record.arguments | {name: _copy(record.arguments[name]) for name in names} for _ in range(copies)]

    def launch_all() -> None:
        for arguments in variants:
            record.kernel[record.grid](**arguments, num_warps=record.num_warps, num_stages=record.num_stages)

    launch_all()  # compiles, outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch_all()
    graph.replay()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    return Timing(statistics.median(times), max(times) - min(times))
