"""Writing a checkpoint folder transformers' way: config.json and model.safetensors.

Float weights are written under transformers' keys, so transformers loads the folder. Quantized
ones are written as their tensors (engine/quantize.py: `key.q<field>`, N-major) with a
quantization_config in config.json, so that tritongpt2 loads them back as they are, into
model.tritongpt2-quantized.safetensors: transformers finds no weights file there and refuses the
folder, where a model.safetensors would load with its matmul weights freshly initialised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tritongpt2.kernels.packed_weight import dense
from tritongpt2.kernels.quantized_weight import is_quantized

from .checkpoint import QUANTIZED_SAFETENSORS, SAFETENSORS
from .config import GPT2Config
from .quantize import quantization_config, quantization_of, quantized_tensors
from .weights import LAYER_KEYS, GPT2Weights


def weights_state_dict(weights: GPT2Weights, prefix: str = "") -> dict[str, torch.Tensor]:
    """The base model's tensors under the checkpoint's keys (`prefix` before the base keys, as
    transformers' head classes save them under transformer.), and an untied LM head's as
    lm_head.weight; a tied one is wte and is written once, as transformers writes it."""
    named = {"wte.weight": weights.wte, "wpe.weight": weights.wpe, "ln_f.weight": weights.ln_f_weight,
             "ln_f.bias": weights.ln_f_bias}
    for i, layer in enumerate(weights.layers):
        named.update({f"h.{i}.{key}": dense(getattr(layer, name)) for name, key in LAYER_KEYS.items()})
    state = {}
    for key, weight in named.items():
        state.update(quantized_tensors(prefix + key, weight) if is_quantized(weight) else {prefix + key: weight})
    head = weights.lm_head
    if head is not weights.wte:
        state.update(quantized_tensors("lm_head.weight", head) if is_quantized(head) else {"lm_head.weight": head})
    return state


def save_checkpoint(
    folder: str | Path, config: GPT2Config, weights: GPT2Weights, heads: dict[str, torch.Tensor], architecture: str
) -> Path:
    """Write config.json (with the quantization_config of quantized weights) and model.safetensors
    (model.tritongpt2-quantized.safetensors when quantized; the base model under transformer. unless `architecture` is GPT2Model, then the heads' tensors)
    into `folder`, created if need be; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; save_pretrained writes a checkpoint folder")
    folder.mkdir(parents=True, exist_ok=True)
    values = config.to_dict()
    values.pop("quantization_config", None)
    quantization = quantization_of(weights)
    if quantization is not None:
        values["quantization_config"] = quantization_config(quantization)
    values.update(architectures=[architecture], dtype=str(weights.dtype).removeprefix("torch."))
    prefix = "" if architecture == "GPT2Model" else "transformer."
    state = {**weights_state_dict(weights, prefix), **heads}
    name = SAFETENSORS if quantization is None else QUANTIZED_SAFETENSORS
    for stale in {SAFETENSORS, QUANTIZED_SAFETENSORS} - {name}:
        (folder / stale).unlink(missing_ok=True)
    save_file({key: tensor.detach().contiguous() for key, tensor in state.items()}, str(folder / name),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    return folder
