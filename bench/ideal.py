"""The least a step must move and compute: the one formula behind the benchmark's % of roofline and
the traffic audit's ratio to the ideal.

Bytes: every weight once (wte whole when the LM head reads it, only the gathered rows for embed;
wpe only the rows used), the KV cache up to the context once (decode), the new K and V written once,
the token ids in and the outputs out once (last-position logits, or the hidden states for embed).
With a weight-only quantization the matmul weights (the tied LM head and wte too) count their
format's bytes, scales included (quantized_weight.bytes_per_weight); biases, LayerNorms and wpe stay
in the model's dtype.
"""

from __future__ import annotations

from tritongpt2.engine.quantize import Quantization
from tritongpt2.kernels.quantized_weight import bytes_per_weight

from .model_shapes import ModelShape

KINDS = ("embed", "prefill", "decode")


def _tokens(workload: str, batch: int, context: int) -> int:
    return batch * (1 if workload == "decode" else context)


def _matrix(k: int, n: int, element: int, quantization: Quantization | None) -> float:
    """The bytes of a [k, n] matmul weight (int8's group is the whole K: one scale per channel)."""
    if quantization is None:
        return k * n * element
    group = k if quantization.format == "int8" else quantization.group_size
    return k * n * bytes_per_weight(quantization.format, group, quantization.double_quant)


def weights_read(
    shape: ModelShape, workload: str, batch: int, context: int, element: int, quantization: Quantization | None = None
) -> int:
    """Bytes of weights a step reads at least, at `element` bytes per float weight."""
    c, inner, tokens = shape.n_embd, shape.n_inner, _tokens(workload, batch, context)
    products = sum(_matrix(k, n, element, quantization) for k, n in ((c, 3 * c), (c, c), (c, inner), (inner, c)))
    layers = shape.n_layer * (products + (9 * c + 4 * c) * element)  # + biases and LayerNorms
    wte = _matrix(c, tokens if workload == "embed" else shape.vocab_size, element, quantization)
    return round(layers + wte + (tokens * c + 2 * c) * element)  # + wpe rows + ln_f


def ideal_bytes(
    shape: ModelShape, workload: str, batch: int, context: int, element: int, *, weight_scale: float = 1.0,
    quantization: Quantization | None = None,
) -> int:
    """Bytes a step must move. context: the cache context for decode, the tokens per row otherwise;
    element: bytes per weight, activation and cache element; weight_scale: the weights' bytes over
    their bytes at `element`, for an implementation that reads a converted copy (int8: about 1/4);
    quantization: the matmul weights' format, read as stored."""
    if workload not in KINDS:
        raise ValueError(f"workload {workload!r} must be one of {', '.join(KINDS)}")
    c, layers, tokens = shape.n_embd, shape.n_layer, _tokens(workload, batch, context)
    kv_read = 2 * layers * batch * context * c * element if workload == "decode" else 0
    kv_write = 2 * layers * tokens * c * element
    outputs = tokens * c * element if workload == "embed" else batch * shape.vocab_size * element
    weights = round(weights_read(shape, workload, batch, context, element, quantization) * weight_scale)
    return weights + kv_read + kv_write + outputs + tokens * 8  # int64 token ids


def ideal_flops(shape: ModelShape, workload: str, batch: int, context: int) -> int:
    """Matmul FLOPs of a step: the layers' dense products, causal attention, and the LM head on the
    last position (none for embed)."""
    c, layers, tokens = shape.n_embd, shape.n_layer, _tokens(workload, batch, context)
    dense = 2 * tokens * 12 * layers * c * c
    if workload == "decode":
        attention = 4 * layers * batch * context * c
    else:
        attention = 2 * layers * batch * context * context * c  # causal: half of 4 * T^2 * C
    head = 0 if workload == "embed" else 2 * batch * c * shape.vocab_size
    return dense + attention + head
