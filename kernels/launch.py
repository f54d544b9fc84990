"""The one place where kernels are launched.

Launchers check their inputs, allocate outputs and pick tile sizes, then call `launch` with every
argument by name (arguments a kernel declares with a default may be left out). Inside
`recording_launches()` the call is recorded instead of run, so an audit can call the real launchers
(on meta tensors, at any shape) and compile or count exactly the configurations they would launch.
Inside `observing_launches(observer)` every launch runs inside `observer(record)`, a context
manager, so an audit can attribute what the kernel does (its memory traffic) to that launch.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator


@dataclass(frozen=True)
class LaunchRecord:
    kernel: Any
    grid: tuple[int, ...]
    arguments: dict[str, Any]  # every parameter of the kernel by name, defaults filled in
    num_warps: int = 4
    num_stages: int = 3
    max_registers: int | None = None  # ptxas' per-thread register cap (Triton's maxnreg); None: its own choice

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def constexprs(self) -> dict[str, Any]:
        """The compile-time parameters: those annotated tl.constexpr."""
        return {name: value for name, value in self.arguments.items() if name in _constexpr_names(self.kernel)}


# aten ops that return views or metadata (or allocate without writing): they launch no work on a
# device and move no memory. Everything else a step runs outside the kernels is a launch of its own.
VIEW_OPS = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
    "squeeze", "split", "split_with_sizes", "as_strided", "alias", "detach", "unbind", "chunk", "narrow",
    "lift_fresh", "_to_copy_noop", "unflatten", "flatten", "empty", "empty_like", "empty_strided", "new_empty",
    "diagonal", "view_as", "sym_size", "sym_stride", "sym_numel", "is_same_size", "_reshape_alias",
}


_recorder: ContextVar[Callable[[LaunchRecord], None] | None] = ContextVar("tritongpt2_launch_recorder", default=None)
_observer: ContextVar[Callable[[LaunchRecord], ContextManager] | None] = ContextVar("tritongpt2_launch_observer", default=None)
_interpreter_checked = False


def _parameters(kernel: Any) -> inspect.Signature:
    return inspect.signature(kernel.fn)


def _constexpr_names(kernel: Any) -> set[str]:
    return {name for name, p in _parameters(kernel).parameters.items() if "constexpr" in str(p.annotation)}


def launch(
    kernel: Any, grid: tuple[int, ...], *, num_warps: int, num_stages: int, max_registers: int | None = None, **arguments: Any
) -> None:
    """Run ``kernel[grid](**arguments)``, or hand it to the active recorder."""
    record, observe = _recorder.get(), _observer.get()
    if not _interpreter_checked and record is None:
        _check_interpreter(kernel)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if max_registers is not None:
        options["maxnreg"] = max_registers
    if record is None and observe is None:
        kernel[grid](**arguments, **options)
        return
    bound = _parameters(kernel).bind(**arguments)
    bound.apply_defaults()
    launched = LaunchRecord(kernel, grid, dict(bound.arguments), num_warps, num_stages, max_registers)
    if record is not None:
        record(launched)
        return
    with observe(launched):
        kernel[grid](**arguments, **options)


def _check_interpreter(kernel: Any) -> None:
    """Once per process, at the first kernel run: fix the interpreter of triton < 3.7 if it runs it."""
    global _interpreter_checked
    from .interpreter_compat import install

    install(kernel)
    _interpreter_checked = True


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
