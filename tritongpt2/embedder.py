"""Embedder: text in, one vector per text out, for apps. Pooled final hidden states of GPT-2."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tritongpt2.engine.checkpoint import load_checkpoint
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.graphs import bucket
from tritongpt2.engine.kv_cache import StaticKVCache
from tritongpt2.engine.options import EngineOptions
from tritongpt2.engine.tokenizer import GPT2Tokenizer

POOLINGS = ("mean", "last", "first")
SMALLEST_LENGTH = 16


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, C] hidden states of right-padded rows -> [B, C]: the mean over real tokens, the last
    real token, or the first token."""
    if pooling == "first":
        return hidden[:, 0]
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(-1) - 1]
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


class Embedder:
    """`embedder(["text", ...])` returns an [N, n_embd] float32 numpy array; `embedder("text")` a
    [1, n_embd] one. Any iterable of strings (a generator too) is taken, read once into a list.

    Texts are tokenized, sorted by length and run in batches of up to max_batch texts, each padded
    to a power-of-two length bucket, so on a GPU each bucket replays one captured graph. A text
    longer than the model's context (max_seq tokens) is embedded from its first max_seq tokens, with
    a warning. Calls from several threads are serialised on one lock (the engine has one KV cache)."""

    def __init__(self, engine: Engine, tokenizer: GPT2Tokenizer, *, pooling: str = "mean", normalize: bool = False) -> None:
        _check_pooling(pooling)
        self.engine, self.tokenizer = engine, tokenizer
        self.pooling, self.normalize = pooling, normalize
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        pooling: str = "mean",
        normalize: bool = False,
        *,
        options: EngineOptions | None = None,
        **option_values: Any,
    ) -> Embedder:
        """A checkpoint folder (or hub id) with its tokenizer. Engine options as EngineOptions fields
        (dtype=, device=, backend=, max_batch=, max_seq=, cuda_graphs=, quantization=, group_size=,
        double_quant=) or an EngineOptions."""
        _check_pooling(pooling)
        options = EngineOptions.of(options, **option_values)  # bad options are refused before anything is read
        checkpoint = load_checkpoint(name_or_path)
        engine = Engine.from_checkpoint(checkpoint, options)
        return cls(engine, GPT2Tokenizer.from_pretrained(checkpoint.folder), pooling=pooling, normalize=normalize)

    @property
    def dimension(self) -> int:
        return self.engine.config.n_embd

    def __call__(self, texts: Iterable[str] | str) -> np.ndarray:
        texts = _texts(texts)
        max_seq = self.engine.cache.max_seq
        encoded = [self.tokenizer.encode(text) for text in texts]
        for text, ids in zip(texts, encoded):
            if not ids:
                raise ValueError(f"text {text!r} has no tokens")
        longer = {i: len(ids) for i, ids in enumerate(encoded) if len(ids) > max_seq}
        if longer:
            shown = ", ".join(f"texts[{i}] has {count}" for i, count in list(longer.items())[:3])
            warnings.warn(
                f"{len(longer)} text(s) longer than the model's context of max_seq={max_seq} tokens ({shown}): each is "
                f"embedded from its first {max_seq} tokens",
                stacklevel=2,
            )
            encoded = [ids[:max_seq] for ids in encoded]
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        with self._lock:
            for start in range(0, len(order), self.engine.cache.max_batch):
                chosen = order[start:start + self.engine.cache.max_batch]
                out[chosen] = self.embed_tokens([encoded[i] for i in chosen])
        return out

    def embed_tokens(self, batch: list[list[int]], cache: StaticKVCache | None = None) -> np.ndarray:
        """[len(batch), n_embd] for lists of token ids (each 1 to max_seq long), run as one prefill
        padded to the longest one's length bucket; on the engine's own cache unless `cache` is given
        (one from `Engine.new_cache`). Not serialised: callers hold their own lock."""
        length = bucket(max(len(ids) for ids in batch), self.engine.cache.max_seq, SMALLEST_LENGTH)
        ids = torch.zeros(len(batch), length, dtype=torch.int64)
        mask = torch.zeros(len(batch), length, dtype=torch.int64)
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        ids, mask = ids.to(self.engine.device), mask.to(self.engine.device)
        hidden = self.engine.prefill(ids, mask, logits=None, hidden=True, cache=cache).hidden_states
        vectors = pool(hidden.float(), mask, self.pooling)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors.cpu().numpy()


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} must be one of {', '.join(POOLINGS)}")


def _texts(texts: Any) -> list[str]:
    """texts as a list of valid Unicode strings; ValueError naming the first that is not one."""
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise ValueError(f"texts must be a str or an iterable of str, got {type(texts).__name__}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] is of type {type(text).__name__}, not str")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"texts[{i}] holds a lone surrogate {text[error.start]!r} at character {error.start}: not valid Unicode text"
            ) from None
    return texts
