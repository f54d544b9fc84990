"""The server's Prometheus metrics, in a registry of its own (two servers in one process do not mix),
and the ASGI middleware that counts requests by route and status and times them to the last byte
(a stream's whole length, not just its first chunk)."""

from __future__ import annotations

import time
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tritongpt2_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("tritongpt2_request_duration_seconds", "Time from a request's arrival to its last byte",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generated_tokens = Counter("tritongpt2_generated_tokens", "Tokens generated for completions",
                                        registry=self.registry)
        self.prompt_tokens = Counter("tritongpt2_prompt_tokens", "Prompt and input tokens taken, by route", ["route"],
                                     registry=self.registry)
        self.queue_depth = Gauge("tritongpt2_queue_depth", "Requests waiting for the engine", registry=self.registry)
        self.running_batch = Gauge("tritongpt2_running_batch_size", "Cache rows decoding in the running batch",
                                   registry=self.registry)

    def watch(self, queue_depth: Callable[[], float], running_batch: Callable[[], float]) -> None:
        self.queue_depth.set_function(queue_depth)
        self.running_batch.set_function(running_batch)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request under its route's template (unknown paths as "unmatched", so a scan
    cannot grow the label set)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500
        done = False

        def record() -> None:
            route = scope.get("route")
            name = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(name, str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)

        async def counted_send(message: dict) -> None:
            nonlocal status, done
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not done:
                done = True
                record()

        try:
            await self.app(scope, receive, counted_send)
        finally:
            if not done:  # the client left mid-response, or the app raised
                done = True
                record()
