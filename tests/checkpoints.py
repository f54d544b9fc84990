"""Random-weight GPT-2 checkpoints saved with transformers, for parity tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# Small, odd shapes: n_embd 80 with 5 heads of 16, n_inner not 4 * n_embd. initializer_range 0.2 so
# that greedy decoding depends on the prompt, the positions and the cache (0.02 makes it blind).
SMALL = dict(vocab_size=300, n_positions=64, n_embd=80, n_layer=2, n_head=5, n_inner=176, initializer_range=0.2,
             bos_token_id=0, eos_token_id=299, pad_token_id=None)


def hf_config(**overrides):
    from transformers import GPT2Config

    return GPT2Config(**{**SMALL, **overrides})


def save_model(folder: Path, model_class: str = "GPT2LMHeadModel", seed: int = 0, **overrides) -> tuple[Path, torch.nn.Module]:
    """Build a random-weight transformers model, save it with save_pretrained (safetensors), and
    return the folder and the model in eval mode, with the eager attention path."""
    import transformers

    torch.manual_seed(seed)
    config = hf_config(**overrides)
    config._attn_implementation = "eager"
    model = getattr(transformers, model_class)(config).eval()
    model.save_pretrained(folder)
    return folder, model


def in_float64(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of a transformers model: the oracle the tests measure errors against."""
    return copy.deepcopy(model).double()
