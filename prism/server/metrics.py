"""Prometheus metrics: request counts and latencies as they happen; engine, model and
device-memory gauges read at scrape time from each worker's latest snapshot.

Names follow vLLM's where the meaning is the same (`prism:` instead of `vllm:`). Each
app has its own `CollectorRegistry`, so several servers can live in one process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prism.engine.output import RequestOutput
from prism.server.registry import ModelState, Registry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
COUNTED_PATHS = ("/v1/completions", "/v1/chat/completions")
MODEL_LABEL = "model_name"  # the route stores the request's model under this key in scope["state"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


@dataclass(slots=True)
class RequestTimer:
    """Wall-clock marks of one engine request, for TTFT / TPOT / end-to-end latency."""

    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def on_output(self, output: RequestOutput) -> None:
        if self.first_token is None and output.new_token_ids:
            self.first_token = time.perf_counter()


class ServerMetrics:
    def __init__(self, models: Registry) -> None:
        self.registry = CollectorRegistry()
        r, label = self.registry, [MODEL_LABEL]
        self.requests = Counter(
            "prism:http_requests",
            "Completion API requests by model and HTTP status.",
            [MODEL_LABEL, "status"],
            registry=r,
        )
        self.request_success = Counter(
            "prism:request_success",
            "Engine requests finished, by finish reason.",
            [MODEL_LABEL, "finished_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "prism:prompt_tokens", "Prompt tokens processed.", label, registry=r
        )
        self.generation_tokens = Counter(
            "prism:generation_tokens", "Tokens generated.", label, registry=r
        )
        self.ttft = Histogram(
            "prism:time_to_first_token_seconds",
            "Time from request arrival to its first token.",
            label,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "prism:time_per_output_token_seconds",
            "Mean time between output tokens of a request, after the first.",
            label,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "prism:e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            label,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.registry.register(_EngineCollector(models))
        for model in models:  # series exist (at zero) before the first request
            for metric in (
                self.prompt_tokens,
                self.generation_tokens,
                self.ttft,
                self.tpot,
                self.e2e,
            ):
                metric.labels(model.name)

    def record_finished(self, model: str, timer: RequestTimer, output: RequestOutput) -> None:
        """Once per engine request, with its final output."""
        now = time.perf_counter()
        reason = output.finish_reason.value if output.finish_reason else "unknown"
        self.request_success.labels(model, reason).inc()
        self.prompt_tokens.labels(model).inc(output.num_prompt_tokens)
        self.generation_tokens.labels(model).inc(output.num_output_tokens)
        self.e2e.labels(model).observe(now - timer.start)
        if timer.first_token is not None:
            self.ttft.labels(model).observe(timer.first_token - timer.start)
            if output.num_output_tokens > 1:
                per_token = (now - timer.first_token) / (output.num_output_tokens - 1)
                self.tpot.labels(model).observe(per_token)

    def record_aborted(self, model: str) -> None:
        """An engine request abandoned before it finished (its client went away)."""
        self.request_success.labels(model, "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Gauges read at scrape time from each worker's latest stats snapshot."""

    def __init__(self, models: Registry) -> None:
        self.models = models

    def collect(self) -> Iterator[Metric]:
        yield from self._engines()
        yield from self._models()
        yield from self._devices()

    def _engines(self) -> Iterator[Metric]:
        label = [MODEL_LABEL]
        running = GaugeMetricFamily("prism:num_requests_running", "Requests running.", labels=label)
        waiting = GaugeMetricFamily("prism:num_requests_waiting", "Requests queued.", labels=label)
        mapped = GaugeMetricFamily(
            "prism:kv_cache_mapped_bytes", "KV cache memory mapped.", labels=label
        )
        free = GaugeMetricFamily(
            "prism:kv_cache_free_blocks", "Mapped KV blocks no request holds.", labels=label
        )
        used = GaugeMetricFamily(
            "prism:kv_cache_used_blocks", "KV blocks held by requests.", labels=label
        )
        for model in self.models:
            stats = model.engine.stats
            running.add_metric([model.name], stats.num_running)
            waiting.add_metric([model.name], stats.num_waiting)
            mapped.add_metric([model.name], stats.kv_mapped_bytes)
            free.add_metric([model.name], stats.kv_free_blocks)
            used.add_metric([model.name], stats.kv_used_blocks)
        yield from (running, waiting, mapped, free, used)

    def _models(self) -> Iterator[Metric]:
        label = [MODEL_LABEL]
        state = GaugeMetricFamily(
            "prism:model_state", "1 for the model's current state.", labels=[MODEL_LABEL, "state"]
        )
        wakes = CounterMetricFamily("prism:model_wakes", "Times the model was woken.", labels=label)
        sleeps = CounterMetricFamily(
            "prism:model_sleeps", "Times the model was put to sleep.", labels=label
        )
        weights = GaugeMetricFamily(
            "prism:weights_bytes_mapped", "Weight memory mapped on the device.", labels=label
        )
        preemptions = CounterMetricFamily(
            "prism:num_preemptions", "Requests preempted by recompute.", labels=label
        )
        for model in self.models:
            current = model.state
            for s in ModelState:
                state.add_metric([model.name, s.value], float(current is s))
            stats = model.engine.model_stats
            wakes.add_metric([model.name], stats.wakes if stats else 0)
            sleeps.add_metric([model.name], stats.sleeps if stats else 0)
            weights.add_metric([model.name], stats.weights_mapped_bytes if stats else 0)
            preemptions.add_metric([model.name], stats.preemptions if stats else 0)
        yield from (state, wakes, sleeps, weights, preemptions)

    def _devices(self) -> Iterator[Metric]:
        budget = GaugeMetricFamily(
            "prism:pool_budget_bytes", "Device memory the page pool may hold.", labels=["device"]
        )
        free = GaugeMetricFamily(
            "prism:pool_free_bytes", "Pool budget no model holds.", labels=["device"]
        )
        for worker in self.models.workers:
            pool = worker.stats().pool
            budget.add_metric([worker.device], pool.budget_pages * pool.page_size)
            unheld = pool.budget_pages - pool.owned_pages
            free.add_metric([worker.device], unheld * pool.page_size)
        yield from (budget, free)


class RequestCounter:
    """ASGI middleware: counts completion requests by model and final status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in COUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            model = scope.get("state", {}).get(MODEL_LABEL, "")
            self.metrics.requests.labels(model, str(status)).inc()
