"""Elementwise activations for kernel epilogues, named as transformers' ACT2FN names them.

`ACTIVATIONS` maps every parameter-free ACT2FN name to the formula the epilogue applies (in
linear.py); aliases map to the same formula. No @triton.jit code here: the config imports this module,
and a jit function defined before the interpreter is switched on could not run under it.
"""

from __future__ import annotations

ACTIVATIONS: dict[str, str] = {
    "linear": "identity",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu": "gelu_erf",
    "gelu_python": "gelu_erf",
    "gelu_10": "gelu_erf_clip10",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "relu2": "relu2",
    "relu6": "relu6",
    "leaky_relu": "leaky_relu",
    "silu": "silu",
    "swish": "silu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "mish": "mish",
    "hardswish": "hardswish",
    "laplace": "laplace",
    "sqrtsoftplus": "sqrtsoftplus",
}


def activation_formula(name: str) -> str:
    """The epilogue formula for an ACT2FN name; ValueError naming the supported ones otherwise."""
    formula = ACTIVATIONS.get(name)
    if formula is None:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
    return formula
