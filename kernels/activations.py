"""Elementwise activations for kernel epilogues, named as transformers' ACT2FN names them.

`ACTIVATIONS` maps every parameter-free ACT2FN name to the formula the epilogue applies; aliases map
to the same formula. The interpreter has no libdevice tanh, so tanh is written through exp.
"""

from __future__ import annotations

import triton
import triton.language as tl

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


@triton.jit
def _tanh(x):
    # 2*sigmoid(2x) - 1: exp overflows to inf for large -x, which gives -1 exactly, never NaN.
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _softplus(x):
    # torch's softplus returns x itself above 20.
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def apply_activation(x, FORMULA: tl.constexpr):
    """x is float32; FORMULA is a value of ACTIVATIONS."""
    if FORMULA == "gelu_tanh":
        x = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif FORMULA == "gelu_erf":
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif FORMULA == "gelu_erf_clip10":
        x = tl.minimum(tl.maximum(0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476)), -10.0), 10.0)
    elif FORMULA == "quick_gelu":
        x = x / (1.0 + tl.exp(-1.702 * x))
    elif FORMULA == "relu":
        x = tl.maximum(x, 0.0)
    elif FORMULA == "relu2":
        x = tl.maximum(x, 0.0)
        x = x * x
    elif FORMULA == "relu6":
        x = tl.minimum(tl.maximum(x, 0.0), 6.0)
    elif FORMULA == "leaky_relu":
        x = tl.where(x >= 0.0, x, 0.01 * x)
    elif FORMULA == "silu":
        x = x / (1.0 + tl.exp(-x))
    elif FORMULA == "sigmoid":
        x = 1.0 / (1.0 + tl.exp(-x))
    elif FORMULA == "tanh":
        x = _tanh(x)
    elif FORMULA == "mish":
        x = x * _tanh(_softplus(x))
    elif FORMULA == "hardswish":
        x = x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    elif FORMULA == "laplace":
        x = 0.5 * (1.0 + tl.math.erf((x - 0.707107) / (0.282095 * 1.4142135623730951)))
    elif FORMULA == "sqrtsoftplus":
        x = tl.sqrt(_softplus(x))
    return x
