"""CTranslate2 as a CPU baseline (float32 and int8), where the ctranslate2 package is installed.

The random-weight model is converted in-process through a temporary folder; its vocabulary is made up
(ids are all the benchmark uses), with <|endoftext|> as the last id, as in GPT-2. CTranslate2 has no
hidden-state output, so its embed figure includes the LM head, which tritongpt2's does not: its
embed ratios flatter tritongpt2, and its embed records say so in a note.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .runners import Runner

COMPUTE_TYPES = ("float32", "int8")


def ctranslate2_installed() -> bool:
    return importlib.util.find_spec("ctranslate2") is not None


class CTranslate2Runner(Runner):
    embed_note = "includes the LM head: CTranslate2 gives no hidden states"

    def __init__(self, model: torch.nn.Module, compute_type: str) -> None:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter

        if compute_type not in COMPUTE_TYPES:
            raise ValueError(f"compute_type {compute_type!r} is not one of {COMPUTE_TYPES}")
        if model.dtype != torch.float32:
            raise ValueError(f"the CTranslate2 baseline converts a float32 model, got {model.dtype}")
        self.name = f"ctranslate2-{compute_type}"
        vocab_size = model.config.vocab_size
        self.tokens = [f"t{i}" for i in range(vocab_size - 1)] + ["<|endoftext|>"]
        self.token_ids = {token: i for i, token in enumerate(self.tokens)}
        with tempfile.TemporaryDirectory() as folder:
            source, converted = Path(folder, "transformers"), Path(folder, "ctranslate2")
            model.save_pretrained(source)
            (source / "vocab.json").write_text(json.dumps(self.token_ids))
            (source / "merges.txt").write_text("#version: 0.2\n")
            TransformersConverter(str(source)).convert(str(converted), quantization=compute_type)
            self.weight_bytes = (converted / "model.bin").stat().st_size
            self.generator = ctranslate2.Generator(str(converted), device="cpu", compute_type=compute_type,
                                                   intra_threads=torch.get_num_threads())

    def embed(self, ids: torch.Tensor) -> object:
        return self.generator.forward_batch(ids.tolist())

    def prefill(self, ids: torch.Tensor) -> object:
        return torch.from_numpy(np.asarray(self.generator.forward_batch(ids.tolist()))[:, -1])

    def _generate(self, ids: torch.Tensor, new_tokens: int, callback: Callable[[Any], bool] | None = None) -> list:
        prompts = [[self.tokens[i] for i in row] for row in ids.tolist()]
        return self.generator.generate_batch(prompts, max_length=new_tokens, min_length=new_tokens, callback=callback,
                                             include_prompt_in_result=False, sampling_topk=1)

    def decode_ms(self, ids: torch.Tensor, context: int, device: torch.device, warmup: int, repeats: int) -> float:
        """CTranslate2 has no one-step call: the median interval between its per-token callbacks
        (the first comes after the prefill), warm-up steps excluded."""
        stamps = []

        def on_token(step: Any) -> bool:
            if step.batch_id == 0:
                stamps.append(time.perf_counter())
            return False  # True would stop that row

        self._generate(ids, 1 + warmup + repeats, callback=on_token)
        return statistics.median((later - earlier) * 1e3 for earlier, later in zip(stamps[warmup:], stamps[warmup + 1:]))

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return torch.tensor([[self.token_ids[t] for t in result.sequences[0]] for result in self._generate(ids, new_tokens)])
