"""The OpenAI-compatible HTTP API on FastAPI: /v1/completions, /v1/embeddings, /v1/models,
/health and /metrics, over a Scheduler that owns the engine.

Handlers check and tokenize a request, submit it as a job and await its events on an asyncio
queue fed from the engine's thread. A client that goes away cancels its job, which frees its rows
before the next decode step."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from tritongpt2.engine.generation import SamplingParams

from .metrics import MetricsMiddleware, ServerMetrics
from .scheduler import CompletionJob, EmbeddingJob, Job, QueueFull, Scheduler
from .schemas import CompletionRequest, EmbeddingRequest, RequestError, parse

COMPLETIONS, EMBEDDINGS = "/v1/completions", "/v1/embeddings"


@dataclass(frozen=True)
class ServeSettings:
    """model_name: the id clients give as `model`; api_key: required as a Bearer token on /v1
    routes when set; max_body_bytes: larger request bodies get 413; retry_after_s: the Retry-After
    of a 503 when the queue is full."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1


def build_app(scheduler: Scheduler, settings: ServeSettings) -> FastAPI:
    """The app; its lifespan starts the scheduler's engine thread and stops it."""
    metrics = ServerMetrics()
    metrics.watch(lambda: scheduler.queue_depth, lambda: scheduler.running_rows)
    scheduler.on_tokens = metrics.generated_tokens.inc
    engine = scheduler.engine
    max_seq, vocab = engine.cache.max_seq, engine.config.vocab_size
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="tritongpt2", lifespan=lifespan)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(RequestError)
    async def refused(_: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return await refused(request, RequestError(str(error.detail), status=error.status_code, headers=error.headers))

    @app.exception_handler(Exception)
    async def failed(_: Request, error: Exception) -> JSONResponse:
        return JSONResponse(RequestError(f"internal error: {type(error).__name__}", kind="server_error").body(), status_code=500)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {settings.api_key}".encode()):
            raise RequestError("a valid API key is required: Authorization: Bearer <key>", status=401,
                               kind="authentication_error", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(f"the body of {declared} bytes is larger than the server's limit of {limit}", status=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(f"the body is larger than the server's limit of {limit} bytes", status=413)
        return bytes(body)

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise RequestError(f"model {name!r} is not served here; this server serves {settings.model_name!r}", "model",
                               status=404, code="model_not_found")

    def token_lists(value: Any, field: str) -> list[list[int]]:
        """Each text tokenized, each list of ids checked against the vocabulary and the context."""
        one = isinstance(value, str) or not isinstance(value[0], (str, list))
        items = [value] if one else value
        lists = []
        for i, item in enumerate(items):
            name = field if one else f"{field}[{i}]"
            ids = scheduler.tokenizer.encode(item) if isinstance(item, str) else item
            if not ids:
                raise RequestError(f"{name} has no tokens", field)
            outside = [token for token in ids if not 0 <= token < vocab]
            if outside:
                raise RequestError(f"{name} holds token id {outside[0]}, outside the vocabulary of {vocab} tokens", field)
            if len(ids) > max_seq:
                raise RequestError(f"{name} has {len(ids)} tokens; the model's context is max_seq={max_seq}", field)
            lists.append(ids)
        return lists

    def submit(job: Job, route: str, tokens: int) -> None:
        try:
            scheduler.submit(job)
        except QueueFull as full:
            raise RequestError(f"the server is busy ({full}); retry later", status=503, kind="server_error",
                               code="overloaded", headers={"Retry-After": str(settings.retry_after_s)}) from None
        metrics.prompt_tokens.labels(route).inc(tokens)

    @app.post(COMPLETIONS, dependencies=[Depends(authorize)])
    async def completions(request: Request) -> Response:
        body = parse(CompletionRequest, await read_body(request))
        check_model(body.model)
        prompts = token_lists(body.prompt, "prompt")
        for i, prompt in enumerate(prompts):
            if len(prompt) + body.max_tokens > max_seq:
                raise RequestError(
                    f"prompt{'' if len(prompts) == 1 else f'[{i}]'} of {len(prompt)} tokens plus max_tokens={body.max_tokens} "
                    f"is more than the model's context of max_seq={max_seq} tokens", "max_tokens")
        if body.n > engine.cache.max_batch:
            raise RequestError(f"n={body.n} is more than the server's --max-batch={engine.cache.max_batch} rows", "n")
        temperature = 1.0 if body.temperature is None else body.temperature
        params = SamplingParams(temperature > 0, temperature or 1.0, max(body.top_k or 0, 0), body.top_p or 1.0)
        events, emit = _event_queue()
        job = CompletionJob(prompts, n=body.n, max_tokens=body.max_tokens, params=params, seed=body.seed, stop=body.stop or [],
                            tokenizer=scheduler.tokenizer, device=engine.device, emit=emit)
        submit(job, COMPLETIONS, sum(map(len, prompts)))
        echoed = [scheduler.tokenizer.decode(prompt) if body.echo else "" for prompt in prompts for _ in range(body.n)]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": body.model}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(job, events, head, echoed, include_usage), media_type="text/event-stream")
        texts, reasons = list(echoed), [None] * len(echoed)
        async for event in _events_until_done(job, events, request):
            if event[0] == "token":
                texts[event[1]] += event[2]
                reasons[event[1]] = event[3]
            else:
                usage = event[1]
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(texts, reasons))]
        return JSONResponse({**head, "choices": choices, "usage": usage})

    @app.post(EMBEDDINGS, dependencies=[Depends(authorize)])
    async def embeddings(request: Request) -> Response:
        body = parse(EmbeddingRequest, await read_body(request))
        check_model(body.model)
        inputs = token_lists(body.input, "input")
        events, emit = _event_queue()
        job = EmbeddingJob(inputs, emit, engine.config.n_embd)
        tokens = sum(map(len, inputs))
        submit(job, EMBEDDINGS, tokens)
        async for event in _events_until_done(job, events, request):
            vectors = event[1]
        encode: Callable[[np.ndarray], Any] = (
            (lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode()) if body.encoding_format == "base64"
            else (lambda v: v.tolist()))
        data = [{"object": "embedding", "index": i, "embedding": encode(vector)} for i, vector in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": body.model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        model = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "tritongpt2",
                 "max_model_len": max_seq}
        return {"object": "list", "data": [model]}

    @app.get("/health")
    async def health() -> Response:
        if not scheduler.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def _event_queue() -> tuple[asyncio.Queue, Callable[[tuple], None]]:
    """A queue on this event loop, and the thread-safe function that feeds it."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event: tuple) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop has closed: the server is gone, and so is the client
            pass

    return events, emit


async def _events_until_done(job: Job, events: asyncio.Queue, request: Request) -> AsyncIterator[tuple]:
    """A whole-response job's events up to its last one; a client that disconnects meanwhile
    cancels the job, and an engine error becomes the response."""
    watcher = asyncio.create_task(_cancel_on_disconnect(job, request))
    try:
        while True:
            event = await events.get()
            if event[0] == "error":
                raise RequestError(event[2], status=event[1], kind="server_error")
            if event[0] == "cancelled":
                raise RequestError("the request was cancelled", status=499)
            yield event
            if event[0] in ("done", "embeddings"):
                return
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once the job has finished


async def _cancel_on_disconnect(job: Job, request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _stream(job: CompletionJob, events: asyncio.Queue, head: dict, echoed: list[str],
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: a chunk per generated token, the finish reason in
    its choice's last chunk, a usage chunk when asked for, then [DONE]."""

    def chunk(index: int, text: str, reason: str | None) -> str:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
        return _sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})

    try:
        for index, text in enumerate(echoed):
            if text:
                yield chunk(index, text, None)
        while True:
            event = await events.get()
            if event[0] == "token":
                yield chunk(event[1], event[2], event[3])
            elif event[0] == "done":
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": event[1]})
                yield "data: [DONE]\n\n"
                return
            elif event[0] == "error":
                yield _sse(RequestError(event[2], kind="server_error").body())
                return
            else:  # cancelled
                return
    finally:
        job.cancel()  # the stream was closed: the client went away (or it ended, and this is a no-op)
