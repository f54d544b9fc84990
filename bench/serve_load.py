"""Load figures for `tritongpt2 serve` (`tritongpt2 bench --serve`): the server on 127.0.0.1 over a
random-weight model, driven by the official openai client (AsyncOpenAI, one event loop) in a process
of its own, as clients are: in the server's process its parsing of every chunk would also hold the
interpreter lock against the server's threads. On a machine of few cores it still shares them with
the server (bench/NOTES.md measures what that costs).

- generation: N concurrent streams, each a few streamed completions back to back (a fixed prompt
  length and max_tokens, temperature 1, a seed per request); aggregate generated tokens/s counts
  the chunks received (one per token) over the level's whole time, the prompts' prefills included;
- embedding: N concurrent clients, each a closed loop of one-text requests; p50 and p99 latency.

Every level is measured in several rounds, the levels taken in turn within a round, so that a
machine whose load drifts (a shared VM) affects them alike: a figure is the median of its rounds,
and a speed-up the median of the rounds' ratios to the same round's single stream.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import multiprocessing
import os
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .model_shapes import ModelShape

STREAMS = (1, 4, 16, 32)
EMBED_CLIENTS = (1, 16)
SERVED_NAME = "random-gpt2"


@dataclass(frozen=True)
class LoadSettings:
    prompt_tokens: int = 32
    max_tokens: int = 32
    requests_per_stream: int = 3  # per generation level and round
    embed_tokens: int = 16
    embed_requests: int = 32  # per embedding level and round (spread over its clients)
    rounds: int = 3
    max_seq: int = 256


def write_random_checkpoint(shape: ModelShape, folder: Path) -> None:
    """A random-weight gpt2 of the shape (initializer_range 0.2) saved with transformers, and a
    byte-level tokenizer over its vocabulary: the 256 byte symbols, then distinct pairs of them."""
    from tokenizers import pre_tokenizers

    from .suite import build_model

    build_model(shape, torch.float32, torch.device("cpu")).save_pretrained(folder)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pairs = (a + b for a in alphabet for b in alphabet)
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    while len(vocab) < shape.vocab_size - 1:
        vocab.setdefault(next(pairs), len(vocab))
    vocab["<|endoftext|>"] = shape.vocab_size - 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


async def _generation(url: str, streams: int, settings: LoadSettings, vocab: int) -> dict:
    """Every stream runs `requests_per_stream` completions back to back; the rate is every token
    received over the time from the first request to the last token, prefills and ramp included."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    rng = random.Random(streams)
    counted = {"tokens": 0}

    async def loop() -> None:
        for _ in range(settings.requests_per_stream):
            prompt = [rng.randrange(vocab) for _ in range(settings.prompt_tokens)]
            stream = await client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=settings.max_tokens,
                                                     temperature=1.0, seed=rng.randrange(1 << 30), stream=True)
            async for _ in stream:
                counted["tokens"] += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(streams)))
    seconds = time.perf_counter() - start
    await client.close()
    return {"tokens": counted["tokens"], "seconds": seconds, "tokens_per_s": counted["tokens"] / seconds}


async def _embedding(url: str, clients: int, settings: LoadSettings, vocab: int) -> list[float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    rng = random.Random(clients)
    latencies: list[float] = []
    per_client = max(1, settings.embed_requests // clients)

    async def loop() -> None:
        for i in range(per_client + 1):
            ids = [rng.randrange(vocab) for _ in range(settings.embed_tokens)]
            start = time.perf_counter()
            await client.embeddings.create(model=SERVED_NAME, input=[ids])
            if i:  # the first request of each client is a warm-up
                latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(loop() for _ in range(clients)))
    await client.close()
    return latencies


def _client_level(kind: str, url: str, count: int, settings: LoadSettings, vocab: int) -> dict | list[float]:
    """One level of `kind` ("generation" or "embedding") with `count` streams or clients, in the client process."""
    return asyncio.run((_generation if kind == "generation" else _embedding)(url, count, settings, vocab))


def run_serve_load(shape: ModelShape, dtype: torch.dtype, device: torch.device, *, backend: str | None = None,
                   settings: LoadSettings = LoadSettings(), streams: tuple[int, ...] = STREAMS,
                   embed_clients: tuple[int, ...] = EMBED_CLIENTS) -> dict:
    from tritongpt2.engine.options import EngineOptions
    from tritongpt2.serve.app import ServeSettings
    from tritongpt2.serve.server import SchedulerOptions, ServerThread, app_for_model

    from .suite import device_name, versions

    backend = backend or ("triton" if device.type == "cuda" else "torch")
    options = EngineOptions(dtype=dtype, device=device, backend=backend, max_batch=max(streams), max_seq=settings.max_seq)
    with tempfile.TemporaryDirectory() as folder:
        write_random_checkpoint(shape, Path(folder))
        app = app_for_model(folder, options, SchedulerOptions(max_queue=4 * max(streams)), ServeSettings(SERVED_NAME))
        rounds: dict[int, list[dict]] = {n: [] for n in streams}
        latencies: dict[int, list[float]] = {n: [] for n in embed_clients}
        loads: list[float] = []
        spawn = multiprocessing.get_context("spawn")
        with ServerThread(app, timeout=600) as server, ProcessPoolExecutor(1, mp_context=spawn) as client:
            def level(kind: str, count: int, level_settings: LoadSettings = settings) -> dict | list[float]:
                return client.submit(_client_level, kind, server.url, count, level_settings, shape.vocab_size).result()

            level("generation", 1, replace(settings, requests_per_stream=1))  # warm-up
            for _ in range(settings.rounds):
                for n in streams:
                    rounds[n].append(level("generation", n))
                for n in embed_clients:
                    latencies[n] += level("embedding", n)
                loads.append(round(os.getloadavg()[0], 2))
    generation = [_generation_level(n, rounds[n], rounds.get(1)) for n in streams]
    embedding = [_embedding_level(n, latencies[n]) for n in embed_clients]
    return {"device": device_name(device), "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(), "versions": versions(),
            "model": shape.name, "dtype": str(dtype).removeprefix("torch."), "backend": backend,
            "settings": {**asdict(settings), "max_batch": max(streams)}, "generation": generation, "embedding": embedding,
            "load_average_1min_per_round": loads}


def _generation_level(streams: int, rounds: list[dict], single: list[dict] | None) -> dict:
    rates = [r["tokens_per_s"] for r in rounds]
    level = {"streams": streams, "tokens_per_s": round(float(np.median(rates)), 1),
             "tokens_per_s_range": [round(min(rates), 1), round(max(rates), 1)],
             "tokens": sum(r["tokens"] for r in rounds), "seconds": round(sum(r["seconds"] for r in rounds), 1)}
    if single:
        ratios = [r["tokens_per_s"] / one["tokens_per_s"] for r, one in zip(rounds, single)]
        level["speedup_vs_1_stream"] = round(float(np.median(ratios)), 2)
        level["speedup_range"] = [round(min(ratios), 2), round(max(ratios), 2)]
    return level


def _embedding_level(clients: int, latencies: list[float]) -> dict:
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def serve_markdown(document: dict) -> str:
    s = document["settings"]
    lines = [
        f"Device: {document['device']} ({document['cpus']} CPUs, torch intra-op threads: {document.get('threads', '?')}) · {document['date']} · " + ", ".join(f"{k} {v}" for k, v in document["versions"].items()),
        "",
        f"`tritongpt2 serve` under load: {document['model']} with random weights, {document['dtype']}, the "
        f"{document['backend']} backend, --max-batch {s['max_batch']}, through the openai client on 127.0.0.1 "
        "(in a process of its own).",
        "",
        f"Generation: each stream runs {s['requests_per_stream']} streamed completions back to back "
        f"({s['prompt_tokens']}-token prompts, max_tokens {s['max_tokens']}, sampled); tokens/s is every token received "
        f"over the level's whole time, prefills included. {s['rounds']} rounds take the levels in turn: the median "
        "round, with the range in brackets; the speed-up is each round's ratio to the same round's single stream.",
        "",
        "| concurrent streams | generated tokens/s | vs 1 stream | tokens | seconds |",
        "|---|---|---|---|---|",
        *(f"| {g['streams']} | {g['tokens_per_s']} ({g['tokens_per_s_range'][0]}-{g['tokens_per_s_range'][1]}) | "
          f"{_speedup_cell(g)} | {g['tokens']} | {g['seconds']} |" for g in document["generation"]),
        "",
        f"Embedding: each client is a closed loop of one-text requests of {s['embed_tokens']} tokens.",
        "",
        "| concurrent clients | p50 ms | p99 ms | requests |",
        "|---|---|---|---|",
        *(f"| {e['clients']} | {e['p50_ms']} | {e['p99_ms']} | {e['requests']} |" for e in document["embedding"]),
        "",
        "The machine's 1-minute load average after each round (this process and any other): "
        + ", ".join(map(str, document["load_average_1min_per_round"])) + ".",
    ]
    return "\n".join(lines) + "\n"


def _speedup_cell(level: dict) -> str:
    if "speedup_vs_1_stream" not in level:
        return ""
    low, high = level["speedup_range"]
    return f"{level['speedup_vs_1_stream']}x ({low}-{high})"


def serve_results_stem(document: dict) -> str:
    """serve-<device>-<date>, with the model and dtype before the date when they are not the default
    run's (gpt2, float32): runs of another dtype on the same device and day do not overwrite it."""
    from .report import slug

    named = [] if (document["model"], document["dtype"]) == ("gpt2", "float32") else [document["model"], document["dtype"]]
    return "-".join(["serve", slug(document["device"]), *named, document["date"]])


def write_serve_results(document: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stem = serve_results_stem(document)
    written = [folder / f"{stem}.json", folder / f"{stem}.md"]
    written[0].write_text(json.dumps(document, indent=1) + "\n")
    written[1].write_text(serve_markdown(document))
    return written
