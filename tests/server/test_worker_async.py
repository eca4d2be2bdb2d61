"""AsyncWorker over a real DeviceWorker (HostVMM page pool) with two tiny random-weight
models, `a` and `b` (no tokenizer: prompts are token ids)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from server_helpers import idle, kv_cache_all_free, wait_until

from prism.engine import EngineConfig, SamplingParams
from prism.engine.async_engine import EngineClosed, EngineError, EngineOverloaded
from prism.engine.request import FinishReason
from prism.engine.scheduler import ScheduledBatch
from prism.models.config import ModelConfig
from prism.serving.async_worker import AsyncWorker, ModelConflict
from prism.serving.model_slot import ModelSpec, ModelState
from prism.serving.worker import DeviceWorker, WorkerConfig, WorkerMode

# 2 layers, 2 KV heads of 32, fp32: 1 KiB of KV per token; weights ≈ 0.6 MiB.
TINY = ModelConfig(
    architecture="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=2048,
)  # fmt: skip
ENGINE = EngineConfig(max_model_len=1024, max_num_seqs=4, max_num_batched_tokens=512)
PROMPT = [(i * 31) % 500 + 1 for i in range(40)]


def _async_worker(
    mode: WorkerMode = WorkerMode.PRISM, max_waiting: int = 8, wake: bool = True
) -> AsyncWorker:
    worker = DeviceWorker(WorkerConfig(budget_bytes=24 << 20, mode=mode))
    for name in "ab":
        worker.add_model(ModelSpec(name, TINY, load_format="dummy", engine=ENGINE))
        if wake:
            assert worker.wake(name)
    return AsyncWorker(worker, max_waiting=max_waiting)


@pytest.fixture
def make_worker() -> Iterator[Callable[..., AsyncWorker]]:
    """`_async_worker`, closed at the end of the test whatever happens."""
    workers: list[AsyncWorker] = []

    def make(**kwargs: Any) -> AsyncWorker:
        workers.append(_async_worker(**kwargs))
        return workers[-1]

    yield make
    for worker in workers:
        worker.close()


@pytest.fixture
def worker(make_worker: Callable[..., AsyncWorker]) -> AsyncWorker:
    return make_worker()


def params(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def _collect(
    worker: AsyncWorker, model: str, request_id: str, max_tokens: int = 8
) -> list[int]:
    tokens: list[int] = []
    async for output in worker.generate(model, PROMPT, params(max_tokens), request_id):
        tokens += output.new_token_ids
    return tokens


def _all_idle(worker: AsyncWorker) -> bool:
    return all(idle(model) for model in worker.models.values())


def test_concurrent_requests_on_two_models_match_sequential_ones(worker: AsyncWorker) -> None:
    """Greedy outputs do not depend on what else runs, on this model or the other one."""

    async def together() -> list[list[int]]:
        jobs = [_collect(worker, m, f"{m}{i}") for i in range(3) for m in "ab"]
        return list(await asyncio.gather(*jobs))

    alone = asyncio.run(_collect(worker, "a", "alone"))
    assert len(alone) == 8
    assert asyncio.run(together()) == [alone] * 6  # a and b have the same (seeded) weights
    wait_until(lambda: _all_idle(worker))
    asyncio.run(worker.call(worker.worker.check_integrity))


def test_cancelling_the_consumer_aborts_and_frees_kv(worker: AsyncWorker) -> None:
    """A cancelled task (a client gone away) aborts its request; its blocks come back."""
    model = worker.models["b"]

    async def run() -> None:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in worker.generate("b", PROMPT, params(500), "long"):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 10)
        assert model.num_in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    wait_until(lambda: idle(model), timeout=10)
    assert kv_cache_all_free(model)
    asyncio.run(worker.call(worker.worker.check_integrity))


def test_a_failing_model_fails_only_its_own_requests(
    worker: AsyncWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b's engine raises mid-run: b's requests end with EngineError, a's finish, and b
    serves again afterwards."""
    engine = worker.models["b"].engine
    assert engine is not None
    execute = engine.runner.execute
    calls = 0

    def fail_third_step(batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("device lost")
        return execute(batch)

    monkeypatch.setattr(engine.runner, "execute", fail_third_step)

    async def run() -> list[object]:
        jobs = [_collect(worker, m, f"{m}{i}", 20) for i in range(2) for m in "ab"]
        return list(await asyncio.gather(*jobs, return_exceptions=True))

    a0, b0, a1, b1 = asyncio.run(run())
    assert isinstance(a0, list) and a0 == a1 and len(a0) == 20
    for failed in (b0, b1):
        assert isinstance(failed, EngineError)
        assert "model 'b'" in str(failed) and "device lost" in str(failed)
    wait_until(lambda: _all_idle(worker))
    assert kv_cache_all_free(worker.models["b"])
    assert asyncio.run(_collect(worker, "b", "after", 20)) == a0
    asyncio.run(worker.call(worker.worker.check_integrity))


def test_wake_sleep_and_limit_answer_from_the_worker_thread(
    make_worker: Callable[..., AsyncWorker],
) -> None:
    """Models start cached; wake, sleep and limits run on the worker and say why not."""
    worker = make_worker(wake=False)
    a = worker.models["a"]

    async def run() -> None:
        assert a.state is ModelState.CACHED and a.engine is None
        with pytest.raises(ModelConflict, match="before its first wake"):
            await worker.set_kv_limit("a", 1 << 20)
        assert await a.wake()
        assert a.state is ModelState.ACTIVE  # the snapshot is fresh when the answer comes
        assert await a.sleep() > 0
        assert a.state is ModelState.ASLEEP and a.model_stats is not None
        assert a.model_stats.weights_mapped_bytes == 0 and a.stats.kv_mapped_bytes == 0
        assert len(await _collect(worker, "a", "wakes-it")) == 8  # a request wakes it
        assert a.state is ModelState.ACTIVE
        stream = await a.add_request(PROMPT, params(500), "busy")
        await anext(stream)
        with pytest.raises(ModelConflict, match=r"1 running"):
            await a.sleep()
        stream.close()
        assert await a.set_kv_limit(1 << 20) == 0
        with pytest.raises(ValueError, match="below its minimum"):
            await a.set_kv_limit(0)
        with pytest.raises(KeyError, match="unknown model 'zzz'"):
            await worker.wake("zzz")

    asyncio.run(run())
    kv = next(t for t in worker.stats().pool.tenants if t.name == "a/kv")
    assert kv.max_pages * worker.stats().pool.page_size == 1 << 20
    wait_until(lambda: _all_idle(worker))
    asyncio.run(worker.call(worker.worker.check_integrity))


def test_a_request_waits_for_its_model_to_wake_and_can_be_aborted_meanwhile(
    make_worker: Callable[..., AsyncWorker],
) -> None:
    """In swap mode b cannot wake while a has a request running: b's requests wait (and
    count as waiting); one is aborted while it waits, the other runs once a is done."""
    worker = make_worker(mode=WorkerMode.SWAP, wake=False)
    a, b = worker.models["a"], worker.models["b"]

    async def run() -> None:
        long = await a.add_request(PROMPT, params(300), "long")
        await anext(long)
        waiting = await b.add_request(PROMPT, params(4), "waits")
        aborted = await b.add_request(PROMPT, params(4), "aborted")
        assert b.state is ModelState.CACHED and b.stats.num_waiting == 2
        worker.abort("aborted")
        outputs = [o async for o in aborted]
        assert [o.finish_reason for o in outputs] == [FinishReason.ABORT]
        tokens = [t async for o in waiting for t in o.new_token_ids]
        assert len(tokens) == 4
        assert b.state is ModelState.ACTIVE and a.state is ModelState.ASLEEP
        rest = [o async for o in long]  # it ran to its end before b could wake
        assert rest[-1].finish_reason is FinishReason.LENGTH
        assert rest[-1].num_output_tokens == 300

    asyncio.run(run())
    wait_until(lambda: _all_idle(worker))
    asyncio.run(worker.call(worker.worker.check_integrity))


def test_overload_and_close(make_worker: Callable[..., AsyncWorker]) -> None:
    """Beyond max_num_seqs + max_waiting requests in flight: EngineOverloaded. close()
    fails what is in flight with EngineClosed and refuses new requests and calls."""
    worker = make_worker(max_waiting=0)

    async def run() -> None:
        streams = [await worker.add_request("a", PROMPT, params(500), f"r{i}") for i in range(4)]
        with pytest.raises(EngineOverloaded, match="at most 4"):
            await worker.add_request("a", PROMPT, params(), "r4")
        other = await worker.add_request("b", PROMPT, params(500), "other")  # b has its own room
        await asyncio.to_thread(worker.close)
        for stream in [*streams, other]:
            with pytest.raises(EngineClosed):
                async for _ in stream:
                    pass
        with pytest.raises(EngineClosed):
            await worker.add_request("a", PROMPT, params(), "late")
        with pytest.raises(EngineClosed):
            await worker.wake("a")

    asyncio.run(run())
    assert not worker.is_running and not worker.models["a"].is_running
