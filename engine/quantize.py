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

from tritongpt2.kernels.quantized_weight import (
    FORMATS,
    INT4_GROUP_SIZES,
    NESTED_BLOCK,
    NF4_BLOCK,
    NF4_CODE,
    QuantizedWeight,
    dynamic_code,
)

from .config import GPT2Config
from .weights import GPT2Weights

QUANTIZED_LAYER_WEIGHTS = ("attn_weight", "attn_proj_weight", "fc_weight", "mlp_proj_weight")
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
                quantization, group_size=group_size or quantization.group_size, double_quant=double_quant)
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


def _nearest(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The index of the code value (sorted ascending) nearest each value, as uint8."""
    midpoints = (code[1:] + code[:-1]) / 2
    return torch.searchsorted(midpoints, values.contiguous()).to(torch.uint8)


def _pack(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] of 4-bit values -> [N, K // 2] bytes, even k in the high nibble."""
    return (q[:, 0::2] << 4) | q[:, 1::2]


def quantize_matrix(weight: torch.Tensor, quantization: Quantization) -> QuantizedWeight:
    """W [K, N] (any float dtype and strides) in `quantization`'s format."""
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
        replace(layer, **{name: quantize_matrix(getattr(layer, name), quantization) for name in QUANTIZED_LAYER_WEIGHTS})
        for layer in weights.layers
    ]
    head = quantize_matrix(weights.lm_head.T, quantization)
    tied = weights.lm_head is weights.wte
    return replace(weights, layers=layers, lm_head=head, wte=head if tied else weights.wte)

