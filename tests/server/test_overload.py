"""Overload through the live server and the real `openai` client: a full queue answers
429 with Retry-After while other models are served, and a bounded load test at 2× and
5× the sustainable rate ends every request with a 200 or an explicit 429/503, keeps the
queues within their bounds and the latency of accepted requests bounded."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from server_helpers import API_KEY, MODEL, MODEL_B, LiveServer, idle, run_server, wait_until

from prism.engine import EngineConfig
from prism.models import default_model_path
from prism.server import ModelRegistry, create_app
from prism.serving.async_worker import AsyncWorker
from prism.serving.model_slot import ModelSpec
from prism.serving.worker import DeviceWorker, WorkerConfig

PROMPT = "The capital of France is"
GREEDY: dict[str, Any] = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def test_a_full_queue_answers_429_with_retry_after_and_other_models_are_served(
    server: LiveServer, client: openai.OpenAI
) -> None:
    """`smol-b` holds 2 running + 1 waiting: a 4th request gets the client's
    RateLimitError, a Retry-After header and the limit in its message, at once; `smol`
    answers meanwhile, and `smol-b` serves again once its queue drains."""
    streams = [
        client.completions.create(
            model=MODEL_B, prompt=PROMPT, max_tokens=400, stream=True, **GREEDY
        )
        for _ in range(3)
    ]
    try:
        wait_until(lambda: server.engine(MODEL_B).num_in_flight == 3)
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=MODEL_B, prompt=PROMPT, max_tokens=4, **GREEDY)
        assert time.monotonic() - started < 2.0  # refused at once, not queued
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert "at most 3 (2 running + 1 waiting)" in e.value.message
        assert e.value.code == "rate_limit_exceeded"
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, **GREEDY)
        assert out.usage is not None and out.usage.completion_tokens == 4
    finally:
        for stream in streams:
            stream.close()
    wait_until(lambda: idle(server.engine(MODEL_B)))
    out = client.completions.create(model=MODEL_B, prompt=PROMPT, max_tokens=4, **GREEDY)
    assert out.usage is not None and out.usage.completion_tokens == 4


# ---- a bounded load test -----------------------------------------------------------------

HOT, COOL = "hot", "cool"  # hot is overloaded; cool gets a light load within capacity
MAX_NUM_SEQS, MAX_WAITING, MAX_INFLIGHT = 4, 4, 12
TOKENS = 12  # output tokens per request
CLOSED_S = 4.0  # closed-loop seconds to measure the sustainable rate
PHASE_S = 6.0  # open-loop seconds per overload factor
TIMEOUT_S = 30.0  # client timeout: a request that hangs fails the test


@pytest.fixture(scope="module")
def loaded() -> Iterator[LiveServer]:
    path = str(default_model_path())
    worker = DeviceWorker(WorkerConfig(budget_bytes=3 << 30, max_inflight=MAX_INFLIGHT))
    for name in (HOT, COOL):
        engine = EngineConfig(name=name, max_model_len=256, max_num_seqs=MAX_NUM_SEQS)
        worker.add_model(ModelSpec(name, path, engine=engine))
        assert worker.wake(name)
    registry = ModelRegistry([AsyncWorker(worker, max_waiting=MAX_WAITING)])
    with run_server(create_app(registry, api_key=API_KEY)) as url:
        yield LiveServer(url, registry)


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {HOT: [], COOL: []})

    def line(self) -> str:
        hot, cool = sorted(self.latencies[HOT]), sorted(self.latencies[COOL])
        return (
            f"sent {sum(self.statuses.values())} {dict(self.statuses)}; 200 latency hot "
            f"p50 {_pct(hot, 0.5):.2f} max {max(hot, default=0):.2f} s, cool p50 "
            f"{_pct(cool, 0.5):.2f} max {max(cool, default=0):.2f} s"
        )


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


async def _one(client: openai.AsyncOpenAI, model: str, tally: Tally) -> None:
    started = time.monotonic()
    try:
        out = await client.completions.create(
            model=model, prompt=PROMPT, max_tokens=TOKENS, **GREEDY
        )
        assert out.usage is not None and out.usage.completion_tokens == TOKENS
        tally.statuses["200"] += 1
        tally.latencies[model].append(time.monotonic() - started)
    except openai.APIStatusError as e:
        code = e.status_code
        ok = code in (429, 503) and int(e.response.headers["retry-after"]) >= 1
        tally.statuses[str(code) if ok else f"bad {code}: {e.message}"] += 1
    except openai.APIError as e:  # a timeout or a dropped connection: lost
        tally.statuses[f"lost: {type(e).__name__}"] += 1


async def _closed_loop(client: openai.AsyncOpenAI, seconds: float) -> Tally:
    """MAX_NUM_SEQS clients back to back on `hot` (its capacity) and one on `cool`."""
    tally = Tally()
    deadline = time.monotonic() + seconds

    async def loop(model: str) -> None:
        while time.monotonic() < deadline:
            await _one(client, model, tally)

    await asyncio.gather(*(loop(m) for m in [HOT] * MAX_NUM_SEQS + [COOL]))
    assert set(tally.statuses) == {"200"}, tally.statuses
    return tally


async def _open_loop(
    client: openai.AsyncOpenAI, rates: dict[str, float], seconds: float, tally: Tally
) -> None:
    """Poisson-free fixed-interval arrivals per model, whatever becomes of earlier ones."""
    tasks: list[asyncio.Task[None]] = []

    async def arrivals(model: str, rate: float) -> None:
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.ensure_future(_one(client, model, tally)))

    await asyncio.gather(*(arrivals(m, r) for m, r in rates.items()))
    await asyncio.gather(*tasks)


def _watch_queues(live: LiveServer, stop: threading.Event, peaks: Counter[str]) -> None:
    worker = live.registry.workers[0]
    while not stop.wait(0.02):
        for name in (HOT, COOL):
            peaks[name] = max(peaks[name], worker.num_in_flight(name))
        peaks["device"] = max(peaks["device"], worker.total_in_flight)


def test_load_at_2x_and_5x_the_sustainable_rate(loaded: LiveServer) -> None:
    """Measure the sustainable rate R of `hot` (closed loop), then fire 2R and 5R at it
    open loop while `cool` gets R/4. Every request ends with a 200 or a 429/503 with
    Retry-After (none lost, none hung past the client timeout); the queues never pass
    their bounds; the server stays up. Latency: an accepted `hot` request waits behind
    at most MAX_WAITING queued ones, so about (1 + MAX_WAITING / MAX_NUM_SEQS) × its
    closed-loop latency; we allow 4× that + 2 s, since the client, the refusals and the
    model share one process on a shared 2-core CPU. `cool`'s SLO: within 2× + 2 s of
    its latency beside `hot` at capacity (the closed loop): `hot`'s excess is refused,
    so it must not slow `cool` much beyond what `hot` at capacity does."""
    client = openai.AsyncOpenAI(
        base_url=loaded.api_url, api_key=API_KEY, max_retries=0, timeout=TIMEOUT_S
    )
    peaks: Counter[str] = Counter()
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_queues, args=(loaded, stop, peaks), daemon=True)

    async def run() -> tuple[float, float, float, dict[float, Tally]]:
        closed = await _closed_loop(client, CLOSED_S)
        rate = len(closed.latencies[HOT]) / CLOSED_S
        latency = statistics.mean(closed.latencies[HOT])
        watcher.start()
        tallies = {}
        for factor in (2.0, 5.0):
            tallies[factor] = Tally()
            rates = {HOT: factor * rate, COOL: rate / 4}
            await _open_loop(client, rates, PHASE_S, tallies[factor])
        return rate, latency, statistics.median(closed.latencies[COOL]), tallies

    try:
        rate, latency, cool_base, tallies = asyncio.run(run())
    finally:
        stop.set()
    report = [f"R {rate:.1f}/s, closed-loop latency {latency:.2f} s, cool {cool_base:.2f} s"]
    report += [f"{f:g}x: {t.line()}" for f, t in tallies.items()]
    print("\n".join(report))
    hot_bound = 4 * (1 + MAX_WAITING / MAX_NUM_SEQS) * latency + 2
    for tally in tallies.values():
        assert set(tally.statuses) <= {"200", "429", "503"}, report
        assert tally.statuses["429"] > 0, report  # the overload was real
        assert max(tally.latencies[HOT]) <= hot_bound, report
        assert tally.latencies[COOL] and max(tally.latencies[COOL]) <= 2 * cool_base + 2, report
    assert peaks[HOT] <= MAX_NUM_SEQS + MAX_WAITING and peaks["device"] <= MAX_INFLIGHT, peaks
    assert httpx.get(f"{loaded.base_url}/health").json()["status"] == "ok"
    wait_until(lambda: all(idle(loaded.engine(m)) for m in (HOT, COOL)))
