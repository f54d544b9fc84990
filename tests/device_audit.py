"""The device audit: a run of the suite on the CPU in which the kernel backend's tensors count as
living on a device of their own, as they do on a GPU machine (where numerics.BACKEND is "triton",
on cuda, and the "torch" backend stays on the CPU). A test that would hand a CPU tensor to a CUDA
engine, or compare a CUDA tensor with a CPU one, then fails here too.

    TRITONGPT2_TEST_DEVICE_AUDIT=1 python -m pytest -q -p no:cacheprovider

What it does, in this process only (conftest.py installs it; nothing in the package changes):
- `numerics.on(BACKEND, x)` marks the tensors it moves: they become `OnDevice` tensors, a subclass
  that every torch op carries to its results (slices, masks, argmax of them stay on the device).
- An `OnDevice` tensor combined with an unmarked CPU tensor of one or more dimensions in a torch op
  raises, as CUDA does (0-dim CPU tensors are scalars there, allowed; so are indexing a device
  tensor with CPU indices, assigning a CPU tensor into one, and copy_). `.numpy()` raises, as it does
  for a CUDA tensor; `.cpu()` and `.to("cpu")` give a plain CPU tensor.
- The doors of the package, when a test calls them: Engine.prefill and decode, generate and
  stream_tokens, gpt2_step, the six classes' forward and generate, and an accelerated model's forward
  and generate. Behind a door of the kernel backend every tensor argument must be marked (else
  ValueError, as the engine refuses a tensor on another device); behind a door of the torch backend
  none may be. The tensors a kernel-backend door returns are marked (generate's and stream_tokens'
  are on the CPU, as documented). Calls the package makes itself (Embedder, the CLI, the bench, an
  accelerated model calling its fast forward, transformers' generate calling forward) are not
  checked: the audit is about the tests.
- `accelerate(model, backend=BACKEND)` wants a model moved with `numerics.on(BACKEND, model)`;
  `accelerate(moved, backend="torch")` is refused, and a moved model's default backend is BACKEND,
  as a CUDA model's is "triton".

What it proves: the tests put what they hand to the kernel backend on its device, and bring what
it returns to the CPU before comparing it with CPU tensors, at every door above. What it does not
prove: tensors made with `device=` in a factory (torch.zeros(..., device=...)) are not marked, so
they count as CPU tensors (a false alarm, never a miss: use `on()`); the kernels' own tests take
numerics.DEVICE by construction and are not audited; a test reading engine internals (engine.cache,
engine.weights) sees unmarked tensors; and nothing here runs on a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

ENV = "TRITONGPT2_TEST_DEVICE_AUDIT"
ENABLED = os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")
# The backend that plays the GPU's part: the kernels under the interpreter (numerics.BACKEND here).
FOREIGN = "interpret"
TAG = "_tritongpt2_tests_backend"  # on a module moved by numerics.on(): the backend whose device holds it
WHERE = f"the {FOREIGN} backend's device (cuda on a GPU machine)"
_LAUNCHERS = "tritongpt2.kernels.launchers"


class DeviceMismatch(RuntimeError):
    pass


class OnDevice(torch.Tensor):
    """A tensor the tests put on the kernel backend's device (numerics.on): see the module's doc."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.numpy, torch.Tensor.__array__):
            raise TypeError(f"can't convert a tensor on {WHERE} to numpy: use .cpu() first [device audit]")
        if func is torch.Tensor.cpu or (func is torch.Tensor.to and _to_host(args, kwargs)):
            with torch._C.DisableTorchFunctionSubclass():
                moved = func(*args, **kwargs)  # the tensor itself, when it is already where asked
            return moved.as_subclass(torch.Tensor) if isinstance(moved, OnDevice) else moved
        _check_one_device(func, args, kwargs)
        return super().__torch_function__(func, types, args, kwargs)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _to_host(args: tuple, kwargs: dict) -> bool:
    """Whether Tensor.to(...) names the CPU (a device, or a CPU tensor) as its destination."""
    for arg in (*args[1:], kwargs.get("device"), kwargs.get("other")):
        if isinstance(arg, torch.Tensor):
            return not isinstance(arg, OnDevice)
        if isinstance(arg, (str, torch.device)):
            try:
                return torch.device(arg).type == "cpu"
            except RuntimeError:
                return False
    return False


def _check_one_device(func: Callable, args: tuple, kwargs: dict) -> None:
    """Raise as CUDA would for an op that mixes device tensors with CPU tensors of 1+ dimensions."""
    if func in (torch.Tensor.copy_, torch.Tensor.to):
        return
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
        target, index = args[0], args[1] if len(args) > 1 else None
        if isinstance(target, OnDevice):
            return  # CPU indices and CPU values are moved to the device
        if any(isinstance(t, OnDevice) and t.dim() for t in _tensors(index)):
            raise DeviceMismatch(f"a CPU tensor indexed with a tensor on {WHERE} [device audit]")
        return
    tensors = _tensors(list(args) + list(kwargs.values()))
    if any(isinstance(t, OnDevice) for t in tensors) and any(not isinstance(t, OnDevice) and t.dim() for t in tensors):
        name = getattr(func, "__name__", str(func))
        raise DeviceMismatch(
            f"{name}: expected all tensors on one device, got tensors on {WHERE} and CPU tensors; bring the "
            "device ones over with .cpu() (or put the others on the device with numerics.on) [device audit]"
        )


def mark(value: Any, memo: dict | None = None) -> Any:
    """value's tensors as OnDevice (in place for outputs: mappings, dataclasses; new tuples, lists)."""
    memo = {} if memo is None else memo
    if isinstance(value, torch.Tensor):
        if isinstance(value, OnDevice):
            return value
        if id(value) not in memo:
            memo[id(value)] = value.as_subclass(OnDevice)
        return memo[id(value)]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(mark(v, memo) for v in value)
    if isinstance(value, list):
        return [mark(v, memo) for v in value]
    if isinstance(value, dict):  # transformers' and our ModelOutput set the attribute with the item
        for key in list(value.keys()):
            value[key] = mark(value[key], memo)
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            setattr(value, field.name, mark(getattr(value, field.name), memo))
    return value


def unmark(value: Any) -> Any:
    """value with its OnDevice tensors as plain ones (inside a door: the package's own tensors)."""
    if isinstance(value, OnDevice):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(unmark(v) for v in value)
    if isinstance(value, list):
        return [unmark(v) for v in value]
    if type(value) is dict:
        return {k: unmark(v) for k, v in value.items()}
    return value


def tag(module: torch.nn.Module, backend: str | None) -> None:
    module.__dict__[TAG] = backend


def on_foreign_device(module: Any) -> bool:
    return getattr(module, "__dict__", {}).get(TAG) == FOREIGN


# --- who is calling: a test, or the package itself ---------------------------------------------------
_TESTS = str(Path(__file__).resolve().parent) + os.sep
_PASSED_THROUGH = (
    str(Path(torch.__file__).resolve().parent) + os.sep, functools.__file__, contextlib.__file__, __file__,
)


def called_from_tests(depth: int = 2) -> bool:
    """Whether the nearest caller outside torch, functools, contextlib and this file is a test file."""
    frame = sys._getframe(depth)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_PASSED_THROUGH):
            return name.startswith(_TESTS)
        frame = frame.f_back
    return False


def _arguments(args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    return [(name, t) for name, value in named for t in _tensors(value)]


def door(function: Callable, what: str, foreign: Callable[..., bool], returns_on_device: bool = True) -> Callable:
    """function, checking the tensors a test hands it and marking what it gives back (see the doc)."""

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        on_device = foreign(*args, **kwargs)
        if called_from_tests():
            for name, tensor in _arguments(args, kwargs):
                if on_device and not isinstance(tensor, OnDevice):
                    raise ValueError(
                        f"{what}: {name} is a CPU tensor, but this runs on {WHERE}: make it with "
                        f"numerics.on(backend, ...) [device audit]"
                    )
                if not on_device and isinstance(tensor, OnDevice):
                    raise ValueError(f"{what}: {name} is on {WHERE}, but this runs on the CPU (torch backend) [device audit]")
        marked = any(isinstance(t, OnDevice) for _, t in _arguments(args, kwargs))
        result = function(*unmark(args), **{k: unmark(v) for k, v in kwargs.items()})
        if on_device and returns_on_device and (marked or called_from_tests()):
            result = mark(result)
        return result

    return checked


def _engine_backend(engine: Any) -> bool:
    return getattr(getattr(engine, "backend", None), "name", None) == FOREIGN


def install(setattr_: Callable[[Any, str, Any], None] = setattr) -> None:
    """Put the doors in place (setattr_ is monkeypatch.setattr for a scoped install)."""
    import tritongpt2
    from tritongpt2.engine import forward, generation
    from tritongpt2.engine.engine import Engine
    from tritongpt2.engine.options import EngineOptions
    from tritongpt2.heads import accelerate as accelerate_module
    from tritongpt2.heads.models import MODEL_CLASSES
    from tritongpt2.kernels.backend import BACKEND_ENV

    for name in ("prefill", "decode"):
        setattr_(Engine, name, door(getattr(Engine, name), f"Engine.{name}", lambda self, *a, **k: _engine_backend(self)))
    for name in ("generate", "stream_tokens"):
        checked = door(getattr(generation, name), name, lambda engine, *a, **k: _engine_backend(engine), returns_on_device=False)
        setattr_(generation, name, checked)
        setattr_(tritongpt2, name, checked)
    step = door(forward.gpt2_step, "gpt2_step", lambda ops, *a, **k: getattr(ops, "__name__", "") == _LAUNCHERS)
    setattr_(forward, "gpt2_step", step)

    def model_on_device(self: Any, *args: Any, **kwargs: Any) -> bool:
        return _engine_backend(self.engine)

    patched = set()
    for cls in MODEL_CLASSES.values():
        for name in ("forward", "generate"):
            owner = next((c for c in cls.__mro__ if name in vars(c)), None)
            if owner is not None and (owner, name) not in patched:
                patched.add((owner, name))
                setattr_(owner, name, door(vars(owner)[name], f"{owner.__name__}.{name}", model_on_device))

    original = accelerate_module.accelerate

    @functools.wraps(original)
    def accelerate(model: Any, options: Any = None, **option_values: Any) -> Any:
        if called_from_tests(depth=2) and isinstance(model, torch.nn.Module):
            try:
                chosen = EngineOptions.of(options, **option_values)
            except (TypeError, ValueError):
                chosen = None  # accelerate itself says what is wrong
            if chosen is not None:
                if chosen.device is not None:
                    tag(model, None)  # model.to(device) by accelerate: on the CPU
                moved = on_foreign_device(model)
                backend = chosen.backend or os.environ.get(BACKEND_ENV)
                if backend is None and moved:
                    option_values = {**option_values, "backend": FOREIGN}  # as a CUDA model's default is triton
                elif backend is not None and str(backend).strip().lower() == FOREIGN and not moved:
                    raise ValueError(
                        f"backend={FOREIGN!r} runs on {WHERE}, but the model is on the CPU: move it with "
                        "numerics.on(backend, model) first [device audit]"
                    )
                elif backend is not None and str(backend).strip().lower() != FOREIGN and moved:
                    raise ValueError(f"backend={backend!r} runs on the CPU, but the model is on {WHERE} [device audit]")
        model = original(model, options, **option_values)
        for name in ("forward", "generate"):
            if name in vars(model):
                vars(model)[name] = door(vars(model)[name], f"accelerated {type(model).__name__}.{name}",
                                         lambda *a, **k: on_foreign_device(model))
        return model

    setattr_(accelerate_module, "accelerate", accelerate)
    setattr_(tritongpt2, "accelerate", accelerate)
