"""Weight-only quantization of a model's matmul weights at load time (the formats: kernels/quantized_weight.py).

`Quantization` is what a user asks for (format, group size, double quantization), checked against
the model's shapes; `quantize_matrix` turns one float weight W [K, N] into a QuantizedWeight;
`quantize_weights` does every matmul of a model: c_attn, attention's c_proj, c_fc, the MLP's c_proj
and the LM head (whose wte the embedding then gathers from, dequantizing the rows it reads). Biases,
LayerNorms and wpe stay in the model's dtype. The arithmetic is float32 on the weight's device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tritongpt2.kernels.packed_weight import PackedWeight, dense
from tritongpt2.kernels.quantized_weight import (
    FORMATS,
    INT4_GROUP_SIZES,
    NESTED_BLOCK,
    NF4_BLOCK,
    NF4_CODE,
    QuantizedWeight,
    dynamic_code,
    is_quantized,
)

from .config import GPT2Config
from .weights import PRODUCT_WEIGHTS, GPT2Weights

DEFAULT_GROUP_SIZE = {"int8": None, "int4": 64, "nf4": NF4_BLOCK}


@dataclass(frozen=True)
class Quantization:
    """format: int8, int4 or nf4; group_size: int4's group (32, 64 or 128; default 64), nf4's block
    (64, bitsandbytes'); int8 has one scale per output channel and takes none; double_quant: nf4's
    absmax quantized to 8 bits in blocks of 256, as bitsandbytes' bnb_4bit_use_double_quant."""

    format: str
    group_size: int | None = None
    double_quant: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.format, str) or self.format.strip().lower() not in FORMATS:
            raise ValueError(f"quantization={self.format!r} is not a format; choose one of {', '.join(FORMATS)}")
        fmt = self.format.strip().lower()
        object.__setattr__(self, "format", fmt)
        group = self.group_size
        if group is not None and (isinstance(group, bool) or not isinstance(group, int)):
            raise ValueError(f"group_size={group!r} must be an integer")
        if fmt == "int8" and group is not None:
            raise ValueError(f"group_size={group} does not apply to int8, which has one scale per output channel")
        if fmt == "int4" and group is not None and group not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size={group} is not one of int4's {', '.join(map(str, INT4_GROUP_SIZES))}")
        if fmt == "nf4" and group is not None and group != NF4_BLOCK:
            raise ValueError(f"group_size={group}: nf4 quantizes in bitsandbytes' blocks of {NF4_BLOCK}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant={self.double_quant!r} must be True or False")
        if self.double_quant and fmt != "nf4":
            raise ValueError(f"double_quant applies to nf4's absmax, not to {fmt}")
        object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE[fmt] if group is None else group)

    @classmethod
    def of(cls, quantization: str | Quantization | None, group_size: int | None = None,
           double_quant: bool = False) -> Quantization | None:
        """The Quantization a user's arguments ask for; None for no quantization."""
        if quantization is None:
            if group_size is not None or double_quant:
                raise ValueError(f"group_size={group_size!r} and double_quant={double_quant!r} need a quantization format")
            return None
        if isinstance(quantization, Quantization):
            return quantization if group_size is None and not double_quant else replace(
                quantization, group_size=group_size or quantization.group_size,
                double_quant=double_quant or quantization.double_quant)
        return cls(quantization, group_size, double_quant)

    def check_model(self, config: GPT2Config) -> None:
        """ValueError when a group does not divide the K of one of the model's products."""
        if self.group_size is None:
            return
        for name, k in (("n_embd", config.n_embd), ("n_inner", config.inner_size)):
            if k % self.group_size:
                raise ValueError(f"group_size={self.group_size} does not divide {name}={k} ({self.format} groups run along it)")

    def describe(self) -> str:
        if self.format == "int8":
            return "int8 (per-channel scales)"
        return f"{self.format} (groups of {self.group_size}{', double quantization' if self.double_quant else ''})"


# Every format, and int4 at each group size, by a short label: what the audits and tests go through.
VARIANTS = {
    "int8": Quantization("int8"),
    "int4g32": Quantization("int4", 32),
    "int4g64": Quantization("int4", 64),
    "int4g128": Quantization("int4", 128),
    "nf4": Quantization("nf4"),
    "nf4dq": Quantization("nf4", double_quant=True),
}


def _nearest(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The index of the code value (sorted ascending) nearest each value, as uint8."""
    midpoints = (code[1:] + code[:-1]) / 2
    return torch.searchsorted(midpoints, values.contiguous()).to(torch.uint8)


def _pack(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] of 4-bit values -> [N, K // 2] bytes, even k in the high nibble."""
    return (q[:, 0::2] << 4) | q[:, 1::2]


def quantize_matrix(weight: torch.Tensor | PackedWeight, quantization: Quantization) -> QuantizedWeight:
    """W [K, N] (any float dtype and strides, or packed) in `quantization`'s format."""
    weight = dense(weight)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"a weight to quantize must be a 2-D float matrix, got {tuple(weight.shape)} {weight.dtype}")
    k, n = weight.shape
    rows = weight.T.float()  # [N, K]: groups run along each output channel's inputs
    fmt, group = quantization.format, quantization.group_size
    if fmt == "int8":
        absmax = rows.abs().amax(1, keepdim=True)
        scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
        q = torch.round(rows / scale).clamp_(-127, 127).to(torch.int8)
        return QuantizedWeight(fmt, q.contiguous().T, scale.contiguous().T, k)
    if k % group:
        raise ValueError(f"group_size={group} does not divide K={k} of a weight of shape {tuple(weight.shape)}")
    blocks = rows.reshape(n, k // group, group)
    if fmt == "int4":
        low, high = blocks.amin(-1), blocks.amax(-1)
        spread = (high - low) / 15
        # A constant group: scale |value| and a zero point of 0 or 1 represent it exactly.
        scale = torch.where(spread > 0, spread, torch.where(low != 0, low.abs(), torch.ones_like(low)))
        zero = torch.round(-low / scale).clamp_(0, 15)
        q = (torch.round(blocks / scale[..., None]) + zero[..., None]).clamp_(0, 15).to(torch.uint8)
        return QuantizedWeight(fmt, _pack(q.reshape(n, k)).contiguous().T, scale.contiguous().T, group,
                               zero=zero.to(torch.uint8).contiguous().T)
    absmax = blocks.abs().amax(-1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=weight.device)
    q = _nearest(blocks / safe[..., None], code).reshape(n, k)
    data = _pack(q).contiguous().T
    if not quantization.double_quant:
        return QuantizedWeight(fmt, data, absmax.contiguous().T, group)
    flat = absmax.reshape(-1)
    offset = flat.mean().reshape(1)
    centred = flat - offset
    nested_blocks = -(-flat.numel() // NESTED_BLOCK)
    padded = torch.zeros(nested_blocks * NESTED_BLOCK, device=weight.device)
    padded[: flat.numel()] = centred
    nested = padded.view(nested_blocks, NESTED_BLOCK).abs().amax(-1)
    nested_safe = torch.where(nested > 0, nested, torch.ones_like(nested))
    dynamic = dynamic_code().to(weight.device)
    codes = _nearest((padded.view(nested_blocks, NESTED_BLOCK) / nested_safe[:, None]).reshape(-1)[: flat.numel()], dynamic)
    return QuantizedWeight(fmt, data, codes.reshape(n, k // group).T, group, nested_absmax=nested,
                           nested_offset=offset, code=dynamic)


def quantize_weights(weights: GPT2Weights, config: GPT2Config, quantization: Quantization) -> GPT2Weights:
    """The model's weights with every matmul quantized. A tied LM head and wte share one
    QuantizedWeight (the head reads it as W = wte.T, the embedding gathers its columns); an untied
    wte stays in the model's dtype."""
    quantization.check_model(config)
    layers = [
        replace(layer, **{name: quantize_matrix(getattr(layer, name), quantization) for name in PRODUCT_WEIGHTS})
        for layer in weights.layers
    ]
    head = quantize_matrix(weights.lm_head.T, quantization)
    tied = weights.lm_head is weights.wte
    return replace(weights, layers=layers, lm_head=head, wte=head if tied else weights.wte)



# A quantized checkpoint (GPT2PreTrainedModel.save_pretrained): config.json's quantization_config
# names the format, and each quantized weight `key` is stored as its tensors `key.q<field>`
# (QuantizedWeight.tensors(), N-major), e.g. h.0.attn.c_attn.weight.qdata and .qscale; a tied LM
# head is stored once, under wte.weight (wte-shaped: [vocab, ...]).
QUANT_METHOD = "tritongpt2"
QUANTIZATION_CONFIG_VERSION = 1
QUANTIZED_KEY = ".q"
_FIELDS = ("data", "scale", "zero", "nested_absmax", "nested_offset", "code")


def quantization_config(quantization: Quantization) -> dict[str, object]:
    """config.json's quantization_config for weights saved in `quantization`."""
    return {"quant_method": QUANT_METHOD, "format": quantization.format, "group_size": quantization.group_size,
            "double_quant": quantization.double_quant, "version": QUANTIZATION_CONFIG_VERSION}


def saved_quantization(config: GPT2Config, source: object = "checkpoint") -> Quantization | None:
    """The Quantization a checkpoint's config says its weights are saved in, None for float weights;
    ValueError for another library's quantized checkpoint or a config this version cannot read."""
    saved = config.extra.get("quantization_config")
    if saved is None:
        return None
    method = saved.get("quant_method") if isinstance(saved, dict) else None
    if method != QUANT_METHOD:
        raise ValueError(
            f"{source} holds weights quantized by {method or 'another library'!s} (quantization_config={saved!r}); "
            "tritongpt2 reads float checkpoints and its own quantized ones: load the float checkpoint and pass "
            "quantization='int8', 'int4' or 'nf4'"
        )
    if saved.get("version") != QUANTIZATION_CONFIG_VERSION:
        raise ValueError(f"{source}: quantization_config version {saved.get('version')!r} is not one this tritongpt2 reads "
                         f"({QUANTIZATION_CONFIG_VERSION})")
    try:
        return Quantization(saved.get("format"), saved.get("group_size") if saved.get("format") != "int8" else None,
                            saved.get("double_quant", False))
    except ValueError as error:
        raise ValueError(f"{source}: quantization_config {saved!r}: {error}") from None


def quantization_of(weights: GPT2Weights) -> Quantization | None:
    """The Quantization a model's weights are in, read from its LM head; None for float weights."""
    head = weights.lm_head
    if not is_quantized(head):
        return None
    return Quantization(head.format, None if head.format == "int8" else head.group_size, head.double_quant)


def quantized_tensors(key: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """A quantized weight's tensors under the checkpoint's keys `key.q<field>`."""
    return {f"{key}{QUANTIZED_KEY}{name}": tensor for name, tensor in weight.tensors().items()}


def _stored_layout(quantization: Quantization, k: int, n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Each tensor a [k, n] weight stores, as (N-major shape, dtype)."""
    fmt = quantization.format
    groups = 1 if fmt == "int8" else k // quantization.group_size
    layout = {"data": ((n, k), torch.int8) if fmt == "int8" else ((n, k // 2), torch.uint8),
              "scale": ((n, groups), torch.uint8 if quantization.double_quant else torch.float32)}
    if fmt == "int4":
        layout["zero"] = ((n, groups), torch.uint8)
    if quantization.double_quant:
        layout.update(nested_absmax=((-(-groups * n // NESTED_BLOCK),), torch.float32),
                      nested_offset=((1,), torch.float32), code=((256,), torch.float32))
    return layout


def take_quantized(
    state: dict[str, torch.Tensor], key: str, quantization: Quantization, shape: tuple[int, int], source: object = "checkpoint"
) -> QuantizedWeight | None:
    """Pop the tensors of the weight `key`, W [K, N] = shape, from a quantized checkpoint's `state`
    and rebuild it; None when the checkpoint stores none under `key`. ValueError naming the key
    at fault (a missing, unexpected, misshapen or mistyped tensor)."""
    prefix = key + QUANTIZED_KEY
    found = {name[len(prefix):]: name for name in state if name.startswith(prefix) and name[len(prefix):] in _FIELDS}
    if not found:
        return None
    k, n = shape
    layout = _stored_layout(quantization, k, n)
    problems = [f"{prefix}{name} is missing" for name in layout if name not in found]
    problems += [f"{found[name]} does not belong to {quantization.describe()}" for name in found if name not in layout]
    for name, (expected_shape, dtype) in layout.items():
        tensor = state.get(prefix + name)
        if tensor is not None and (tuple(tensor.shape) != expected_shape or tensor.dtype != dtype):
            problems.append(f"{prefix}{name} is {tuple(tensor.shape)} {tensor.dtype}, expected {expected_shape} {dtype}")
    if problems:
        raise ValueError(f"{source} does not hold {key} as {quantization.describe()} of a [{k}, {n}] weight: " + "; ".join(problems))
    tensors = {name: state.pop(found[name]) for name in layout}
    oriented = {name: (t.T if t.dim() == 2 else t) for name, t in tensors.items()}
    group = k if quantization.format == "int8" else quantization.group_size
    return QuantizedWeight(quantization.format, oriented.pop("data"), oriented.pop("scale"), group, **oriented)


def weight_bytes(weights: GPT2Weights) -> dict[str, int]:
    """The bytes of a model's matmul weights (the five products quantize_weights quantizes), as
    `quantized` (QuantizedWeight.nbytes, a tied head counted once) and `float` (those still float)."""
    products = [getattr(layer, name) for layer in weights.layers for name in PRODUCT_WEIGHTS] + [weights.lm_head]
    quantized = sum(w.nbytes for w in products if is_quantized(w))
    floating = sum(w.nbytes for w in products if not is_quantized(w))
    return {"quantized": quantized, "float": floating}


def load_quantized(
    config: GPT2Config, base: dict[str, torch.Tensor], rest: dict[str, torch.Tensor], quantization: Quantization,
    source: object = "checkpoint",
) -> tuple[dict[str, QuantizedWeight], QuantizedWeight | None]:
    """A quantized checkpoint's weights, popped from its base and head tensors (split_state_dict):
    (every quantized base weight by key, the untied LM head or None when it is tied to wte).
    ValueError naming a product the checkpoint does not hold quantized."""
    c, inner, vocab = config.n_embd, config.inner_size, config.vocab_size
    shapes = {"attn.c_attn.weight": (c, 3 * c), "attn.c_proj.weight": (c, c), "mlp.c_fc.weight": (c, inner),
              "mlp.c_proj.weight": (inner, c)}
    wanted = {f"h.{i}.{key}": shape for i in range(config.n_layer) for key, shape in shapes.items()}
    head = take_quantized(rest, "lm_head.weight", quantization, (c, vocab), source)
    if head is None or config.tie_word_embeddings:
        wanted["wte.weight"] = (c, vocab)
    found = {key: take_quantized(base, key, quantization, shape, source) for key, shape in wanted.items()}
    missing = [key for key, weight in found.items() if weight is None]
    if missing:
        raise ValueError(f"{source} is saved as {quantization.describe()}, but holds no quantized "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return found, None if config.tie_word_embeddings else head
