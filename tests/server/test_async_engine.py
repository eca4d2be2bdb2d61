"""AsyncEngine over the real engine with a tiny random-weight model (no tokenizer)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from server_helpers import idle, tiny_engine, wait_until

from prism.engine import SamplingParams
from prism.engine.async_engine import AsyncEngine, EngineClosed, EngineError, EngineOverloaded
from prism.engine.request import FinishReason
from prism.engine.scheduler import ScheduledBatch

PROMPT = [1, 2, 3, 4, 5]


@pytest.fixture
def engine() -> Iterator[AsyncEngine]:
    engine = AsyncEngine(tiny_engine())
    yield engine
    engine.close()


def params(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def _collect(engine: AsyncEngine, request_id: str, max_tokens: int = 8) -> list[int]:
    tokens: list[int] = []
    async for output in engine.generate(PROMPT, params(max_tokens), request_id):
        tokens += output.new_token_ids
    return tokens


def test_generate_streams_every_token_then_finishes(engine: AsyncEngine) -> None:
    """One output per token; the last one is finished with reason LENGTH."""

    async def run() -> list[tuple[int, bool, FinishReason | None]]:
        return [
            (len(o.new_token_ids), o.finished, o.finish_reason)
            async for o in engine.generate(PROMPT, params(5), "r")
        ]

    outputs = asyncio.run(run())
    assert [n for n, _, _ in outputs] == [1] * 5
    assert outputs[-1][1:] == (True, FinishReason.LENGTH)
    wait_until(lambda: idle(engine))


def test_concurrent_requests_match_sequential_ones(engine: AsyncEngine) -> None:
    """Greedy outputs do not depend on what else is batched with a request."""

    async def run() -> list[list[int]]:
        return list(await asyncio.gather(*(_collect(engine, f"r{i}") for i in range(4))))

    alone = asyncio.run(_collect(engine, "alone"))
    assert asyncio.run(run()) == [alone] * 4


def test_cancelling_the_consumer_aborts_and_frees_kv(engine: AsyncEngine) -> None:
    """A cancelled task (a client gone away) aborts its request; its blocks come back."""

    async def run() -> None:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate(PROMPT, params(200), "long"):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 10)
        assert engine.num_in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    wait_until(lambda: idle(engine), timeout=10)


def test_bad_request_raises_from_add_request(engine: AsyncEngine) -> None:
    async def run() -> None:
        with pytest.raises(ValueError, match="token ids"):
            await engine.add_request([10_000], params(), "bad")
        stream = await engine.add_request(PROMPT, params(), "dup")
        with pytest.raises(ValueError, match="already in use"):
            await engine.add_request(PROMPT, params(), "dup")
        stream.close()

    asyncio.run(run())
    wait_until(lambda: idle(engine))


def test_step_failure_fails_requests_in_flight_and_thread_survives(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = engine.engine.runner
    execute, execute_ahead = runner.execute, runner.execute_ahead
    calls = 0

    def count() -> None:  # the third step fails, launched ahead or not
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("device lost")

    def fail_third_step(batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        count()
        return execute(batch)

    def fail_third_step_ahead(requests: Any, next_ids: torch.Tensor) -> torch.Tensor:
        count()
        return execute_ahead(requests, next_ids)

    monkeypatch.setattr(runner, "execute", fail_third_step)
    monkeypatch.setattr(runner, "execute_ahead", fail_third_step_ahead)

    async def run() -> list[object]:
        jobs = (_collect(engine, f"r{i}", 20) for i in range(3))
        return list(await asyncio.gather(*jobs, return_exceptions=True))

    results = asyncio.run(run())
    assert all(isinstance(r, EngineError) and "device lost" in str(r) for r in results)
    wait_until(lambda: idle(engine))
    assert len(asyncio.run(_collect(engine, "after"))) == 8


def test_overload_and_close() -> None:
    """Beyond max_num_seqs + max_waiting requests in flight: EngineOverloaded. close()
    fails what is in flight with EngineClosed and refuses new requests."""
    engine = AsyncEngine(tiny_engine(max_num_seqs=1), max_waiting=1)

    async def run() -> None:
        first = await engine.add_request(PROMPT, params(200), "a")
        second = await engine.add_request(PROMPT, params(200), "b")
        with pytest.raises(EngineOverloaded):
            await engine.add_request(PROMPT, params(), "c")
        await asyncio.to_thread(engine.close)
        for stream in (first, second):
            with pytest.raises(EngineClosed):
                async for _ in stream:
                    pass
        with pytest.raises(EngineClosed):
            await engine.add_request(PROMPT, params(), "d")

    asyncio.run(run())
    assert not engine.is_running
