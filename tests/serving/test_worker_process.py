"""The worker API across the process boundary: `ProcessWorker` answers as `LocalWorker`
does (results, outputs, errors of the same class), and a killed worker fails what was
in flight with `WorkerCrashed`."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import pickle
import signal
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
from controller_helpers import greedy, one_torch_thread, prompt

from prism.engine import EngineConfig
from prism.engine.async_engine import EngineClosed, EngineError, EngineOverloaded
from prism.engine.request import FinishReason
from prism.models.config import ModelConfig
from prism.serving.async_worker import ModelConflict, Overloaded, WakeTimeout
from prism.serving.model_slot import ModelSpec
from prism.serving.worker import WorkerConfig, WorkerMode
from prism.serving.worker_client import LocalWorker, WorkerClient, WorkerCrashed
from prism.serving.worker_process import (
    Abort,
    Output,
    ProcessWorker,
    RemoteError,
    Reply,
    Submit,
    _WorkerServer,
    decode_error,
    encode_error,
)

TINY = ModelConfig(
    architecture="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=2048,
)  # fmt: skip
CONFIG = WorkerConfig(budget_bytes=8 << 20)


def _spec(name: str) -> ModelSpec:
    engine = EngineConfig(name=name, max_model_len=2048, max_num_seqs=4)
    return ModelSpec(name, TINY, load_format="dummy", engine=engine)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def _run(coro: Coroutine[Any, Any, None], timeout: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


def test_errors_cross_as_their_own_class() -> None:
    """Documented errors come back as themselves, subclasses as their nearest documented
    base, anything else as RuntimeError; KeyError keeps its message unquoted."""
    cases = [
        (ModelConflict("busy"), ModelConflict),
        (EngineOverloaded("full"), EngineOverloaded),
        (KeyError("unknown model 'x'"), KeyError),
        (FileNotFoundError("nope"), FileNotFoundError),
    ]
    for error, cls in cases:
        back = decode_error(encode_error(error))
        assert type(back) is cls and back.args == error.args
    assert encode_error(ZeroDivisionError("what")) == RemoteError("RuntimeError", "what")
    assert type(decode_error(RemoteError("SomethingElse", "x"))) is RuntimeError
    # Errors the server answers with their fields (Retry-After) cross whole, through the
    # pipe's pickling.
    for error in (Overloaded("full", "m", 8, 7), WakeTimeout("asleep", "m", 3)):
        back = decode_error(pickle.loads(pickle.dumps(encode_error(error))))
        assert type(back) is type(error) and back.retry_after_s == error.retry_after_s


async def _tokens(worker: WorkerClient, model: str, request_id: str, n: int) -> list[int]:
    stream = await worker.add_request(model, prompt(1), greedy(n), request_id)
    return [t async for out in stream for t in out.new_token_ids]


def test_process_worker_answers_as_the_local_one() -> None:
    """Every call of the worker API, in a child process, against the in-process worker."""

    async def scenario() -> None:
        local = LocalWorker("cpu:0", CONFIG)
        remote = ProcessWorker("cpu:1", CONFIG, threads=1)
        await asyncio.gather(local.start(), remote.start())
        try:
            for worker in (local, remote):
                info = await worker.add_model(_spec("a"), max_waiting=1)
                assert (info.weight_bytes, info.kv_bytes_per_token) == (1_706_496, 1024)
                await worker.add_model(_spec("b"))
            assert await _tokens(local, "a", "r", 12) == await _tokens(remote, "a", "r", 12)
            await _check_api(remote)
        finally:
            await asyncio.gather(local.close(), remote.close())

    _run(scenario())


async def _check_api(worker: ProcessWorker) -> None:
    with pytest.raises(ValueError, match="already on this worker"):
        await worker.add_model(_spec("a"))
    with pytest.raises(KeyError, match="unknown model 'zz'"):
        await worker.wake("zz")
    with pytest.raises(ModelConflict, match="no KV cache before its first wake"):
        await worker.set_kv_limit("b", 1 << 20)
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 512\)"):
        await worker.add_request("a", [9999], greedy(4), "bad")

    long = await worker.add_request("a", prompt(2), greedy(1500), "long")
    first = await long.__anext__()
    assert not first.finished
    with pytest.raises(ModelConflict, match="requests in flight"):
        await worker.sleep("a")
    with pytest.raises(ModelConflict, match="requests in flight"):
        await worker.remove_model("a")
    queued = [await worker.add_request("a", prompt(3), greedy(1500), f"q{i}") for i in range(4)]
    with pytest.raises(EngineOverloaded, match="at most 5"):
        await worker.add_request("a", prompt(3), greedy(4), "one-too-many")
    for stream in queued:
        stream.close()  # leaving aborts
    worker.abort("long")
    assert [o.finish_reason async for o in long][-1] is FinishReason.ABORT
    hasty = asyncio.create_task(worker.add_request("a", prompt(5), greedy(1500), "hasty"))
    await asyncio.sleep(0)  # its Submit is sent
    hasty.cancel()  # and its Abort right behind it
    await asyncio.gather(hasty, return_exceptions=True)
    await _until_idle(worker, "a")

    assert await worker.wake("b") is True
    assert await worker.set_kv_limit("b", 1 << 20) == 0
    snapshot = await worker.stats()
    assert {m.name: m.state for m in snapshot.worker.models} == {"a": "active", "b": "active"}
    assert await worker.sleep("b") > 0
    await worker.remove_model("b")
    assert [m.name for m in (await worker.stats()).worker.models] == ["a"]
    await worker.check_integrity()

    open_stream = await worker.add_request("a", prompt(4), greedy(1500), "open")
    await open_stream.__anext__()
    await worker.close()
    with pytest.raises(EngineClosed):
        async for _ in open_stream:
            pass
    with pytest.raises(EngineClosed, match="shut down"):
        await worker.stats()


async def _until_idle(worker: WorkerClient, model: str) -> None:
    """Every request of `model` has left its engine (the aborts reached it)."""
    for _ in range(500):
        engine = (await worker.stats()).engines[model]
        if engine.num_running == 0 and engine.num_waiting == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{model} still has requests: {engine}")


def test_killed_worker_fails_what_was_in_flight() -> None:
    """SIGKILL mid-stream: the open stream and a pending call raise WorkerCrashed,
    `on_exit` is told once, and later calls fail fast with the same error."""

    async def scenario() -> None:
        worker = ProcessWorker("cpu:0", CONFIG, threads=1)
        exits: list[EngineError] = []
        worker.on_exit = lambda client, error: exits.append(error)
        await worker.start()
        try:
            await worker.add_model(_spec("a"))
            stream = await worker.add_request("a", prompt(0), greedy(1500), "r")
            await stream.__anext__()
            assert worker.alive and worker.pid is not None
            os.kill(worker.pid, signal.SIGKILL)
            with pytest.raises(
                WorkerCrashed, match=r"worker cpu:0 \(pid \d+\) exited unexpectedly"
            ):
                async for _ in stream:
                    pass
            assert len(exits) == 1 and isinstance(exits[0], WorkerCrashed)
            assert not worker.alive
            with pytest.raises(WorkerCrashed):
                await worker.wake("a")
        finally:
            await worker.close()

    _run(scenario())


def test_an_abort_in_the_same_batch_as_its_submit_still_aborts() -> None:
    """The worker side of the pipe, in this process: an Abort that arrives before the
    worker has taken its request (same batch) is applied once it has."""

    async def scenario() -> None:
        ours, theirs = multiprocessing.Pipe()
        worker = LocalWorker("cpu:0", CONFIG)
        server = _WorkerServer(theirs, worker)
        server.loop = asyncio.get_running_loop()
        await worker.start()
        try:
            await worker.add_model(_spec("a"))
            server._dispatch([Submit(1, "a", prompt(0), greedy(200), "r"), Abort("r")])
            messages: list[object] = []
            while not any(isinstance(m, Output) and m.output.finished for m in messages):
                if ours.poll():
                    messages += ours.recv()
                else:
                    await asyncio.sleep(0.01)  # the server sends from this loop
            assert messages[0] == Reply(1)
            last = messages[-1]
            assert isinstance(last, Output) and last.output.finish_reason is FinishReason.ABORT
            assert last.output.num_output_tokens < 200
        finally:
            await worker.close()

    _run(scenario())


def test_a_model_that_does_not_fit_its_static_share_leaves_the_worker_clean() -> None:
    """`static` mode wakes a model as it is added; one whose weights do not fit is refused
    (MemoryError) and closed once: the pool is consistent and the name free again."""

    async def scenario() -> None:
        worker = LocalWorker("cpu:0", WorkerConfig(budget_bytes=1 << 20, mode=WorkerMode.STATIC))
        await worker.start()
        try:
            spec = dataclasses.replace(_spec("a"), max_kv_bytes=1 << 20)
            for _ in range(2):  # the second time is not "already on this worker"
                with pytest.raises(MemoryError, match="does not fit its static share"):
                    await worker.add_model(spec)
                await worker.check_integrity()
            assert (await worker.stats()).worker.models == ()
        finally:
            await worker.close()

    _run(scenario())
