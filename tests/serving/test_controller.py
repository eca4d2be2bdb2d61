"""The controller over two CPU workers serving four tiny random-weight models.

The load-shift scenario runs twice: with in-process workers (`LocalWorker`) and with one
worker process per device (`ProcessWorker`, the acceptance test). Rates, idleness and
placement run on a fake clock, so a minute passes when a test says so; requests run for
real. Every test bounds its run with a timeout: a request that hangs fails it.

The models' TPOT SLO is 100 s: it scales the KV demand of a tiny model's few tokens per
second (demand = token rate × TPOT × context × KV bytes per token) up to pressures the
size of a real model's, so the placement's default hysteresis applies as it would there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from controller_helpers import (
    TINY_WEIGHT_BYTES,
    Ended,
    FakeClock,
    greedy,
    kinds,
    one_torch_thread,
    prompt,
    run_request,
    states,
    tiny_fleet,
    write_tiny,
)

from prism.engine.request import FinishReason
from prism.serving.controller import Controller
from prism.serving.fleet import FleetConfigError
from prism.serving.policies import Migration
from prism.serving.worker import WorkerConfig
from prism.serving.worker_client import LocalWorker, WorkerClient, WorkerCrashed
from prism.serving.worker_process import ProcessWorker

SLO = "slo: {tpot_ms: 100000}"
BASE = "tick_s: null, placement_interval_s: 0, low_water_fraction: 0.6"


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def _run(coro: Coroutine[Any, Any, None], timeout: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_tiny(tmp_path / "tiny")


def _launch(
    controller: Controller, model: str, request_id: str, max_tokens: int = 8, seed: int = 0
) -> asyncio.Task[Ended]:
    return asyncio.create_task(run_request(controller, model, request_id, max_tokens, seed))


async def _wait_for(condition: Any, timeout: float = 20.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


@pytest.mark.parametrize("spawn", [LocalWorker, ProcessWorker], ids=["in-process", "processes"])
def test_traffic_moving_between_models_migrates_wakes_and_sleeps(
    model_dir: Path, spawn: type[WorkerClient]
) -> None:
    """a, c live on cpu:0 and b, d on cpu:1. Traffic on a and b, then on a and c: c is
    migrated to cpu:1 (woken there first, its traffic switched, its requests still on
    cpu:0 finish there, then it sleeps on cpu:0), and b, idle on cpu:1, is put to sleep
    once c's wake leaves cpu:1 short of memory — not before. Nothing is lost."""
    extra = dict.fromkeys("abcd", SLO)
    fleet = tiny_fleet(model_dir, controller=f"{{{BASE}}}", extra=extra)
    clock = FakeClock()

    async def scenario() -> None:
        controller = Controller(fleet, spawn=spawn, clock=clock)  # type: ignore[arg-type]
        await controller.start()
        try:
            await _load_shift(controller, clock)
        finally:
            await controller.close()

    _run(scenario(), timeout=90)


async def _load_shift(controller: Controller, clock: FakeClock) -> None:
    assert controller.homes() == {"a": "cpu:0", "b": "cpu:1", "c": "cpu:0", "d": "cpu:1"}
    # Phase 1: b busier than a; one short request wakes c beside a, the lighter of the two.
    phase1 = [_launch(controller, "a", f"a1-{i}", 64, i) for i in range(2)]
    phase1 += [_launch(controller, "b", f"b1-{i}", 64, i) for i in range(4)]
    ended = list(await asyncio.gather(*phase1))
    ended.append(await run_request(controller, "c", "c1", 8))
    assert all(e.completed for e in ended), [e for e in ended if not e.completed]
    assert await controller.tick() == []  # balanced: nothing moves, nothing sleeps
    assert await states(controller) == {
        "cpu:0": {"a": "active", "c": "active"},
        "cpu:1": {"b": "active", "d": "cached"},
    }

    # Phase 2, a minute and a half later: the traffic has moved from b to c, beside a.
    clock.advance(90)
    old_c = [_launch(controller, "c", f"c2-{i}", 300, i) for i in range(3)]
    busy_a = [_launch(controller, "a", f"a2-{i}", 300, i) for i in range(3)]
    await asyncio.sleep(0.2)  # let them start on cpu:0
    assert await controller.tick() == [Migration("c", "cpu:0", "cpu:1")]
    assert kinds(controller, "evict") == []  # b is idle, but cpu:1 has room
    await _wait_for(lambda: controller.homes()["c"] == "cpu:1")
    new_c = [_launch(controller, "c", f"c3-{i}", 16, i) for i in range(3)]
    await controller.settle()
    old, new = await asyncio.gather(*old_c), await asyncio.gather(*new_c)
    everything = [*old, *new, *await asyncio.gather(*busy_a)]
    assert all(e.completed for e in everything), [e for e in everything if not e.completed]
    assert {e.worker for e in old} == {"cpu:0"} and {e.worker for e in new} == {"cpu:1"}
    assert [e.tokens[:16] for e in old] == [e.tokens for e in new]  # same model on both
    assert kinds(controller, "wake") == [("c", "cpu:1")]
    assert kinds(controller, "migrate") == [("c", "cpu:1")]
    assert kinds(controller, "sleep") == [("c", "cpu:0")]  # after its last request there

    # c's wake has taken cpu:1's memory below its low-water mark: idle b goes to sleep.
    assert await controller.tick() == []
    assert kinds(controller, "evict") == [("b", "cpu:1")]
    assert await states(controller) == {
        "cpu:0": {"a": "active", "c": "asleep"},
        "cpu:1": {"b": "asleep", "c": "active", "d": "cached"},
    }
    assert controller.in_flight() == 0
    await controller.check_integrity()


@pytest.mark.parametrize(
    ("window_s", "moves"), [(600.0, False), (0.01, True)], ids=["light", "heavy"]
)
def test_compute_heavy_models_are_split_by_their_measured_compute_share(
    model_dir: Path, window_s: float, moves: bool
) -> None:
    """a and c, both homed on cpu:0, each get three 300-token requests. Their KV demand is
    negligible (the TPOT SLO scales with the window so that their pressure together is
    ≈ 0.04 in both cases, below the 0.1 hysteresis), so KV pressure alone keeps them
    together. Their compute share is the demanded tokens/s times the engine seconds per
    token the worker measured (about a millisecond): over a 600 s window (fake clock) it
    is about 0.002 and nothing moves; over a 10 ms window it is about 100 for each, far
    more than a device, and one of them is moved to cpu:1."""
    extra = dict.fromkeys("abcd", f"slo: {{tpot_ms: {window_s * 1e-4}}}")
    controller_yaml = f"{{{BASE}, rate_window_s: {window_s}}}"
    fleet = tiny_fleet(model_dir, controller=controller_yaml, extra=extra)

    async def scenario() -> None:
        controller = Controller(fleet, spawn=LocalWorker, clock=FakeClock())  # type: ignore[arg-type]
        await controller.start()
        try:
            ended = await asyncio.gather(
                *(_launch(controller, m, f"{m}{i}", 300, i) for m in "ac" for i in range(3))
            )
            assert all(e.completed for e in ended)
            moved = await controller.tick()
            await controller.settle()
            if not moves:
                assert moved == [] and controller.homes()["a"] == controller.homes()["c"]
                return
            assert len(moved) == 1 and moved[0].model in "ac", moved
            assert moved[0].source == "cpu:0" and moved[0].target == "cpu:1"
            assert {controller.homes()["a"], controller.homes()["c"]} == {"cpu:0", "cpu:1"}
            assert await controller.tick() == []  # no move back
            await controller.check_integrity()
        finally:
            await controller.close()

    _run(scenario(), timeout=90)


def test_first_request_of_a_sleeping_model_wakes_it_on_the_least_pressured_device(
    model_dir: Path,
) -> None:
    """d lives on cpu:1, where b is busy; its first request wakes it on idle cpu:0. c's
    first request wakes it at home, cpu:0, now the less pressured of the two."""
    fleet = tiny_fleet(model_dir, controller=f"{{{BASE}}}", extra=dict.fromkeys("abcd", SLO))

    async def scenario() -> None:
        controller = Controller(fleet, spawn=LocalWorker, clock=FakeClock())  # type: ignore[arg-type]
        await controller.start()
        try:
            ended = await asyncio.gather(
                *(run_request(controller, "b", f"b{i}", 64, i) for i in range(4))
            )
            ended += [
                await run_request(controller, "d", "d0"),
                await run_request(controller, "c", "c0"),
            ]
            assert all(e.completed for e in ended)
            assert (ended[-2].worker, ended[-1].worker) == ("cpu:0", "cpu:0")
            assert controller.homes() == {"a": "cpu:0", "b": "cpu:1", "c": "cpu:0", "d": "cpu:0"}
            assert ("d", "cpu:0") in kinds(controller, "place")
            on_cpu0 = (await states(controller))["cpu:0"]
            assert on_cpu0 == {"a": "cached", "c": "active", "d": "active"}
            await controller.check_integrity()
        finally:
            await controller.close()

    _run(scenario())


def test_pinned_model_stays_and_is_never_evicted(model_dir: Path) -> None:
    """a is pinned to cpu:0, where busy c lives. a's first request wakes it there although
    cpu:1 is idle; busy side by side, it is c that moves; idle under pressure, c sleeps
    and a stays resident."""
    extra = {m: SLO for m in "bcd"} | {"a": f"{SLO}, pinned: cpu:0"}
    fleet = tiny_fleet(model_dir, controller="{tick_s: null, placement_interval_s: 0}", extra=extra)
    clock = FakeClock()

    async def scenario() -> None:
        controller = Controller(fleet, spawn=LocalWorker, clock=clock)  # type: ignore[arg-type]
        await controller.start()
        try:
            assert controller.homes() == {"a": "cpu:0", "b": "cpu:1", "c": "cpu:0", "d": "cpu:1"}
            ended = [await run_request(controller, "c", "c-first")]
            ended += await asyncio.gather(
                *(run_request(controller, "c", f"c{i}", 64, i) for i in range(4))
            )
            ended.append(await run_request(controller, "a", "a-first"))
            ended += await asyncio.gather(
                *(run_request(controller, "a", f"a{i}", 64, i) for i in range(5))
            )
            assert all(e.completed and e.worker == "cpu:0" for e in ended)
            assert await controller.tick() == [Migration("c", "cpu:0", "cpu:1")]
            await controller.settle()
            clock.advance(120)  # everyone idle for two minutes, and memory is short:
            controller.config = dataclasses.replace(controller.config, low_water_fraction=1.0)
            assert await controller.tick() == []
            assert kinds(controller, "evict") == [("c", "cpu:1")]
            assert await states(controller) == {
                "cpu:0": {"a": "active", "c": "asleep"},
                "cpu:1": {"b": "cached", "c": "asleep", "d": "cached"},
            }
        finally:
            await controller.close()

    _run(scenario())


def test_idleness_alone_never_evicts_and_the_tick_loop_runs_by_itself(model_dir: Path) -> None:
    """With room to spare, models idle far past the threshold stay resident; under
    pressure (low-water mark at the whole budget) the background loop sleeps them."""
    controller_config = "{tick_s: 0.05, placement_interval_s: 0.05, idle_eviction_s: 0.2}"
    fleet = tiny_fleet(model_dir, names="ab", controller=controller_config)

    async def scenario() -> None:
        controller = Controller(fleet, spawn=LocalWorker)  # type: ignore[arg-type]
        await controller.start()
        try:
            ended = await asyncio.gather(*(run_request(controller, m, m) for m in "ab"))
            assert all(e.completed for e in ended)
            await asyncio.sleep(0.6)
            assert kinds(controller, "evict") == []
            controller.config = dataclasses.replace(controller.config, low_water_fraction=1.0)
            await _wait_for(lambda: len(kinds(controller, "evict")) == 2, timeout=10)
            assert await states(controller) == {"cpu:0": {"a": "asleep"}, "cpu:1": {"b": "asleep"}}
            again = await run_request(controller, "a", "a-again")  # and it wakes again
            assert again.completed
        finally:
            await controller.close()

    _run(scenario())


def test_requests_errors_and_aborts(model_dir: Path) -> None:
    """Unknown model, reused request id, abort: each ends cleanly, nothing stays in flight."""
    fleet = tiny_fleet(model_dir, names="ab")

    async def scenario() -> None:
        controller = Controller(fleet, spawn=LocalWorker, clock=FakeClock())  # type: ignore[arg-type]
        await controller.start()
        try:
            with pytest.raises(KeyError, match="unknown model 'zz'"):
                await controller.add_request("zz", prompt(0), greedy(4), "x")
            stream = await controller.add_request("a", prompt(0), greedy(1000), "long")
            with pytest.raises(ValueError, match="already in use"):
                await controller.add_request("b", prompt(0), greedy(4), "long")
            first = await stream.__anext__()
            assert not first.finished
            controller.abort("long")
            reasons = [o.finish_reason async for o in stream]
            assert reasons[-1] is FinishReason.ABORT
            closed = await controller.add_request("b", prompt(1), greedy(1000), "closed")
            await closed.__anext__()
            closed.close()  # a consumer that leaves aborts its request
            assert controller.in_flight() == 0
            assert (await run_request(controller, "b", "after")).completed
            await controller.check_integrity()
        finally:
            await controller.close()
        with pytest.raises(Exception, match="shut down"):
            await controller.add_request("a", prompt(0), greedy(4), "late")

    _run(scenario())


def test_bad_models_fail_start_with_the_file_and_model_named(model_dir: Path) -> None:
    """Problems only the checkpoint reveals still name the fleet file and the model."""
    cases = [
        ({"b": "max_memory: 1MiB"}, r"test-fleet.yaml: models\[1\] \(b\).max_memory: .* weights"),
        ({}, r"test-fleet.yaml: models\[0\] \(a\): .*not found"),
    ]
    for extra, message in cases:
        fleet = tiny_fleet(model_dir if extra else model_dir / "missing", names="ab", extra=extra)
        controller = Controller(fleet, spawn=LocalWorker)  # type: ignore[arg-type]
        with pytest.raises(FleetConfigError, match=message):
            _run(controller.start())
    big = tiny_fleet(model_dir, names="ab", budget=f"{TINY_WEIGHT_BYTES // 2}")
    with pytest.raises(FleetConfigError, match=r"no device can hold model\(s\) \['a', 'b'\]"):
        _run(Controller(big, spawn=LocalWorker).start())  # type: ignore[arg-type]


def _one_process(worker_id: str, config: WorkerConfig, **kwargs: Any) -> WorkerClient:
    """cpu:0 in a child process (the one the test kills), cpu:1 in this process."""
    cls = ProcessWorker if worker_id == "cpu:0" else LocalWorker
    return cls(worker_id, config, **kwargs)


def test_a_crashed_worker_fails_its_requests_and_is_restarted(model_dir: Path) -> None:
    """Killing cpu:0's process mid-stream ends a's requests with WorkerCrashed (b's, on
    cpu:1, finish); a request sent during the restart waits for it; a is served again."""
    fleet = tiny_fleet(model_dir, names="ab")

    async def scenario() -> None:
        controller = Controller(fleet, spawn=_one_process, clock=FakeClock())
        await controller.start()
        try:
            doomed = [_launch(controller, "a", f"a{i}", 1500, i) for i in range(2)]
            survivor = _launch(controller, "b", "b", 200)
            await _wait_for(lambda: controller.in_flight() == 3)
            await asyncio.sleep(0.3)  # a's requests are streaming
            worker = controller.workers["cpu:0"].client
            assert isinstance(worker, ProcessWorker) and worker.pid is not None
            os.kill(worker.pid, signal.SIGKILL)
            lost = await asyncio.gather(*doomed)
            assert all(isinstance(e.error, WorkerCrashed) for e in lost), lost
            assert "exited unexpectedly" in str(lost[0].error)
            assert (await survivor).completed
            during = await run_request(controller, "a", "during-restart", 8)
            assert during.completed and during.worker == "cpu:0"
            assert kinds(controller, "crash") == [(None, "cpu:0")]
            assert kinds(controller, "restart") == [(None, "cpu:0")]
            assert controller.workers["cpu:0"].client is not worker
            assert controller.in_flight() == 0
            await controller.check_integrity()
        finally:
            await controller.close()

    _run(scenario())


def test_a_worker_that_keeps_crashing_is_given_up_and_its_models_move(model_dir: Path) -> None:
    """With no restarts allowed, cpu:0 is given up after its crash; a's next request
    places a on cpu:1 and is served there."""
    fleet = tiny_fleet(model_dir, names="ab", controller="{tick_s: null, max_restarts: 0}")

    async def scenario() -> None:
        controller = Controller(fleet, spawn=_one_process, clock=FakeClock())
        await controller.start()
        try:
            assert (await run_request(controller, "a", "a0")).worker == "cpu:0"
            worker = controller.workers["cpu:0"].client
            assert isinstance(worker, ProcessWorker) and worker.pid is not None
            os.kill(worker.pid, signal.SIGKILL)
            await _wait_for(lambda: kinds(controller, "give-up") == [(None, "cpu:0")])
            moved = await run_request(controller, "a", "a1")
            assert moved.completed and moved.worker == "cpu:1"
            assert controller.homes() == {"a": "cpu:1", "b": "cpu:1"}
            assert await controller.tick() == []
        finally:
            await controller.close()

    _run(scenario())
