"""What each weight-only format costs in accuracy and saves in memory, against float32 on the same weights.

The model is a random-weight GPT-2 at a family shape with initializer_range 0.2 (at 0.02 greedy
decoding just repeats the last prompt token and agreement would be blind). Float32 transformers
greedily continues a prompt by NEW_TOKENS tokens; then, teacher-forced on that text, each format's
logits at the continuation's positions are compared with float32's:

    logits_rel_error   ||L_q - L_f|| / ||L_f||, tritongpt2's quantized engine (torch backend)
    plain_rel_error    the same for transformers' float32 forward over the quantize-then-dequantize
                       weights (plain PyTorch): the format's own error
    kernel_ratio       logits_rel_error / plain_rel_error: the error the engine's quantized matmuls
                       add beyond the format's (1.0 adds none)
    layer_rel_error    the residual stream after the first layer against the float32 engine's (the
                       error one layer adds; random weights at 0.2 saturate attention's softmax, so
                       across many layers a small error flips which key a head attends to, and the
                       logits' error compounds far beyond what trained weights show)
    top1_agreement     the positions (of NEW_TOKENS) whose argmax is float32's greedy token
    greedy_prefix      tokens of the engine's own greedy continuation equal to float32's before the
                       first difference (free-running: one early difference changes the rest)

Memory: the weights' bytes at each format for the family's shapes, matmul weights quantized (c_attn,
c_proj, c_fc, mlp c_proj, the tied LM head / wte), biases, LayerNorms and wpe in the model's dtype.

int8 against CTranslate2 int8 (`int8_against_ctranslate2`, where ctranslate2 is installed): the CPU
benchmark's int8 baseline quantizes each product's input rows to int8 as well as the weights, where
tritongpt2's int8 is weight-only (its integer route writes a row exactly in int8 digits: twice the
multiply-adds at 16 rows). What that buys CTranslate2 in accuracy is measured here, on weights at
trained GPT-2's scale (initializer_range 0.02, where the logits' error after a full stack still shows
the products' own, rather than the saturated 0.5 of every format at 0.2): the logits at every
position of a prompt against float32's, over int8's own error (transformers' float32 forward over the
dequantized int8 weights), for one layer and for the shape's depth.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tritongpt2.engine.config import GPT2Config as EngineConfig
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.generation import generate
from tritongpt2.engine.options import EngineOptions
from tritongpt2.engine.quantize import VARIANTS, Quantization, quantize_weights
from tritongpt2.engine.weights import GPT2Weights, shared_weights
from tritongpt2.kernels.quantized_weight import stored_bytes
from tritongpt2.kernels.reference import dequantize

from .memory import weights_bytes
from .model_shapes import ModelShape
from .suite import build_model

NEW_TOKENS = 128
PROMPT_TOKENS = 16
MEASURED = tuple(VARIANTS.values())
# The CTranslate2 comparison: trained GPT-2's weight scale, and a prompt whose every position is compared.
CTRANSLATE2_INITIALIZER_RANGE = 0.02
CTRANSLATE2_TOKENS = 64


@dataclass(frozen=True)
class AccuracyRow:
    format: str
    logits_rel_error: float
    plain_rel_error: float
    kernel_ratio: float
    layer_rel_error: float
    top1_agreement: int
    greedy_prefix: int
    tokens: int  # the continuation's length
    weights_mb: float
    float32_weights_mb: float


@dataclass(frozen=True)
class Int8AgainstCTranslate2Row:
    impl: str
    layers: int
    logits_rel_error: float
    int8_rel_error: float  # int8's own: transformers' float32 forward over the dequantized weights
    ratio: float  # logits_rel_error / int8_rel_error


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _dequantized(weights: GPT2Weights) -> dict[str, torch.Tensor]:
    """Each quantized matrix of the engine's weights as the float32 transformers parameter it replaces."""
    state = {}
    for i, layer in enumerate(weights.layers):
        for name, key in (("attn_weight", "attn.c_attn"), ("attn_proj_weight", "attn.c_proj"),
                          ("fc_weight", "mlp.c_fc"), ("mlp_proj_weight", "mlp.c_proj")):
            state[f"transformer.h.{i}.{key}.weight"] = dequantize(getattr(layer, name))
    state["transformer.wte.weight"] = dequantize(weights.lm_head).T.contiguous()
    return state


def _first_layer_output(step) -> torch.Tensor:
    """The residual stream leaving layer 0 (the model has two layers or more)."""
    return step.layer_inputs[1]


def _floats_in(weights: GPT2Weights, dtype: torch.dtype) -> GPT2Weights:
    """The weights with every float tensor (biases, LayerNorms, wpe) in `dtype`; quantized ones as they are."""
    def cast(value: object) -> object:
        return value.to(dtype) if isinstance(value, torch.Tensor) else value

    layers = [type(layer)(**{name: cast(value) for name, value in vars(layer).items()}) for layer in weights.layers]
    return GPT2Weights(cast(weights.wte), cast(weights.wpe), layers, cast(weights.ln_f_weight), cast(weights.ln_f_bias),
                       cast(weights.lm_head))


def matmul_elements(shape: ModelShape) -> int:
    c = shape.n_embd
    return shape.n_layer * 12 * c * c + shape.vocab_size * c


def weights_mb(shape: ModelShape, quantization: Quantization | None, element: int = 4) -> float:
    """The weights' memory in MB (10**6 bytes) with the matmuls in `quantization` (None: all float)."""
    c = shape.n_embd
    total = weights_bytes(shape, 1)  # the weights' count
    if quantization is None:
        return total * element / 1e6
    floats = total - matmul_elements(shape)
    matrices = [(c, 3 * c), (c, c), (c, shape.n_inner), (shape.n_inner, c)] * shape.n_layer + [(c, shape.vocab_size)]
    quantized = sum(stored_bytes(quantization.format, k, n, quantization.group_size, quantization.double_quant)
                    for k, n in matrices)
    return (floats * element + quantized) / 1e6


def measured_weights_mb(weights: GPT2Weights) -> float:
    """The memory an engine's weights take, counted from its tensors (shared ones once)."""
    seen, total = set(), 0
    tensors = [weights.wte, weights.wpe, weights.ln_f_weight, weights.ln_f_bias, weights.lm_head]
    for layer in weights.layers:
        tensors += list(vars(layer).values())
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.nbytes
    return total / 1e6


def measure(
    shape: ModelShape, quantizations: tuple[Quantization, ...] = MEASURED, *, seed: int = 0, new_tokens: int = NEW_TOKENS,
    backend: str = "torch", dtype: torch.dtype = torch.float32,
) -> list[AccuracyRow]:
    """One row per format, on the CPU: tritongpt2's engine on `backend` with `dtype` activations,
    transformers float32 for the references."""
    model = build_model(shape, torch.float32, torch.device("cpu"), seed)
    config = EngineConfig.from_dict(model.config.to_dict())
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, shape.vocab_size, (1, PROMPT_TOKENS), generator=generator)
    with torch.no_grad():
        text = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                              pad_token_id=0, attention_mask=torch.ones_like(prompt))
        reference = model(text).logits[0, PROMPT_TOKENS - 1:-1]  # the logits that chose each new token
    continuation = text[0, PROMPT_TOKENS:]
    float_weights = shared_weights(model, config)
    options = EngineOptions(backend=backend, max_batch=1, max_seq=PROMPT_TOKENS + new_tokens + 1)
    float_layers = Engine(config, _floats_in(float_weights, dtype), options).prefill(text, logits=None, layer_inputs=True)
    rows = []
    for quantization in quantizations:
        weights = quantize_weights(float_weights, config, quantization)
        engine = Engine(config, _floats_in(weights, dtype), options)
        step = engine.prefill(text, logits="all", layer_inputs=True)
        ours = step.logits[0, PROMPT_TOKENS - 1:-1]
        layer_error = _rel_error(_first_layer_output(step), _first_layer_output(float_layers))
        own = generate(engine, prompt, max_new_tokens=new_tokens)[0, PROMPT_TOKENS:]
        plain = replace_weights(model, _dequantized(weights))
        with torch.no_grad():
            plain_logits = plain(text).logits[0, PROMPT_TOKENS - 1:-1]
        ours_error, plain_error = _rel_error(ours, reference), _rel_error(plain_logits, reference)
        differs = (own != continuation).nonzero()
        rows.append(AccuracyRow(
            quantization.describe(), ours_error, plain_error, ours_error / plain_error, layer_error,
            int((ours.argmax(-1) == continuation).sum()), int(differs[0, 0]) if len(differs) else new_tokens, new_tokens,
            measured_weights_mb(weights), weights_mb(shape, None),
        ))
    return rows


def int8_against_ctranslate2(shape: ModelShape, *, seed: int = 0, tokens: int = CTRANSLATE2_TOKENS) -> list[Int8AgainstCTranslate2Row]:
    """tritongpt2's int8 (torch backend, float32 and bfloat16 activations) and CTranslate2's int8 on the
    same random weights, against float32: one row per implementation, for one layer and for the
    shape's depth. Needs ctranslate2."""
    from .ctranslate2_runner import CTranslate2Runner

    rows = []
    for layers in sorted({1, shape.n_layer}):
        model = build_model(dataclasses.replace(shape, n_layer=layers), torch.float32, torch.device("cpu"), seed,
                            initializer_range=CTRANSLATE2_INITIALIZER_RANGE)
        config = EngineConfig.from_dict(model.config.to_dict())
        ids = torch.randint(0, shape.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
        weights = quantize_weights(shared_weights(model, config), config, Quantization("int8"))
        with torch.no_grad():
            reference = model(ids).logits[0]
            int8_error = _rel_error(replace_weights(model, _dequantized(weights))(ids).logits[0], reference)
        options = EngineOptions(backend="torch", max_batch=1, max_seq=tokens)
        logits = {}
        for dtype in (torch.float32, torch.bfloat16):
            engine = Engine(config, _floats_in(weights, dtype), options)
            logits[f"tritongpt2 int8, {str(dtype).removeprefix('torch.')} activations"] = engine.prefill(ids, logits="all").logits[0]
        ctranslate2 = CTranslate2Runner(model, "int8")
        logits["ctranslate2 int8"] = ctranslate2.embed(ids)[0]
        del ctranslate2  # its process ends here, not at the next collection
        for impl, values in logits.items():
            error = _rel_error(values, reference)
            rows.append(Int8AgainstCTranslate2Row(impl, layers, error, int8_error, error / int8_error))
    return rows


def replace_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of the transformers model with the given parameters replaced (wte stays tied to lm_head)."""
    import copy

    plain = copy.deepcopy(model)
    with torch.no_grad():
        for key, value in state.items():
            plain.get_parameter(key).copy_(value)
    return plain


def memory_table(shapes: list[ModelShape]) -> list[dict]:
    """The weights' MB per shape: float32, float16 and each measured format (float16 activations' model)."""
    table = []
    for shape in shapes:
        row = {"model": shape.name, "float32": weights_mb(shape, None, 4), "float16": weights_mb(shape, None, 2)}
        for quantization in MEASURED:
            row[quantization.describe()] = weights_mb(shape, quantization, 2)
        table.append(row)
    return table


def ctranslate2_markdown(shape: ModelShape, rows: list[Int8AgainstCTranslate2Row]) -> str:
    lines = [
        f"## int8, weight-only, against CTranslate2 int8, which quantizes the activations too ({shape.name} shape, CPU)",
        "",
        f"Random weights at initializer_range {CTRANSLATE2_INITIALIZER_RANGE}; the logits at every position of a "
        f"{CTRANSLATE2_TOKENS}-token prompt against float32 transformers on the same weights. int8's own error: "
        "transformers' float32 forward over the dequantized int8 weights; the ratio is what each implementation "
        "adds to it (the issue's bound for tritongpt2's kernels: 1.3x).",
        "",
        "| layers | impl | logits rel. error | int8's own rel. error | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.layers} | {r.impl} | {r.logits_rel_error:.5f} | {r.int8_rel_error:.5f} | {r.ratio:.3f} |")
    return "\n".join(lines) + "\n"


def markdown(shape: ModelShape, rows: list[AccuracyRow], memory: list[dict], activations: str = "float32") -> str:
    lines = [
        f"## Weight-only quantization against float32 ({shape.name} shape, random weights at initializer_range 0.2, CPU)",
        "",
        f"{activations} activations on the torch backend; teacher-forced on float32's greedy continuation of a "
        f"{PROMPT_TOKENS}-token prompt by {rows[0].tokens} tokens.",
        "",
        "| format | logits rel. error | plain dequantized rel. error | ratio | first layer rel. error | top-1 agreement | greedy prefix | weights MB (float32 rest) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.format} | {r.logits_rel_error:.4f} | {r.plain_rel_error:.4f} | {r.kernel_ratio:.3f} | {r.layer_rel_error:.5f} | "
                     f"{r.top1_agreement}/{r.tokens} | {r.greedy_prefix}/{r.tokens} | {r.weights_mb:.1f} (float32: {r.float32_weights_mb:.1f}) |")
    lines += ["", "Weights' memory, MB (matmuls quantized, the rest in float16):", ""]
    keys = list(memory[0])
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in memory:
        lines.append("| " + " | ".join(row["model"] if k == "model" else f"{row[k]:.0f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"



def write_results(folder: Path, shape: ModelShape, rows: list[AccuracyRow], memory: list[dict], activations: str,
                  versions: dict, against_ctranslate2: list[Int8AgainstCTranslate2Row] | None = None) -> Path:
    """quantization-<model>-<activations>.json and .md in `folder`; returns the markdown's path."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"quantization-{shape.name}-{activations}"
    document = {"model": shape.name, "activations": activations, "prompt_tokens": PROMPT_TOKENS, "versions": versions,
                "rows": [asdict(row) for row in rows], "memory_mb": memory}
    text = markdown(shape, rows, memory, activations)
    if against_ctranslate2:
        document["int8_against_ctranslate2"] = [asdict(row) for row in against_ctranslate2]
        text += "\n" + ctranslate2_markdown(shape, against_ctranslate2)
    stem.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
    stem.with_suffix(".md").write_text(text)
    return stem.with_suffix(".md")
