"""The backends that run the same GPT-2 math, each one object that says what it can do.

- ``triton``: the kernels compiled for a CUDA GPU; steps can be captured in CUDA graphs.
- ``interpret``: the same kernels run by Triton's CPU interpreter (``TRITON_INTERPRET=1``). Its
  bfloat16 ``tl.dot`` is wrong, so it refuses bfloat16.
- ``torch``: PyTorch ops arranged for the CPU (torch_ops.py).

Each runs float weights and every quantized format (kernels/quantized_weight.py) today; a backend
lists the formats it runs in `quantizations`, and the engine asks `check_quantization` before it
quantizes.

The engine asks a Backend for its device, ops, dtypes, quantized formats, whether it can capture
graphs and how it reads a matmul weight fastest (`weight_layout`); it never tests a backend's name.
Adding a backend is one entry in `BACKENDS` and its ops module.

Triton decides between compiling and interpreting when a ``@triton.jit`` function is defined (when a
kernel module is first imported, and when triton.language itself is: its helpers are jit functions),
and reads TRITON_INTERPRET again while interpreting. So one process runs either compiled or
interpreted kernels, never both: the interpret backend sets TRITON_INTERPRET=1 for the process, and
asking for the other kind afterwards is a clear error instead of a silent switch.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import torch

from .quantized_weight import FORMATS

# How a float matmul weight [in, out] is stored: IN_OUT, row-major as the checkpoint's Conv1D holds
# it; OUT_IN, row-major [out, in] (nn.Linear's), seen as [in, out] through a transpose; PACKED, in
# oneDNN's own layout (packed_weight.py) where cpu_matmul.can_pack says the CPU runs it, else OUT_IN.
IN_OUT, OUT_IN, PACKED = "in_out", "out_in", "packed"

BACKEND_ENV = "TRITONGPT2_BACKEND"
_LAUNCHERS = "tritongpt2.kernels.launchers"
_TRUE = ("1", "true", "on", "yes")
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    name: str
    device_type: str  # the device its tensors live on
    ops_module: str
    cuda_graphs: bool  # a step can be captured and replayed
    dtypes: tuple[torch.dtype, ...]
    needs_cuda: bool = False
    interprets: bool = False
    dtype_note: str = ""  # why a dtype is missing from `dtypes`
    quantizations: tuple[str, ...] = FORMATS  # the quantized weight formats its ops take
    weight_layout: str = IN_OUT  # how an engine that owns its float matmul weights stores them

    def __str__(self) -> str:
        return self.name

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type)

    @property
    def ops(self) -> ModuleType:
        """The module of ops (the functions in launchers.OPS, with the same signatures)."""
        if self.interprets:
            os.environ["TRITON_INTERPRET"] = "1"
        ops = importlib.import_module(self.ops_module)
        if self.ops_module == _LAUNCHERS and kernel_mode() != self.name:
            raise ValueError(f"backend {self.name!r} asked for, but the kernels were built for {kernel_mode()!r}")
        return ops

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype not in self.dtypes:
            names = ", ".join(str(d) for d in self.dtypes)
            raise ValueError(f"the {self.name} backend does not run {dtype} (it runs {names}){self.dtype_note}")

    def check_quantization(self, format: str) -> None:
        """ValueError naming the backend and the format when its ops cannot take weights in `format`."""
        if format not in self.quantizations:
            runs = ", ".join(self.quantizations) or "none"
            raise ValueError(f"the {self.name} backend does not run {format}-quantized weights (the formats it runs: {runs})")


BACKENDS: dict[str, Backend] = {
    "triton": Backend("triton", "cuda", _LAUNCHERS, cuda_graphs=True, dtypes=ALL_DTYPES, needs_cuda=True),
    "interpret": Backend(
        "interpret", "cpu", _LAUNCHERS, cuda_graphs=False, dtypes=(torch.float32, torch.float16), interprets=True,
        dtype_note="; Triton's interpreter computes bfloat16 tl.dot wrongly, so it is refused rather than "
        "answered wrongly (use backend='torch' for bfloat16 on the CPU)",
    ),
    # oneDNN's linear, which runs the torch backend's products (cpu_matmul.py), reads a weight it
    # packed once fastest, and [out, in] rows faster than [in, out] ones, to the same bits.
    "torch": Backend("torch", "cpu", "tritongpt2.kernels.torch_ops", cuda_graphs=False, dtypes=ALL_DTYPES, weight_layout=PACKED),
}


def resolve_backend(backend: str | Backend | None = None, *, device: torch.device | str | None = None) -> Backend:
    """The backend to use: ``backend`` if given, else ``$TRITONGPT2_BACKEND``, else the one for
    ``device`` (the weights' device: ``triton`` for CUDA tensors, ``torch`` for CPU ones), else
    ``triton`` on a machine with CUDA and ``torch`` without. ValueError when the choice cannot be
    honoured, or does not run on ``device``."""
    chosen, source = choose_backend(backend, device=device)
    if chosen.needs_cuda and not torch.cuda.is_available():
        raise ValueError(
            f"{source}{chosen.name!r} needs a CUDA GPU, and torch.cuda.is_available() is False; "
            "use backend='interpret' (Triton's CPU interpreter) or backend='torch'"
        )
    if device is not None and torch.device(device).type != chosen.device_type:
        raise ValueError(
            f"{source}{chosen.name!r} runs on {chosen.device_type}, but the weights are on {torch.device(device)}; "
            f"move them (model.to({chosen.device_type!r})) or choose another backend"
        )
    mode = kernel_mode()
    if chosen.name == "triton" and (mode == "interpret" or (mode is None and _interpret_env_on())):
        raise ValueError(
            f"{source}{chosen.name!r}: this process runs Triton's interpreter (TRITON_INTERPRET=1), "
            "so kernels cannot be compiled for the GPU here; unset TRITON_INTERPRET and start a new process"
        )
    if chosen.interprets and (mode == "triton" or (mode is None and _triton_language_compiled())):
        raise ValueError(
            f"{source}{chosen.name!r}: triton was already imported for the GPU in this process (by the kernels, "
            "or by a library such as torch.compile or transformers); set TRITON_INTERPRET=1 in the "
            "environment before anything imports triton"
        )
    return chosen


def choose_backend(backend: str | Backend | None = None, *, device: torch.device | str | None = None) -> tuple[Backend, str]:
    """(the backend resolve_backend picks, where the choice came from), without checking that it can
    run in this process."""
    if isinstance(backend, Backend):
        return backend, "backend="
    source = "backend="
    if backend is None:
        backend, source = os.environ.get(BACKEND_ENV) or None, f"${BACKEND_ENV}="
    if backend is None:
        on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return BACKENDS["triton" if on_cuda else "torch"], "the default backend "
    if not isinstance(backend, str) or backend.strip().lower() not in BACKENDS:
        raise ValueError(f"unknown backend {source}{backend!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[backend.strip().lower()], source


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
