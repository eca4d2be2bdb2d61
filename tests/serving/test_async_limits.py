"""Overload bounds of `AsyncWorker` over a real DeviceWorker (HostVMM page pool) with two
tiny random-weight models `a` and `b`: per-model and per-device bounds refuse at once
with `Overloaded` (limit and Retry-After), a model that cannot wake in time fails its
waiting requests with `WakeTimeout`, and nothing is left behind."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Iterator

import pytest

from prism.engine import EngineConfig, SamplingParams
from prism.engine.async_engine import EngineOverloaded, RequestStream
from prism.models.config import ModelConfig
from prism.serving.async_worker import (
    AsyncWorker,
    Overloaded,
    RequestRejected,
    WakeTimeout,
    retry_after_s,
)
from prism.serving.model_slot import ModelSpec
from prism.serving.worker import DeviceWorker, WorkerConfig, WorkerMode

TINY = ModelConfig(
    architecture="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=2048,
)  # fmt: skip
ENGINE = EngineConfig(max_model_len=1024, max_num_seqs=2, max_num_batched_tokens=512)
PROMPT = [(i * 31) % 500 + 1 for i in range(40)]
LONG = SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def _device(config: WorkerConfig, wake: bool = True) -> DeviceWorker:
    worker = DeviceWorker(config)
    for name in "ab":
        worker.add_model(ModelSpec(name, TINY, load_format="dummy", engine=ENGINE))
        if wake:
            assert worker.wake(name)
    return worker


@pytest.fixture
def workers() -> Iterator[list[AsyncWorker]]:
    made: list[AsyncWorker] = []
    yield made
    for worker in made:
        worker.close()


def _start(workers: list[AsyncWorker], max_waiting: int = 1, **config: object) -> AsyncWorker:
    mode = config.pop("mode", WorkerMode.PRISM)
    wake = mode is not WorkerMode.SWAP
    device = _device(WorkerConfig(budget_bytes=24 << 20, mode=mode, **config), wake)  # type: ignore[arg-type]
    workers.append(AsyncWorker(device, max_waiting=max_waiting))
    return workers[-1]


async def _drain(stream: RequestStream) -> int:
    return sum([len(o.new_token_ids) async for o in stream])


def test_model_bound_refuses_at_once_and_other_models_are_served(
    workers: list[AsyncWorker],
) -> None:
    """`a` holds 2 running + 1 waiting; a 4th request is refused at once with the limit
    and a Retry-After; `b` is still served meanwhile, and `a` takes requests again once
    one of its own ends."""
    worker = _start(workers, max_waiting=1)

    async def run() -> None:
        held = [await worker.add_request("a", PROMPT, LONG, f"a{i}") for i in range(3)]
        with pytest.raises(Overloaded, match=r"at most 3 \(2 running \+ 1 waiting\)") as e:
            await worker.add_request("a", PROMPT, SHORT, "a3")
        assert e.value.model == "a" and e.value.limit == 3 and e.value.retry_after_s >= 1
        assert isinstance(e.value, EngineOverloaded)  # what older callers catch
        assert not worker.models["a"].has_capacity(1) and worker.num_in_flight("a") == 3
        assert await _drain(await worker.add_request("b", PROMPT, SHORT, "b0")) == 4
        held[0].close()  # aborts it: room for one more
        assert await _drain(await worker.add_request("a", PROMPT, SHORT, "a4")) == 4
        for stream in held[1:]:
            stream.close()

    asyncio.run(run())


def test_device_bound_counts_every_model(workers: list[AsyncWorker]) -> None:
    """With max_inflight=3 the device refuses a 4th request whichever model it is for,
    though each model alone is below its own bound."""
    worker = _start(workers, max_waiting=8, max_inflight=3)

    async def run() -> None:
        held = [
            await worker.add_request(m, PROMPT, LONG, f"{m}{i}")
            for m, i in (("a", 0), ("a", 1), ("b", 0))
        ]
        for model in "ab":
            with pytest.raises(Overloaded, match=r"device cpu has 3 requests .* at most 3") as e:
                await worker.add_request(model, PROMPT, SHORT, f"{model}-late")
            assert e.value.limit == 3 and e.value.retry_after_s >= 1
        assert worker.total_in_flight == 3
        held[2].close()
        assert await _drain(await worker.add_request("a", PROMPT, SHORT, "a-again")) == 4
        for stream in held[:2]:
            stream.close()

    asyncio.run(run())
    assert worker.total_in_flight == 0


def test_a_model_that_cannot_wake_in_time_fails_its_waiting_requests(
    workers: list[AsyncWorker],
) -> None:
    """Swap mode: `b` cannot wake while `a` runs. After wake_timeout_s its requests fail
    with WakeTimeout (a Retry-After with it); `a`'s request runs on; nothing stays
    queued, and `b` wakes for a later request once `a` is gone."""
    worker = _start(workers, max_waiting=4, mode=WorkerMode.SWAP, wake_timeout_s=0.5)

    async def run() -> None:
        long = await worker.add_request("a", PROMPT, LONG, "long")
        await anext(long)
        waiting = [await worker.add_request("b", PROMPT, SHORT, f"b{i}") for i in range(2)]
        for stream in waiting:
            with pytest.raises(WakeTimeout, match=r"could not be woken within 0\.5 s") as e:
                await _drain(stream)
            assert e.value.model == "b" and e.value.retry_after_s >= 1
        assert worker.num_in_flight("b") == 0
        assert not (await anext(long)).finished  # still running
        long.close()
        assert await _drain(await worker.add_request("b", PROMPT, SHORT, "after")) == 4

    asyncio.run(run())
    stats = worker.stats().model("b")
    assert stats is not None and stats.waiting == 0 and worker.total_in_flight == 0
    asyncio.run(worker.call(worker.worker.check_integrity))


def test_a_request_held_for_a_first_wake_is_refused_when_its_engine_refuses_it(
    workers: list[AsyncWorker],
) -> None:
    """Swap mode, `b` never woken: a prompt longer than b's max_model_len is held for
    b's wake (there is no engine yet to check it), then refused with RequestRejected
    (HTTP 400) when b wakes. The worker loop goes on: `a` had finished its request, and
    b serves the next one."""
    worker = _start(workers, max_waiting=4, mode=WorkerMode.SWAP)
    too_long = [(i * 17) % 500 + 1 for i in range(1100)]

    async def run() -> None:
        long = await worker.add_request("a", PROMPT, LONG, "long")
        await anext(long)
        held = await worker.add_request("b", too_long, SHORT, "too-long")
        assert worker.num_in_flight("b") == 1
        long.close()
        with pytest.raises(RequestRejected, match=r"model 'b': prompt has 1100 tokens") as e:
            await _drain(held)
        assert e.value.model == "b"
        assert await _drain(await worker.add_request("b", PROMPT, SHORT, "after")) == 4

    asyncio.run(run())
    assert worker.total_in_flight == 0
    asyncio.run(worker.call(worker.worker.check_integrity))


def test_expire_pending_drops_only_overdue_requests() -> None:
    """DeviceWorker level: a request queued for a model's wake is dropped once it has
    waited wake_timeout_s (None: never); the step never drops one itself."""
    for timeout, expected in ((0.0, [("b", "waits")]), (None, [])):
        config = WorkerConfig(budget_bytes=24 << 20, mode=WorkerMode.SWAP, wake_timeout_s=timeout)
        worker = _device(config, wake=False)
        try:
            worker.submit("a", PROMPT, LONG, "long")
            worker.step()
            worker.submit("b", PROMPT, SHORT, "waits")
            worker.step()
            assert worker.stats().models[1].waiting == 1
            assert worker.expire_pending() == expected
            assert worker.abort("waits") is None
            worker.abort("long")
            worker.run_until_idle()
            worker.check_integrity()
        finally:
            worker.close()


def test_retry_after_estimate() -> None:
    """Waiting requests drain at in_flight / latency a second (Little's law): 1 s at
    least, 60 s at most."""
    assert retry_after_s(0, 10, 5.0) == 1
    assert retry_after_s(10, 20, 4.0) == 2
    assert retry_after_s(30, 40, 3.0) == 3  # 2.25 s rounds up
    assert retry_after_s(1000, 1, 10.0) == 60
    assert retry_after_s(5, 0, 0.0) == 1  # nothing measured yet


def test_errors_survive_pickling() -> None:
    """The process worker sends errors over a pipe."""
    overloaded = pickle.loads(pickle.dumps(Overloaded("full", "a", 3, 7)))
    assert (str(overloaded), overloaded.limit, overloaded.retry_after_s) == ("full", 3, 7)
    timeout = pickle.loads(pickle.dumps(WakeTimeout("late", "b", 2)))
    assert (str(timeout), timeout.model, timeout.retry_after_s) == ("late", "b", 2)
    rejected = pickle.loads(pickle.dumps(RequestRejected("too long", "b")))
    assert (str(rejected), rejected.model) == ("too long", "b")
