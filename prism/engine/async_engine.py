"""`AsyncEngine`: one `Engine` driven by its own thread, consumed from asyncio.

The engine is synchronous and not thread-safe, so every call into it happens on one
dedicated thread. That thread takes commands (add, abort) from a queue, runs `step()`
while any request is unfinished, and sleeps on a condition otherwise. Outputs travel
back to each request's `RequestStream` (an asyncio queue on the caller's loop) through
`loop.call_soon_threadsafe`. A stream closed before its request finished (a client that
went away, a cancelled task) aborts the request, which frees its KV blocks.

An exception from `step()` fails every request in flight (each stream raises
`EngineError`) and aborts them in the engine; the thread itself carries on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from prism.engine.engine import Engine, EngineConfig
from prism.engine.output import RequestOutput
from prism.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while this request was in flight."""


class EngineClosed(EngineError):
    """The engine is shut down (or shutting down) and takes no requests."""


class EngineOverloaded(RuntimeError):
    """Admitting the request would exceed the engine's bound on requests in flight."""


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot taken on the engine thread after every loop iteration."""

    num_running: int = 0
    num_waiting: int = 0
    kv_free_blocks: int = 0  # mapped and held by no request (free + evictable prefix cache)
    kv_used_blocks: int = 0  # held by requests (a prefix block shared by several counts once)
    kv_mapped_bytes: int = 0


@dataclass(frozen=True, slots=True)
class _Add:
    prompt: str | list[int]
    params: SamplingParams
    request_id: str
    accepted: concurrent.futures.Future[None]  # result: added; exception: add_request's error


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


class StreamOwner(Protocol):
    """What feeds a `RequestStream` (an `AsyncEngine`, or a model of an `AsyncWorker`)."""

    def _release(self, request_id: str) -> None:
        """The stream was closed: abort its request unless it has finished."""


class RequestStream:
    """The outputs of one request, in order. Closing it before the end aborts the request."""

    def __init__(self, request_id: str, owner: StreamOwner) -> None:
        self.request_id = request_id
        self.loop = asyncio.get_running_loop()
        self.finished = False
        self._owner = owner
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._closed = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """Runs on `loop` (the engine thread schedules it there)."""
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self._closed:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.close()
            raise
        if isinstance(item, BaseException):
            self.close()
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        """Stop listening; aborts the request if it has not finished. Idempotent."""
        if not self._closed:
            self._closed = True
            self._owner._release(self.request_id)


class AsyncEngine:
    """`await add_request(...)` → a `RequestStream`; `generate(...)` iterates one."""

    def __init__(self, engine: Engine, *, max_waiting: int = 256) -> None:
        """`max_waiting`: requests beyond the engine's running capacity (`max_num_seqs`)
        that may queue; more are refused with `EngineOverloaded`."""
        self.engine = engine
        self.max_requests = engine.config.max_num_seqs + max_waiting
        self._cond = threading.Condition()
        # Guarded by _cond: the command queue, the streams of requests in flight, _stopping.
        self._commands: list[_Add | _Abort] = []
        self._streams: dict[str, RequestStream] = {}
        self._stopping = False
        self._stats = EngineStats()
        self._thread = threading.Thread(
            target=self._run, name=f"engine-{engine.config.name}", daemon=True
        )
        self._thread.start()

    # ---- asyncio side ------------------------------------------------------------------

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def num_in_flight(self) -> int:
        """Requests added and not yet finished, aborted or failed."""
        return len(self._streams)

    def has_capacity(self, count: int) -> bool:
        return self.num_in_flight + count <= self.max_requests

    async def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> RequestStream:
        """Queue a request; returns once the engine has accepted it. Raises the engine's
        ValueError for a bad request, `EngineOverloaded` or `EngineClosed`."""
        stream = RequestStream(request_id, self)
        accepted: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise EngineClosed(f"engine {self.config.name!r} is shut down")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            if not self.has_capacity(1):
                raise EngineOverloaded(
                    f"model {self.config.name!r} has {self.num_in_flight} requests in flight "
                    f"(at most {self.max_requests})"
                )
            self._streams[request_id] = stream
            self._commands.append(_Add(prompt, params, request_id, accepted))
            self._cond.notify()
        try:
            await asyncio.wrap_future(accepted)
        except BaseException:
            stream.close()
            raise
        return stream

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come; leaving early aborts the request."""
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Abort a request; its stream (if still open) gets a final ABORT output."""
        self._submit(_Abort(request_id))

    def close(self) -> None:
        """Fail every request in flight with `EngineClosed`, stop the thread, close the
        engine. Blocks for at most the step in progress."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _release(self, request_id: str) -> None:
        """A stream was closed: abort its request unless the engine is done with it."""
        with self._cond:
            if self._streams.pop(request_id, None) is not None:
                self._commands.append(_Abort(request_id))
                self._cond.notify()

    def _submit(self, command: _Add | _Abort) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    # ---- engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        while (commands := self._wait_for_work()) is not None:
            for command in commands:
                self._apply(command)
            if self.engine.has_unfinished():
                self._step()
            self._stats = self._snapshot()
        self._shutdown()

    def _wait_for_work(self) -> list[_Add | _Abort] | None:
        """The pending commands once there is something to do; None when stopping."""
        with self._cond:
            while not (self._commands or self._stopping or self.engine.has_unfinished()):
                self._cond.wait()
            if self._stopping:
                return None
            commands, self._commands = self._commands, []
            return commands

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self._abort(command.request_id)
        else:
            self._add(command)

    def _add(self, command: _Add) -> None:
        if not command.accepted.set_running_or_notify_cancel():
            return  # the caller gave up before the request reached the engine
        try:
            self.engine.add_request(command.prompt, command.params, command.request_id)
        except Exception as e:
            with self._cond:
                self._streams.pop(command.request_id, None)
            command.accepted.set_exception(e)
            return
        command.accepted.set_result(None)

    def _abort(self, request_id: str) -> None:
        try:
            output = self.engine.abort(request_id)
        except Exception:
            logger.exception("engine %r: abort of %s failed", self.config.name, request_id)
            return
        if output is not None:
            self._deliver(output)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("engine %r: step failed", self.config.name)
            self._fail_all(EngineError(f"engine step failed: {type(e).__name__}: {e}"))
            return
        for output in outputs:
            self._deliver(output)

    def _deliver(self, output: RequestOutput) -> None:
        with self._cond:
            if output.finished:
                stream = self._streams.pop(output.request_id, None)
            else:
                stream = self._streams.get(output.request_id)
        if stream is not None:
            put_soon(stream, output)

    def _fail_all(self, error: EngineError) -> None:
        """Abort every request the engine holds; their streams raise `error`. Requests
        still waiting in the command queue are not affected."""
        scheduler = self.engine.scheduler
        ids = [req.request_id for req in (*scheduler.running, *scheduler.waiting)]
        with self._cond:  # popped first: the ABORT outputs must not reach the streams
            streams = [s for i in ids if (s := self._streams.pop(i, None)) is not None]
        for request_id in ids:
            self._abort(request_id)
        for stream in streams:
            put_soon(stream, error)

    def _snapshot(self) -> EngineStats:
        return engine_stats(self.engine)

    def _shutdown(self) -> None:
        closed = EngineClosed(f"engine {self.config.name!r} shut down")
        self._fail_all(closed)
        with self._cond:
            commands, self._commands = self._commands, []
            streams, self._streams = self._streams, {}
        for command in commands:
            if isinstance(command, _Add) and command.accepted.set_running_or_notify_cancel():
                command.accepted.set_exception(closed)
        for stream in streams.values():
            put_soon(stream, closed)
        try:
            self.engine.close()
        except Exception:
            logger.exception("engine %r: close failed", self.config.name)
        self._stats = EngineStats()


def engine_stats(engine: Engine) -> EngineStats:
    """Read on the thread that drives `engine`."""
    kv_cache, scheduler = engine.kv_cache, engine.scheduler
    requests = (*scheduler.running, *scheduler.waiting)
    return EngineStats(
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        kv_free_blocks=kv_cache.free_blocks + engine.kv.num_evictable,
        kv_used_blocks=len({block for req in requests for block in req.block_ids}),
        kv_mapped_bytes=kv_cache.mapped_bytes,
    )


def put_soon(stream: RequestStream, item: RequestOutput | BaseException) -> None:
    """From any thread: hand `item` to `stream` on its event loop."""
    # RuntimeError: the stream's event loop is closed, nobody is listening any more.
    with contextlib.suppress(RuntimeError):
        stream.loop.call_soon_threadsafe(stream.put, item)
