"""Choosing between the three backends that run the same GPT-2 math.

- ``triton``: the kernels compiled for a CUDA GPU.
- ``interpret``: the same kernels run by Triton's CPU interpreter (``TRITON_INTERPRET=1``).
- ``torch``: plain PyTorch ops from ``reference.py``.

Triton decides between compiling and interpreting when a ``@triton.jit`` function is defined: when a
kernel module is first imported, and when triton.language itself is (its helpers are jit functions).
So one process runs either compiled or interpreted kernels, never both; asking for the other one is
a clear error instead of a silent switch.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

BACKENDS = ("triton", "interpret", "torch")
BACKEND_ENV = "TRITONGPT2_BACKEND"
_LAUNCHERS = "tritongpt2.kernels.launchers"
_TRUE = ("1", "true", "on", "yes")


def resolve_backend(backend: str | None = None) -> str:
    """The backend to use: ``backend`` if given, else ``$TRITONGPT2_BACKEND``, else ``triton`` on a
    machine with CUDA and ``torch`` without. Raises ValueError when the choice cannot be honoured."""
    source = "backend="
    if backend is None:
        backend, source = os.environ.get(BACKEND_ENV) or None, f"${BACKEND_ENV}="
    if backend is None:
        return "triton" if torch.cuda.is_available() else "torch"
    name = backend.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {source}{backend!r}; choose one of {', '.join(BACKENDS)}")
    if name == "triton" and not torch.cuda.is_available():
        raise ValueError(
            f"{source}{backend!r} needs a CUDA GPU, and torch.cuda.is_available() is False; "
            "use backend='interpret' (Triton's CPU interpreter) or backend='torch'"
        )
    mode = kernel_mode()
    if name == "triton" and (mode == "interpret" or (mode is None and _interpret_env_on())):
        raise ValueError(
            f"{source}{backend!r}: this process runs Triton's interpreter (TRITON_INTERPRET=1), "
            "so kernels cannot be compiled for the GPU here; unset TRITON_INTERPRET and start a new process"
        )
    if name == "interpret" and (mode == "triton" or (mode is None and _triton_language_compiled())):
        raise ValueError(
            f"{source}{backend!r}: triton was already imported for the GPU in this process (by the kernels, "
            "or by a library such as torch.compile or transformers); set TRITON_INTERPRET=1 in the "
            "environment before anything imports triton"
        )
    return name


def backend_device(backend: str) -> torch.device:
    """The device whose tensors a backend computes on."""
    return torch.device("cuda") if backend == "triton" else torch.device("cpu")


def kernel_ops(backend: str) -> ModuleType:
    """The module of ops for a resolved backend: ``reference`` for torch, ``launchers`` otherwise.
    Both expose the same functions with the same signatures."""
    if backend == "torch":
        return importlib.import_module("tritongpt2.kernels.reference")
    if backend == "interpret":
        resolve_backend(backend)
        os.environ["TRITON_INTERPRET"] = "1"
    ops = importlib.import_module(_LAUNCHERS)
    if kernel_mode() != backend:
        raise ValueError(f"backend {backend!r} asked for, but the kernels were built for {kernel_mode()!r}")
    return ops


def kernel_mode() -> str | None:
    """``interpret`` or ``triton`` once the kernels are built in this process, None before."""
    launchers = sys.modules.get(_LAUNCHERS)
    if launchers is None:
        return None
    from triton.runtime.interpreter import InterpretedFunction

    return "interpret" if isinstance(launchers.KERNELS[0], InterpretedFunction) else "triton"


def _triton_language_compiled() -> bool:
    """Whether triton.language was imported without the interpreter: its own @jit helpers (tl.zeros
    and friends) are then GPU functions that interpreted kernels cannot call."""
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return False
    from triton.runtime.jit import JITFunction

    return any(isinstance(member, JITFunction) for member in vars(standard).values())


def _interpret_env_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE
