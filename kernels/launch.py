"""The one place where kernels are launched.

Launchers check their inputs, allocate outputs and pick tile sizes, then call `launch`. Inside
`recording_launches()` the call is recorded instead of run, so an audit can call the real launchers
(on meta tensors, at any shape) and compile or count exactly the configurations they would launch.
Inside `observing_launches(observer)` every launch runs inside `observer(record)`, a context
manager, so an audit can attribute what the kernel does (its memory traffic) to that launch.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator


@dataclass(frozen=True)
class LaunchRecord:
    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


_recorder: ContextVar[Callable[[LaunchRecord], None] | None] = ContextVar("tritongpt2_launch_recorder", default=None)
_observer: ContextVar[Callable[[LaunchRecord], ContextManager] | None] = ContextVar("tritongpt2_launch_observer", default=None)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, num_warps: int, num_stages: int, **constexprs: Any) -> None:
    """Run ``kernel[grid](*args, **constexprs)``, or hand it to the active recorder."""
    record, observe = _recorder.get(), _observer.get()
    if record is not None:
        record(LaunchRecord(kernel, grid, args, constexprs, num_warps, num_stages))
        return
    if observe is None:
        kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
        return
    with observe(LaunchRecord(kernel, grid, args, constexprs, num_warps, num_stages)):
        kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)


@contextmanager
def observing_launches(observer: Callable[[LaunchRecord], ContextManager]) -> Iterator[None]:
    """Run every launch of the block inside the context manager observer(record)."""
    token = _observer.set(observer)
    try:
        yield
    finally:
        _observer.reset(token)


@contextmanager
def recording_launches() -> Iterator[list[LaunchRecord]]:
    """Collect launches instead of running them, for the duration of the block."""
    records: list[LaunchRecord] = []
    token = _recorder.set(records.append)
    try:
        yield records
    finally:
        _recorder.reset(token)
