"""Chaos under memory pressure: four tiny models on a pool too small for all of them,
while a seeded driver submits, steps, aborts, sleeps, wakes and changes KV limits at
random. Checked throughout: the pool and caches stay consistent (`check_integrity()`
after every step); at the end: every request ended (finished or aborted, nothing
lost), finished ones have all their tokens, and a sample equals the same request run
alone on a fresh worker (solo greedy oracle).

Bounded time by default; `PRISM_SOAK_SECONDS` runs each test longer (scripts/soak.sh).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch

from prism.engine import EngineConfig, SamplingParams
from prism.engine.async_engine import EngineClosed, EngineError, EngineOverloaded
from prism.engine.output import RequestOutput
from prism.engine.request import FinishReason
from prism.memory import PoolError
from prism.models.config import ModelConfig
from prism.serving.async_worker import AsyncWorker, ModelConflict
from prism.serving.model_slot import ModelSpec
from prism.serving.worker import DeviceWorker, WorkerConfig

# 2 layers, 2 KV heads of 32, fp32: 1 KiB of KV per token; weights ≈ 0.6 MiB.
TINY = ModelConfig(
    architecture="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=2048,
)  # fmt: skip
ENGINE = EngineConfig(max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=256)
MODELS = "abcd"
CI_SECONDS = {"sync": 14.0, "async": 10.0}  # on a quiet machine; the oracle comes on top
ORACLE_SAMPLE = 10
SEED = 20240611  # PRISM_CHAOS_SEED overrides it (soak runs vary it)
MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class _Setup:
    """Where the chaos runs: device, model, a pool that holds about two of the four."""

    device: str
    model: ModelConfig
    budget: int
    limit_pages: tuple[int, ...]  # KV limits drawn, in pages (0: the whole budget)
    solo_budget: int  # the oracle's pool: room to spare
    dtype: torch.dtype | None = None
    engine: EngineConfig = ENGINE


CPU = _Setup("cpu", TINY, 5 * MiB, (1, 8, 32, 64, 0, 0), 24 * MiB)
# CUDA: 2 MiB pages; 4 KV heads of 64 in fp32 (1 KiB a token per tensor: a page group of
# four pages holds 2,048 tokens), weights 3 pages: the budget holds two models and about
# one group each. fp32 so that a recomputed prefill gives the decode path's greedy tokens.
SMALL = ModelConfig(
    architecture="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
    num_layers=2, num_heads=4, num_kv_heads=4, head_dim=64, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=2048,
)  # fmt: skip
GPU = _Setup(
    "cuda",
    SMALL,
    budget=36 * MiB,
    limit_pages=(1, 4, 8, 12, 0, 0),
    solo_budget=64 * MiB,
    dtype=torch.float32,
    engine=dataclasses.replace(ENGINE, cuda_graph_sizes=(1, 2, 4, 8)),
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the steps are tiny, and on a shared 2-core machine torch's
    thread hand-offs made them over 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _seconds(kind: str) -> float:
    """How long the chaos runs: `PRISM_SOAK_SECONDS` if set (read at test time)."""
    soak = os.environ.get("PRISM_SOAK_SECONDS")
    return float(soak) if soak else CI_SECONDS[kind]


def _seed(offset: int) -> int:
    return int(os.environ.get("PRISM_CHAOS_SEED", SEED)) + offset


def _worker(setup: _Setup = CPU, budget: int | None = None, models: str = MODELS) -> DeviceWorker:
    worker = DeviceWorker(WorkerConfig(device=setup.device, budget_bytes=budget or setup.budget))
    for name in models:
        spec = ModelSpec(name, setup.model, "dummy", dtype=setup.dtype, engine=setup.engine)
        worker.add_model(spec)
    return worker


@dataclass(slots=True)
class _Job:
    model: str
    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    reason: FinishReason | None = None
    aborted: bool = False  # the driver aborted it (it may have finished first)
    error: str | None = None  # the explicit error it ended with (async variant)

    @property
    def ended(self) -> bool:
        return self.reason is not None or self.aborted or self.error is not None


def _random_job(rng: random.Random) -> _Job:
    length = rng.choice([rng.randint(1, 16), rng.randint(17, 200), rng.randint(200, 700)])
    prompt = [rng.randint(1, TINY.vocab_size - 1) for _ in range(length)]  # both vocabs 512
    params = SamplingParams(
        max_tokens=rng.randint(1, 48), temperature=0.0, ignore_eos=rng.random() < 0.7
    )
    return _Job(rng.choice(MODELS), prompt, params)


def _random_limit(rng: random.Random, worker: DeviceWorker, setup: _Setup) -> int:
    """A KV limit from below the cache's minimum (refused) to the whole budget."""
    pages = rng.choice(setup.limit_pages)
    return pages * worker.pool.page_size if pages else setup.budget


def _check_done(job: _Job) -> None:
    """A finished request has all its tokens: `max_tokens`, or fewer only if it stopped."""
    assert job.reason is not None
    if job.reason is FinishReason.LENGTH:
        assert len(job.tokens) == job.params.max_tokens
    else:
        assert job.reason is FinishReason.STOP and not job.params.ignore_eos
        assert len(job.tokens) <= job.params.max_tokens


def _solo(job: _Job, setup: _Setup) -> list[int]:
    """The job alone on a fresh worker with room to spare: the greedy oracle."""
    worker = _worker(setup, setup.solo_budget, models=job.model)
    rid = worker.submit(job.model, job.prompt, job.params)
    tokens = [t for _, out in worker.run_until_idle() for t in out.new_token_ids]
    worker.check_integrity()
    worker.close()
    assert rid
    return tokens


def _check_against_oracle(rng: random.Random, jobs: dict[str, _Job], setup: _Setup = CPU) -> None:
    done = [j for j in jobs.values() if j.reason is not None and not j.aborted]
    for job in rng.sample(done, min(ORACLE_SAMPLE, len(done))):
        assert job.tokens == _solo(job, setup), f"{job.model}: output differs from the solo run"


# ---- DeviceWorker, driven synchronously -------------------------------------------------


class _Driver:
    """Random actions on a worker, with the books to check it by."""

    def __init__(self, worker: DeviceWorker, rng: random.Random, setup: _Setup) -> None:
        self.worker = worker
        self.setup = setup
        self.rng = rng
        self.jobs: dict[str, _Job] = {}
        self.actions: Counter[str] = Counter()
        self.preemptions: dict[str, int] = {}

    def act(self) -> None:
        action = self.rng.choices(
            ["submit", "abort", "sleep", "wake", "limit", "none"], [30, 5, 8, 6, 6, 45]
        )[0]
        getattr(self, f"_{action}")()

    def _submit(self) -> None:
        job = _random_job(self.rng)
        rid = f"r{len(self.jobs)}"
        self.jobs[self.worker.submit(job.model, job.prompt, job.params, rid)] = job
        self.actions["submit"] += 1

    def _abort(self) -> None:
        live = [rid for rid, job in self.jobs.items() if not job.ended]
        if not live:
            return
        rid = self.rng.choice(live)
        out = self.worker.abort(rid)
        self.jobs[rid].aborted = True
        if out is not None:
            assert out.finished and out.finish_reason is FinishReason.ABORT
            assert not out.new_token_ids
        self.actions["abort"] += 1

    def _sleep(self) -> None:
        name = self.rng.choice(MODELS)
        try:
            self.worker.sleep(name)
            self.actions["sleep"] += 1
        except RuntimeError as e:  # documented: a model with running requests stays awake
            assert "requests running" in str(e)
            self.actions["sleep refused (running)"] += 1

    def _wake(self) -> None:
        woken = self.worker.wake(self.rng.choice(MODELS))
        self.actions["wake" if woken else "wake refused (no memory)"] += 1

    def _limit(self) -> None:
        name = self.rng.choice(MODELS)
        try:
            self.worker.set_kv_limit(name, _random_limit(self.rng, self.worker, self.setup))
            self.actions["limit"] += 1
        except PoolError as e:  # below the cache's minimum
            assert "below its minimum" in str(e)
            self.actions["limit refused (below minimum)"] += 1
        except RuntimeError as e:  # never woken: no KV cache yet
            assert "has not been woken" in str(e)
            self.actions["limit refused (never woken)"] += 1

    def _none(self) -> None:
        pass

    def record(self, outputs: list[tuple[str, RequestOutput]]) -> None:
        for model, out in outputs:
            job = self.jobs[out.request_id]
            assert model == job.model
            assert not job.aborted, f"{out.request_id}: output after its abort"
            assert job.reason is None, f"{out.request_id}: output after it finished"
            job.tokens += out.new_token_ids
            if out.finished:
                job.reason = out.finish_reason
        for slot in self.worker.models.values():
            if slot.engine is not None:
                sched = slot.engine.scheduler
                for req in (*sched.running, *sched.waiting):
                    self.preemptions[req.request_id] = req.num_preemptions

    def step(self) -> None:
        self.record(self.worker.step())
        self.worker.check_integrity()

    def unlimit(self) -> None:
        """Every limit back to the whole budget, so every request can finish."""
        for name, slot in self.worker.models.items():
            if slot.engine is not None:
                self.worker.set_kv_limit(name, self.setup.budget)

    def figures(self) -> dict[str, object]:
        reasons = Counter(
            "aborted" if j.aborted else (j.reason.value if j.reason else "lost")
            for j in self.jobs.values()
        )
        slots = self.worker.models.values()
        return {
            "requests": len(self.jobs),
            "ended": dict(reasons),
            "preemptions": sum(self.preemptions.values()),
            "sleeps": sum(s.sleeps for s in slots),
            "wakes": sum(s.wakes for s in slots),
            "actions": dict(self.actions),
        }


def test_random_wake_sleep_limit_abort_while_requests_stream(
    record_property: Callable[[str, object], None],
) -> None:
    """Seeded random submits, aborts, sleeps, wakes and KV limits (some below current use)
    on four models over a pool that holds about two: the books balance after every step,
    every request ends, none loses a token, and sampled outputs equal their solo runs."""
    _chaos(CPU, record_property)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_random_wake_sleep_limit_abort_while_requests_stream(
    record_property: Callable[[str, object], None],
) -> None:
    """The same chaos on CUDA VMM pages, Triton attention, decode CUDA graphs replayed
    over remapped pages, and each model's steps on its own stream."""
    _chaos(GPU, record_property)


def _chaos(setup: _Setup, record: Callable[[str, object], None]) -> None:
    """The run; its figures also go into the JUnit report (`--junitxml`), which is how
    the device's run brings them back."""
    rng = random.Random(_seed(0))
    worker = _worker(setup)
    driver = _Driver(worker, rng, setup)
    deadline = time.monotonic() + _seconds("sync")
    while time.monotonic() < deadline:
        driver.act()
        driver.step()
    driver.unlimit()
    while worker.has_work():
        driver.step()
    for rid, job in driver.jobs.items():
        assert job.ended, f"{rid} was lost"
        if not job.aborted:
            _check_done(job)
    figures = driver.figures()
    print(f"\nchaos (DeviceWorker on {setup.device}, seed {_seed(0)}): {figures}")
    for name, value in figures.items():
        record(name, value)
    assert figures["sleeps"] and figures["preemptions"], "the pool was never under pressure"
    worker.check_integrity()
    worker.close()
    _check_against_oracle(rng, driver.jobs, setup)


# ---- AsyncWorker: clients stream concurrently, some cancel mid-stream ------------------

STREAM_TIMEOUT_S = 60.0  # a stream that has not ended by then hangs


async def _client(aw: AsyncWorker, rid: str, job: _Job, cancel_after: int | None) -> str:
    """Stream one request; returns how it ended. `cancel_after`: leave after that many
    outputs (the stream's close aborts the request)."""
    try:
        stream = await aw.add_request(job.model, job.prompt, job.params, rid)
    except EngineOverloaded:
        job.error = "overloaded"
        return "refused (overloaded)"
    outputs = 0
    try:
        async with asyncio.timeout(STREAM_TIMEOUT_S):
            async for out in stream:
                job.tokens += out.new_token_ids
                outputs += 1
                if out.finished:
                    job.reason = out.finish_reason
                    return "finished"
                if cancel_after is not None and outputs >= cancel_after:
                    job.aborted = True
                    return "cancelled"
    except (EngineError, EngineClosed) as e:
        job.error = type(e).__name__
        return f"error ({job.error})"
    finally:
        stream.close()
    raise AssertionError(f"{rid}: stream ended without a final output")


async def _chaos_admin(aw: AsyncWorker, rng: random.Random, stop: asyncio.Event) -> Counter[str]:
    """Sleeps, wakes and limits at random while clients stream; checks the books between."""
    actions: Counter[str] = Counter()
    while not stop.is_set():
        name = rng.choice(MODELS)
        action = rng.choice(["sleep", "wake", "limit"])
        try:
            if action == "sleep":
                await aw.sleep(name)
            elif action == "wake":
                action = "wake" if await aw.wake(name) else "wake refused (no memory)"
            else:
                page = aw.worker.pool.page_size
                await aw.set_kv_limit(name, rng.choice([page, 8 * page, 64 * page, CPU.budget]))
            actions[action] += 1
        except ModelConflict:  # in flight (sleep) or never woken (limit)
            actions[f"{action} refused (conflict)"] += 1
        except ValueError:  # a limit below the cache's minimum
            actions[f"{action} refused (below minimum)"] += 1
        await aw.call(aw.worker.check_integrity)
        await asyncio.sleep(rng.uniform(0.0, 0.05))
    return actions


async def _async_chaos(aw: AsyncWorker, rng: random.Random, seconds: float) -> dict[str, object]:
    jobs: dict[str, _Job] = {}
    clients: dict[str, asyncio.Task[str]] = {}
    cancelled: set[asyncio.Task[str]] = set()
    stop = asyncio.Event()
    await aw.call(lambda: torch.set_num_threads(1))  # the worker's own thread too
    admin = asyncio.create_task(_chaos_admin(aw, rng, stop))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rid = f"s{len(jobs)}"
        jobs[rid] = job = _random_job(rng)
        cancel_after = rng.randint(1, 5) if rng.random() < 0.2 else None
        clients[rid] = asyncio.create_task(_client(aw, rid, job, cancel_after))
        if rng.random() < 0.1:  # cancel a client task wherever it is
            live = [t for t in clients.values() if not t.done()]
            victim = rng.choice(live)
            victim.cancel()
            cancelled.add(victim)
        await asyncio.sleep(rng.uniform(0.0, 0.08))
    stop.set()
    actions = await asyncio.wait_for(admin, STREAM_TIMEOUT_S)
    for name in MODELS:  # every limit back to the budget, so every request can finish
        with contextlib.suppress(ModelConflict):  # never woken
            await aw.set_kv_limit(name, CPU.budget)
    async with asyncio.timeout(STREAM_TIMEOUT_S):
        results = await asyncio.gather(*clients.values(), return_exceptions=True)
    ends: Counter[str] = Counter()
    for (rid, task), result in zip(clients.items(), results, strict=True):
        if isinstance(result, asyncio.CancelledError) and task in cancelled:
            jobs[rid].aborted = True  # the client task was cancelled mid-stream
            result = "cancelled (task)"
        assert isinstance(result, str), f"{rid}: {result!r}"
        ends[result] += 1
    for rid, job in jobs.items():
        assert job.ended, f"{rid} was lost"
        if job.reason is not None:
            _check_done(job)
    await aw.call(aw.worker.check_integrity)
    assert all(aw.num_in_flight(m) == 0 for m in MODELS), "a stream was never released"
    await asyncio.sleep(0)
    engines = [s.engine for s in aw.worker.models.values() if s.engine is not None]
    assert all(not e.has_unfinished() for e in engines), "an abort did not reach the engine"
    slots = aw.worker.models.values()
    return {
        "requests": len(jobs),
        "ended": dict(ends),
        "sleeps": sum(s.sleeps for s in slots),
        "wakes": sum(s.wakes for s in slots),
        "admin": dict(actions),
        "jobs": jobs,
    }


def test_async_streams_end_under_chaos() -> None:
    """Clients stream concurrently through `AsyncWorker` while sleeps, wakes and limits
    come at random and some clients leave mid-stream: every stream ends — finished, or
    with an explicit error — within a timeout, and sampled outputs equal their solo runs."""
    rng = random.Random(_seed(1))
    aw = AsyncWorker(_worker(), max_waiting=16)
    try:
        figures = asyncio.run(_async_chaos(aw, rng, _seconds("async")))
    finally:
        aw.close()
    jobs = figures.pop("jobs")
    assert isinstance(jobs, dict)
    print(f"\nchaos (AsyncWorker, seed {_seed(1)}): {figures}")
    _check_against_oracle(rng, jobs)


def test_chaos_knob_reads_the_environment_at_test_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """`PRISM_SOAK_SECONDS` lengthens the run; unset, the bounded CI time applies."""
    monkeypatch.delenv("PRISM_SOAK_SECONDS", raising=False)
    assert _seconds("sync") == CI_SECONDS["sync"]
    monkeypatch.setenv("PRISM_SOAK_SECONDS", "600")
    assert _seconds("sync") == 600.0
