"""CUDA graphs for the engine's steps: one capture per bucket, all sharing one memory pool.

A step is a function of a dict of static input tensors that returns a tuple of tensors. The runner
copies what changed of each call's inputs into the bucket's static buffers and replays the graph;
the outputs are the graph's static buffers, overwritten by the next replay of the same bucket (the
engine copies what it hands out). Capturing runs the step once for real, on the call's inputs, and
that first call's answer comes from that run.

`CudaGraphs` captures with torch.cuda.CUDAGraph. `EagerGraphs` is its CPU stand-in: "replay" calls
the recorded step again on the same static buffers and writes into the same output tensors, so the
runner's bookkeeping is tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable, Protocol

import torch

Step = Callable[[], tuple[torch.Tensor | None, ...]]


class Graph(Protocol):
    def replay(self) -> None: ...


class GraphCapture(Protocol):
    def capture(self, step: Step) -> tuple[Graph, tuple[torch.Tensor | None, ...], tuple[torch.Tensor | None, ...]]:
        """(graph, its static outputs, the outputs of the run made while capturing)."""


class CudaGraphs:
    """Real CUDA graphs; every capture goes into one shared memory pool."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, step: Step) -> tuple[Graph, tuple[torch.Tensor | None, ...], tuple[torch.Tensor | None, ...]]:
        # The run on a side stream compiles every kernel and is this call's answer; the capture
        # only records, it executes nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            first = step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static = step()
        return graph, static, first


class _EagerGraph:
    def __init__(self, step: Step, outputs: tuple[torch.Tensor | None, ...]) -> None:
        self.step, self.outputs = step, outputs

    def replay(self) -> None:
        for static, fresh in zip(self.outputs, self.step()):
            if static is not None:
                static.copy_(fresh)


class EagerGraphs:
    """The CPU stand-in for CudaGraphs: replay re-runs the recorded step on the static buffers."""

    def __init__(self) -> None:
        self.captures = 0

    def capture(self, step: Step) -> tuple[Graph, tuple[torch.Tensor | None, ...], tuple[torch.Tensor | None, ...]]:
        self.captures += 1
        first = step()
        static = tuple(t.clone() if t is not None else None for t in first)
        return _EagerGraph(step, static), static, first


@dataclass
class _Captured:
    inputs: dict[str, torch.Tensor]
    graph: Graph
    outputs: tuple[torch.Tensor | None, ...]
    # What each buffer holds: (the shape of the corner written, the caller's name for its content or
    # None). Outside the corner a buffer is zeros.
    holds: dict[str, tuple[torch.Size, Hashable | None]] = field(default_factory=dict)


class GraphRunner:
    """Captures a step per bucket key on first use and replays it after.

    A call's inputs may be smaller than the bucket's buffers: each fills the leading corner of its
    buffer, and the rest is zeros (padding). An input whose content the caller can name (`known`:
    the decode mask of ones, the token count) is not copied again while its buffer holds the same
    name and shape, so a decode step copies only its token ids before the replay."""

    def __init__(self, capture: GraphCapture) -> None:
        self.capture = capture
        self._captured: dict[Hashable, _Captured] = {}

    def __len__(self) -> int:
        return len(self._captured)

    def keys(self) -> list[Hashable]:
        return list(self._captured)

    def static_inputs(self, key: Hashable) -> dict[str, torch.Tensor] | None:
        captured = self._captured.get(key)
        return captured.inputs if captured is not None else None

    def run(
        self,
        key: Hashable,
        inputs: dict[str, torch.Tensor],
        step: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor | None, ...]],
        *,
        leading: tuple[int, ...],
        known: dict[str, Hashable] | None = None,
    ) -> tuple[torch.Tensor | None, ...]:
        """Run `step` on `inputs` through the bucket's graph. `leading` is the bucket's leading
        dimensions (rows, tokens): an input shorter there is padded with zeros, its other dimensions
        must match; an input with fewer dimensions than `leading` (the token count) is taken whole."""
        known = known or {}
        captured = self._captured.get(key)
        if captured is None:
            static_inputs = {name: _padded(t, leading) for name, t in inputs.items()}
            graph, outputs, first = self.capture.capture(lambda: step(static_inputs))
            holds = {name: (t.shape, known.get(name)) for name, t in inputs.items()}
            self._captured[key] = _Captured(static_inputs, graph, outputs, holds)
            return first
        for name, tensor in inputs.items():
            buffer = captured.inputs.get(name)
            if buffer is None or not _fits(tensor, buffer, len(leading)):
                held = None if buffer is None else f"{tuple(buffer.shape)} {buffer.dtype}"
                raise ValueError(f"input {name} {tuple(tensor.shape)} {tensor.dtype} does not fit bucket {key!r}'s buffer {held}")
            held_shape, held_name = captured.holds[name]
            if name in known and held_name == known[name] and held_shape == tensor.shape:
                continue
            if held_shape != tensor.shape and tensor.shape != buffer.shape:
                buffer.zero_()
            _corner(buffer, tensor.shape).copy_(tensor)
            captured.holds[name] = (tensor.shape, known.get(name))
        captured.graph.replay()
        return captured.outputs


def _corner(buffer: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return buffer[tuple(slice(0, size) for size in shape)]


def _padded(tensor: torch.Tensor, leading: tuple[int, ...]) -> torch.Tensor:
    if tensor.dim() < len(leading):
        return tensor.clone()
    buffer = torch.zeros(*leading, *tensor.shape[len(leading):], dtype=tensor.dtype, device=tensor.device)
    _corner(buffer, tensor.shape).copy_(tensor)
    return buffer


def _fits(tensor: torch.Tensor, buffer: torch.Tensor, leading: int) -> bool:
    if tensor.dtype != buffer.dtype or tensor.dim() != buffer.dim():
        return False
    if tensor.dim() < leading:
        return tensor.shape == buffer.shape
    return (all(size <= limit for size, limit in zip(tensor.shape[:leading], buffer.shape[:leading]))
            and tensor.shape[leading:] == buffer.shape[leading:])


def bucket(size: int, limit: int, smallest: int = 1) -> int:
    """The power of two >= size (at least `smallest`), capped at `limit`; ValueError past `limit`."""
    if size < 1:
        raise ValueError(f"size {size} must be positive")
    if size > limit:
        raise ValueError(f"size {size} is larger than the largest bucket, {limit}")
    padded = max(smallest, 1 << (size - 1).bit_length())
    return min(padded, limit)
