"""The base model's weights, as tensors the kernels take: a matmul weight is [in, out], as Conv1D holds
it, stored either so or as [out, in] rows seen through a transpose (the torch backend's layout)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tritongpt2.kernels.backend import IN_OUT, OUT_IN, PACKED
from tritongpt2.kernels.cpu_matmul import packed_if_packable
from tritongpt2.kernels.packed_weight import PackedWeight
from tritongpt2.kernels.quantized_weight import QuantizedWeight, is_quantized

from .config import GPT2Config

PREFIX = "transformer."
# Buffers of old checkpoints (the causal mask), not weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
LAYER_KEYS = {
    "ln_1_weight": "ln_1.weight",
    "ln_1_bias": "ln_1.bias",
    "attn_weight": "attn.c_attn.weight",
    "attn_bias": "attn.c_attn.bias",
    "attn_proj_weight": "attn.c_proj.weight",
    "attn_proj_bias": "attn.c_proj.bias",
    "ln_2_weight": "ln_2.weight",
    "ln_2_bias": "ln_2.bias",
    "fc_weight": "mlp.c_fc.weight",
    "fc_bias": "mlp.c_fc.bias",
    "mlp_proj_weight": "mlp.c_proj.weight",
    "mlp_proj_bias": "mlp.c_proj.bias",
}
PRODUCT_WEIGHTS = ("attn_weight", "attn_proj_weight", "fc_weight", "mlp_proj_weight")


@dataclass
class LayerWeights:
    ln_1_weight: torch.Tensor
    ln_1_bias: torch.Tensor
    attn_weight: torch.Tensor  # [C, 3C]
    attn_bias: torch.Tensor
    attn_proj_weight: torch.Tensor  # [C, C]
    attn_proj_bias: torch.Tensor
    ln_2_weight: torch.Tensor
    ln_2_bias: torch.Tensor
    fc_weight: torch.Tensor  # [C, n_inner]
    fc_bias: torch.Tensor
    mlp_proj_weight: torch.Tensor  # [n_inner, C]
    mlp_proj_bias: torch.Tensor


@dataclass
class GPT2Weights:
    wte: torch.Tensor  # [vocab, C]
    wpe: torch.Tensor  # [n_positions, C]
    layers: list[LayerWeights]
    ln_f_weight: torch.Tensor
    ln_f_bias: torch.Tensor
    lm_head: torch.Tensor  # [vocab, C]: wte itself when tied
    # Quantized (engine/quantize.py), the matmul weights are QuantizedWeights and the LM head is one
    # in the product's orientation [C, vocab]; a tied wte is that same object.

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (wpe is never quantized)."""
        return self.wpe.dtype

    @property
    def device(self) -> torch.device:
        return self.wpe.device

    @property
    def quantization(self) -> str | None:
        """The format of the quantized weights, None for float weights."""
        return self.lm_head.format if is_quantized(self.lm_head) else None

    @property
    def head_weight(self) -> torch.Tensor | QuantizedWeight:
        """The LM head as the product's weight [C, vocab]."""
        return self.lm_head if is_quantized(self.lm_head) else self.lm_head.T


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every base-model key (without the transformer. prefix) and its shape."""
    c, inner = config.n_embd, config.inner_size
    shapes = {"wte.weight": (config.vocab_size, c), "wpe.weight": (config.n_positions, c), "ln_f.weight": (c,), "ln_f.bias": (c,)}
    per_layer = {
        "ln_1.weight": (c,), "ln_1.bias": (c,), "attn.c_attn.weight": (c, 3 * c), "attn.c_attn.bias": (3 * c,),
        "attn.c_proj.weight": (c, c), "attn.c_proj.bias": (c,), "ln_2.weight": (c,), "ln_2.bias": (c,),
        "mlp.c_fc.weight": (c, inner), "mlp.c_fc.bias": (inner,), "mlp.c_proj.weight": (inner, c), "mlp.c_proj.bias": (c,),
    }
    for i in range(config.n_layer):
        shapes.update({f"h.{i}.{key}": shape for key, shape in per_layer.items()})
    return shapes


def split_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base-model tensors without the transformer. prefix, everything else: the heads' tensors).
    The causal-mask buffers of old checkpoints are dropped."""
    base, rest = {}, {}
    for key, tensor in state.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if key.startswith(PREFIX):
            base[key[len(PREFIX):]] = tensor
        elif key.startswith(("wte.", "wpe.", "h.", "ln_f.")):
            base[key] = tensor
        else:
            rest[key] = tensor
    return base, rest


def weights_from_state_dict(
    config: GPT2Config,
    base: dict[str, torch.Tensor],
    lm_head: torch.Tensor | QuantizedWeight | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    source: object = "checkpoint",
    quantized: dict[str, QuantizedWeight] | None = None,
    layout: str = IN_OUT,
) -> GPT2Weights:
    """Check the base tensors against the config (ValueError naming `source` and every missing,
    unexpected or misshapen key) and gather them, cast to `dtype` and moved to `device`. Tensors
    already in that dtype, on that device and contiguous are used as they are, not copied, but for
    the layers' float matmul weights under layout OUT_IN (kernels/backend.py), which are copied into
    [out, in] rows, and under PACKED, which are packed for oneDNN (PackedWeights) where
    cpu_matmul.can_pack says so for their dtype and device, else copied as under OUT_IN.
    `quantized`: base weights loaded quantized, by key (wte.weight's in the LM head's orientation
    [C, vocab]), used in place of float ones; `lm_head` may be one too."""
    if layout not in (IN_OUT, OUT_IN, PACKED):
        raise ValueError(f"layout={layout!r} must be {IN_OUT!r}, {OUT_IN!r} or {PACKED!r}")
    expected = expected_shapes(config)
    quantized = quantized or {}
    shapes = {k: tuple(t.shape) for k, t in base.items()}
    shapes.update({k: _checkpoint_shape(k, q) for k, q in quantized.items()})
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k} {shapes[k]} != {expected[k]}" for k in expected if k in shapes and shapes[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if wrong:
        problems.append(f"shapes that do not match the config: {'; '.join(wrong)}")
    if lm_head is not None and _checkpoint_shape("lm_head.weight", lm_head) != expected["wte.weight"]:
        problems.append(f"lm_head.weight has shape {_checkpoint_shape('lm_head.weight', lm_head)}, expected {expected['wte.weight']}")
    if problems:
        raise ValueError(f"{source} does not fit its config: " + " | ".join(problems))
    floating = sorted(k for k in base if not base[k].is_floating_point())
    if floating:
        raise ValueError(f"{source} holds non-float tensors: {', '.join(floating[:5])}")

    dtype = dtype or base["wte.weight" if "wte.weight" in base else "wpe.weight"].dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")

    def take(key: str, product: bool = False) -> torch.Tensor | PackedWeight | QuantizedWeight:
        if key in quantized:
            return quantized[key].to(device) if device is not None else quantized[key]
        if product and layout in (OUT_IN, PACKED):
            stored = base[key]
            rows = torch.empty(stored.shape[::-1], dtype=dtype, device=device if device is not None else stored.device)
            rows.T.copy_(stored)
            return packed_if_packable(rows.T) if layout == PACKED else rows.T
        return base[key].to(device=device, dtype=dtype).contiguous()

    layers = [
        LayerWeights(**{name: take(f"h.{i}.{key}", name in PRODUCT_WEIGHTS) for name, key in LAYER_KEYS.items()})
        for i in range(config.n_layer)
    ]
    wte = take("wte.weight")
    tied = lm_head is None or config.tie_word_embeddings
    if tied:
        head = wte
    elif is_quantized(lm_head):
        head = lm_head.to(device) if device is not None else lm_head
    else:
        head = lm_head.to(device=device, dtype=dtype).contiguous()
    return GPT2Weights(wte, take("wpe.weight"), layers, take("ln_f.weight"), take("ln_f.bias"), head)


def _checkpoint_shape(key: str, weight: torch.Tensor | QuantizedWeight) -> tuple[int, ...]:
    """A weight's shape as the checkpoint's float key has it: a quantized embedding or LM head is
    stored as the product's W [C, vocab], the key is [vocab, C]."""
    if not is_quantized(weight):
        return tuple(weight.shape)
    return weight.shape[::-1] if key in ("wte.weight", "lm_head.weight") else weight.shape


def shared_weights(model: torch.nn.Module, config: GPT2Config, *, layout: str = IN_OUT) -> GPT2Weights:
    """A loaded transformers GPT-2 model's own tensors (any of its classes), not copies: an engine
    over them reads the model's memory, so an in-place update of the model is seen at once. With
    layout OUT_IN the layers' matmul weights are copies instead, in [out, in] rows, which that
    update does not reach (the benchmark's engine, built as from_pretrained builds it), and with
    PACKED packed copies."""
    base, rest = split_state_dict(model.state_dict())
    return weights_from_state_dict(config, base, rest.get("lm_head.weight"), source=type(model).__name__, layout=layout)
