"""CTranslate2 as a CPU baseline (float32 and int8), where the ctranslate2 package is installed.

The random-weight model is saved to a temporary folder and converted there by the runner's process;
its vocabulary is made up (ids are all the benchmark uses), with <|endoftext|> as the last id, as in
GPT-2. CTranslate2 has no hidden-state output, so its embed figure includes the LM head, which
tritongpt2's does not: its embed ratios flatter tritongpt2, and its embed records say so in a note.

Each runner's CTranslate2 lives in a process of its own, which times its calls itself (the same
median of the same repeats). In one process with torch, each slowed the other down once it had run,
for as long as the process lived: on the 2-core EPYC, tritongpt2's int8 decode step went from 13-15 ms
to 19-21 ms after CTranslate2 had decoded once, and CTranslate2's own from 14 to 16-18 ms after
tritongpt2's (CTranslate2 brings its own copy of the OpenMP runtime). Apart, neither sees the other,
as two users' programs would not.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import statistics
import tempfile
import time
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .quiet import quiet_transformers
from .runners import Runner
from .timing import median_ms

COMPUTE_TYPES = ("float32", "int8")
START_TIMEOUT_S = 300


def ctranslate2_installed() -> bool:
    return importlib.util.find_spec("ctranslate2") is not None


class CTranslate2Runner(Runner):
    embed_note = "includes the LM head: CTranslate2 gives no hidden states"

    def __init__(self, model: torch.nn.Module, compute_type: str) -> None:
        if compute_type not in COMPUTE_TYPES:
            raise ValueError(f"compute_type {compute_type!r} is not one of {COMPUTE_TYPES}")
        if model.dtype != torch.float32:
            raise ValueError(f"the CTranslate2 baseline converts a float32 model, got {model.dtype}")
        self.name = f"ctranslate2-{compute_type}"
        vocab_size = model.config.vocab_size
        tokens = [f"t{i}" for i in range(vocab_size - 1)] + ["<|endoftext|>"]
        with tempfile.TemporaryDirectory() as folder:
            source = Path(folder, "transformers")
            model.save_pretrained(source)
            (source / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
            (source / "merges.txt").write_text("#version: 0.2\n")
            context = multiprocessing.get_context("spawn")
            self._connection, child_end = context.Pipe()
            process = context.Process(target=_serve, args=(child_end, folder, compute_type, torch.get_num_threads(), tokens),
                                      name=self.name, daemon=True)
            process.start()
            child_end.close()
            weakref.finalize(self, _stop, process, self._connection)
            if not self._connection.poll(START_TIMEOUT_S):
                raise RuntimeError(f"{self.name}: its process did not load the model within {START_TIMEOUT_S} s")
            self.weight_bytes = self._reply()  # converted and loaded: the folder may go

    def _reply(self) -> Any:
        try:
            status, value = self._connection.recv()
        except EOFError:
            raise RuntimeError(f"{self.name}: its process ended") from None
        if status == "error":
            raise RuntimeError(f"{self.name}: {value}")
        return value

    def _call(self, name: str, *args: Any) -> Any:
        self._connection.send((name, args))
        return self._reply()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The logits [B, T, V] (CTranslate2 gives no hidden states)."""
        return torch.from_numpy(self._call("forward", ids.tolist(), False))

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._call("forward", ids.tolist(), True))

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return torch.tensor(self._call("generate", ids.tolist(), new_tokens))

    def embed_ms(self, ids: torch.Tensor, device: torch.device, warmup: int, repeats: int) -> float:
        return self._call("forward_ms", ids.tolist(), False, warmup, repeats)

    def prefill_ms(self, ids: torch.Tensor, device: torch.device, warmup: int, repeats: int) -> float:
        return self._call("forward_ms", ids.tolist(), True, warmup, repeats)

    def decode_ms(self, ids: torch.Tensor, context: int, device: torch.device, warmup: int, repeats: int) -> float:
        return self._call("decode_ms", ids.tolist(), warmup, repeats)

    def generate_ms(self, ids: torch.Tensor, new_tokens: int, device: torch.device, warmup: int, repeats: int) -> float:
        return self._call("generate_ms", ids.tolist(), new_tokens, warmup, repeats)


def _stop(process: multiprocessing.Process, connection: Connection) -> None:
    try:
        connection.send(None)
    except OSError:
        pass
    process.join(10)
    if process.is_alive():
        process.kill()


class _Generator:
    """The child's side: the model converted and loaded into one ctranslate2.Generator, each call as
    the runner's method of that name."""

    def __init__(self, folder: str, compute_type: str, threads: int, tokens: list[str]) -> None:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter

        converted = Path(folder, "ctranslate2")
        with quiet_transformers():  # the converter loads the model with transformers, as the parent would quietly
            TransformersConverter(str(Path(folder, "transformers"))).convert(str(converted), quantization=compute_type)
        self.weight_bytes = (converted / "model.bin").stat().st_size
        self.generator = ctranslate2.Generator(str(converted), device="cpu", compute_type=compute_type, intra_threads=threads)
        self.tokens = tokens
        self.token_ids = {token: i for i, token in enumerate(tokens)}

    def _forward(self, ids: list[list[int]], last: bool) -> object:
        """The logits [B, T, V] as CTranslate2 returns them, or a view of the last position's [B, V]."""
        logits = self.generator.forward_batch(ids)
        return np.asarray(logits)[:, -1] if last else logits

    def forward(self, ids: list[list[int]], last: bool) -> np.ndarray:
        return np.array(self._forward(ids, last))

    def forward_ms(self, ids: list[list[int]], last: bool, warmup: int, repeats: int) -> float:
        return median_ms(lambda: self._forward(ids, last), torch.device("cpu"), warmup=warmup, repeats=repeats)

    def _generate(self, ids: list[list[int]], new_tokens: int, callback: Callable[[Any], bool] | None = None) -> list:
        prompts = [[self.tokens[i] for i in row] for row in ids]
        return self.generator.generate_batch(prompts, max_length=new_tokens, min_length=new_tokens, callback=callback,
                                             include_prompt_in_result=False, sampling_topk=1)

    def generate(self, ids: list[list[int]], new_tokens: int) -> list[list[int]]:
        return [[self.token_ids[t] for t in result.sequences[0]] for result in self._generate(ids, new_tokens)]

    def generate_ms(self, ids: list[list[int]], new_tokens: int, warmup: int, repeats: int) -> float:
        return median_ms(lambda: self._generate(ids, new_tokens), torch.device("cpu"), warmup=warmup, repeats=repeats)

    def decode_ms(self, ids: list[list[int]], warmup: int, repeats: int) -> float:
        """CTranslate2 has no one-step call: the median interval between its per-token callbacks
        (the first comes after the prefill), warm-up steps excluded."""
        stamps = []

        def on_token(step: Any) -> bool:
            if step.batch_id == 0:
                stamps.append(time.perf_counter())
            return False  # True would stop that row

        self._generate(ids, 1 + warmup + repeats, callback=on_token)
        return statistics.median((later - earlier) * 1e3 for earlier, later in zip(stamps[warmup:], stamps[warmup + 1:]))


def _serve(connection: Connection, folder: str, compute_type: str, threads: int, tokens: list[str]) -> None:
    """The child process: convert and load the model, then answer (method, args) requests until None."""
    torch.set_num_threads(1)  # the child's torch only times: its threads would sit beside CTranslate2's
    try:
        generator = _Generator(folder, compute_type, threads, tokens)
    except Exception as error:  # noqa: BLE001 - sent to the parent, which raises it
        connection.send(("error", f"converting and loading the model failed: {type(error).__name__}: {error}"))
        return
    connection.send(("ready", generator.weight_bytes))
    while (request := connection.recv()) is not None:
        name, args = request
        try:
            connection.send(("ok", getattr(generator, name)(*args)))
        except Exception as error:  # noqa: BLE001
            connection.send(("error", f"{name} failed: {type(error).__name__}: {error}"))
