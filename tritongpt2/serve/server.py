"""Running the app on uvicorn: in the foreground (`tritongpt2 serve`), or in a thread on a free port
of 127.0.0.1 (tests and the load benchmark)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import uvicorn
from fastapi import FastAPI

from tritongpt2.engine.checkpoint import resolve_model_dir
from tritongpt2.engine.engine import Engine
from tritongpt2.engine.options import EngineOptions
from tritongpt2.engine.tokenizer import GPT2Tokenizer

from .app import ServeSettings, build_app
from .scheduler import Scheduler

Built = TypeVar("Built")


@dataclass(frozen=True)
class SchedulerOptions:
    pooling: str = "mean"
    normalize: bool = False
    max_queue: int = 256
    embed_token_budget: int = 4096


def app_for_model(model: str | Path, options: EngineOptions, scheduling: SchedulerOptions, settings: ServeSettings | None = None) -> FastAPI:
    """The app over a checkpoint folder (or hub id) and its tokenizer. The engine and the scheduler
    are built on a thread that then ends, so that the scheduler's thread is the only one left that
    has run torch's parallel ops: each thread that runs one keeps an OpenMP team of its own until it
    exits, and once the teams' threads outnumber the CPUs libgomp cuts every team's spin-wait short,
    its threads sleeping and waking between ops. Built on the caller's thread (which then serves
    HTTP), the engine's 16-row gpt2 decode step took 67 ms instead of 54 on a 2-core Xeon, 1.6 of
    its 2 cores busy."""
    folder = resolve_model_dir(model)
    tokenizer = GPT2Tokenizer.from_pretrained(folder)
    settings = settings or ServeSettings(model_name=Path(folder).name)
    return _built_on_own_thread(lambda: app_for_engine(Engine.from_pretrained(folder, options), tokenizer, scheduling, settings))


def _built_on_own_thread(build: Callable[[], Built]) -> Built:
    """build() run on a new thread, which has ended when this returns (its error raised here)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, build()))
        except BaseException as error:  # noqa: BLE001 - raised again on the caller's thread
            outcome.append((False, error))

    thread = threading.Thread(target=run, name="tritongpt2-load", daemon=True)
    thread.start()
    thread.join()
    built, value = outcome[0]
    if not built:
        raise value
    return value


def app_for_engine(engine: Engine, tokenizer: GPT2Tokenizer, scheduling: SchedulerOptions, settings: ServeSettings) -> FastAPI:
    scheduler = Scheduler(engine, tokenizer, pooling=scheduling.pooling, normalize=scheduling.normalize,
                          max_queue=scheduling.max_queue, embed_token_budget=scheduling.embed_token_budget)
    return build_app(scheduler, settings)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, api_key: str | None) -> None:
    if api_key is None and not is_loopback(host):
        warnings.warn(f"serving on {host}, beyond localhost, without --api-key: anyone who can reach this port can use "
                      "the model", stacklevel=2)


def serve_forever(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


class ServerThread:
    """The app on a free port of 127.0.0.1, in a thread: `with ServerThread(app) as server:` then
    `server.url`. Leaving the block stops it (and the engine's thread) within `timeout` seconds."""

    def __init__(self, app: FastAPI, timeout: float = 60.0) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Connections accepted from a socket handed to uvicorn keep Nagle's algorithm unless the
        # listener turns it off: each small write (an SSE chunk, a short response) then waits ~40 ms.
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.timeout = timeout
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout)
        self.socket.close()
