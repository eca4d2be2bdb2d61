"""`AsyncWorker`: a `DeviceWorker` driven by its own thread, consumed from asyncio.

The worker is synchronous and not thread-safe, so every call into it — submit, abort,
step, wake, sleep, limits — happens on one dedicated thread. That thread takes commands
from a queue, runs `step()` while any model has work, and sleeps on a condition
otherwise. Each model is reached through an `AsyncModel`, which offers `AsyncEngine`'s
request interface (`add_request` → a `RequestStream`, capacity, stats), so the server
drives a model the same way whichever kind of engine is behind it.

After every loop iteration the thread stores a `WorkerSnapshot` (read from any thread)
and only then sends what the iteration produced — acceptances, outputs, answers to
wake/sleep — so whoever gets an answer sees a snapshot at least as new as its cause.

An exception from one model's engine step fails that model's requests (their streams
raise `EngineError`) and aborts them; other models' requests carry on, and so does the
thread. A failure the worker cannot pin on one model fails every request in flight.

Overload is refused, never queued without bound: a model holds at most `max_num_seqs`
running plus `max_waiting` waiting requests, the device at most `max_inflight` (its
`WorkerConfig`) in all; one more raises `Overloaded` at once, with a Retry-After
estimate. A request whose model cannot be woken within `wake_timeout_s` fails with
`WakeTimeout`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from prism.engine.async_engine import (
    EngineClosed,
    EngineError,
    EngineOverloaded,
    EngineStats,
    RequestStream,
    engine_stats,
    put_soon,
)
from prism.engine.engine import Engine, EngineConfig
from prism.engine.output import RequestOutput
from prism.engine.request import FinishReason
from prism.engine.sampling_params import SamplingParams
from prism.memory import PoolError, PoolStats
from prism.models.tokenizer import Tokenizer
from prism.serving.model_slot import ModelSlot, ModelSpec, ModelState
from prism.serving.worker import DeviceWorker, ModelStats, StepError, WorkerMode, WorkerStats

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_WAITING = 256
MAX_RETRY_AFTER_S = 60


class Overloaded(EngineOverloaded):
    """A model's or the device's bound on requests in flight is reached; retry after
    `retry_after_s` seconds."""

    def __init__(self, message: str, model: str, limit: int, retry_after_s: int) -> None:
        super().__init__(message)
        self.model = model
        self.limit = limit
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.model, self.limit, self.retry_after_s)


class WakeTimeout(EngineError):
    """The request's model could not be woken in time (memory held by other models'
    running requests); retry after `retry_after_s` seconds."""

    def __init__(self, message: str, model: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.model = model
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.model, self.retry_after_s)


class RequestRejected(EngineError):
    """The request was refused when its model woke (held for the wake, it met the
    engine's checks only then): a bad request, not a failure of the worker."""

    def __init__(self, message: str, model: str) -> None:
        super().__init__(message)
        self.model = model

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.model)


@dataclass(slots=True)
class Latency:
    """Recent mean seconds from a request's acceptance to its end (moving average)."""

    mean_s: float = 0.0
    weight: float = 0.1  # of the newest sample

    def record(self, seconds: float) -> None:
        if self.mean_s == 0.0:  # the first sample
            self.mean_s = seconds
        else:
            self.mean_s += self.weight * (seconds - self.mean_s)


def retry_after_s(waiting: int, in_flight: int, latency_s: float) -> int:
    """Seconds until `waiting` requests ahead have drained. By Little's law the device
    finishes `in_flight / latency_s` requests a second; at least 1, at most 60."""
    seconds = waiting * latency_s / max(1, in_flight)
    return min(MAX_RETRY_AFTER_S, max(1, math.ceil(seconds)))


class ModelConflict(RuntimeError):
    """The model's state (requests in flight, never woken) or the worker's mode rules the
    operation out for now."""


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """Taken on the worker thread after every loop iteration; safe to read anywhere."""

    worker: WorkerStats
    pool: PoolStats
    engines: Mapping[str, EngineStats]  # per model; running/waiting include queued-for-wake

    def model(self, name: str) -> ModelStats | None:
        return next((m for m in self.worker.models if m.name == name), None)


@dataclass(frozen=True, slots=True)
class _Add:
    model: str
    prompt: str | list[int]
    params: SamplingParams
    request_id: str
    accepted: concurrent.futures.Future[None]  # result: added; exception: why not


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class _Call:
    """Run `fn` on the worker thread; its result or exception goes to `done`."""

    fn: Callable[[], Any]
    done: concurrent.futures.Future[Any]


_Command = _Add | _Abort | _Call


class AsyncModel:
    """One model of an `AsyncWorker`, with `AsyncEngine`'s request interface."""

    def __init__(self, worker: AsyncWorker, slot: ModelSlot, max_waiting: int) -> None:
        self.name = slot.spec.name
        self.source = slot.spec.source
        self.config: EngineConfig = slot.spec.engine
        self.tokenizer: Tokenizer | None = slot.tokenizer
        self.vocab_size = slot.config.vocab_size
        self.weight_bytes = slot.weight_bytes
        self.kv_bytes_per_token = slot.config.kv_bytes_per_token(slot.dtype)
        self.max_waiting = max_waiting
        self.max_requests = self.config.max_num_seqs + max_waiting
        self.latency = Latency()  # written on the worker thread
        self.worker = worker
        self._slot = slot

    @property
    def is_running(self) -> bool:
        return self.worker.is_running

    @property
    def state(self) -> ModelState:
        stats = self.worker.stats().model(self.name)
        return ModelState(stats.state) if stats is not None else ModelState.CACHED

    @property
    def stats(self) -> EngineStats:
        return self.worker.stats().engines.get(self.name, EngineStats())

    @property
    def model_stats(self) -> ModelStats | None:
        return self.worker.stats().model(self.name)

    @property
    def engine(self) -> Engine | None:
        """The engine, once first woken. It belongs to the worker thread: read it from
        elsewhere only while the model is idle (tests, introspection)."""
        return self._slot.engine

    @property
    def num_in_flight(self) -> int:
        """Requests added and not yet finished, aborted or failed."""
        return self.worker.num_in_flight(self.name)

    def has_capacity(self, count: int) -> bool:
        return self.worker.overload(self.name, count) is None

    def check_capacity(self, count: int) -> None:
        """Raise `Overloaded` if `count` more requests would pass a bound."""
        if (error := self.worker.overload(self.name, count)) is not None:
            raise error

    async def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> RequestStream:
        return await self.worker.add_request(self.name, prompt, params, request_id)

    def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        return self.worker.generate(self.name, prompt, params, request_id)

    async def wake(self) -> bool:
        return await self.worker.wake(self.name)

    async def sleep(self) -> int:
        return await self.worker.sleep(self.name)

    async def set_kv_limit(self, kv_bytes: int) -> int:
        return await self.worker.set_kv_limit(self.name, kv_bytes)

    def _release(self, request_id: str) -> None:
        self.worker._release(self.name, request_id)


class AsyncWorker:
    """`generate(model, ...)` streams a request's outputs; `wake`/`sleep`/`set_kv_limit`
    run on the worker thread and return its answer."""

    def __init__(
        self, worker: DeviceWorker, *, max_waiting: int | Mapping[str, int] = DEFAULT_MAX_WAITING
    ) -> None:
        """`worker` with its models added (and woken, if they should be). `max_waiting`:
        requests per model beyond its running capacity (`max_num_seqs`) that may queue,
        one number for all or one per model; more are refused with `EngineOverloaded`."""
        self.worker = worker
        self.models: dict[str, AsyncModel] = {}
        for name, slot in worker.models.items():
            waiting = (
                max_waiting
                if isinstance(max_waiting, int)
                else max_waiting.get(name, DEFAULT_MAX_WAITING)
            )
            self.models[name] = AsyncModel(self, slot, waiting)
        self._cond = threading.Condition()
        # Guarded by _cond: the command queue, the streams in flight (model → request id →
        # stream), _stopping.
        self._commands: list[_Command] = []
        self._streams: dict[str, dict[str, RequestStream]] = {name: {} for name in self.models}
        self._since: dict[str, float] = {}  # request id -> when it was accepted
        self._stopping = False
        self.latency = Latency()  # over the device's requests; written on the worker thread
        self._replies: list[Callable[[], None]] = []  # worker thread only: sent after a snapshot
        self._stats = self._snapshot()
        self._thread = threading.Thread(
            target=self._run, name=f"worker-{worker.config.device}", daemon=True
        )
        self._thread.start()

    # ---- asyncio side ------------------------------------------------------------------

    @property
    def device(self) -> str:
        return self.worker.config.device

    @property
    def mode(self) -> WorkerMode:
        return self.worker.config.mode

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def stats(self) -> WorkerSnapshot:
        return self._stats

    def num_in_flight(self, model: str) -> int:
        return len(self._streams.get(model, ()))

    @property
    def total_in_flight(self) -> int:
        return len(self._since)

    def overload(self, model: str, count: int = 1) -> Overloaded | None:
        """Why `count` more requests for `model` would be refused, or None: its bound of
        `max_num_seqs` running + `max_waiting` waiting, or the device's `max_inflight`."""
        owner = self._model(model)
        in_flight = self.num_in_flight(model)
        if in_flight + count > owner.max_requests:
            retry = self._retry_after(model, in_flight)
            return Overloaded(
                f"model {model!r} has {in_flight} requests in flight, at most "
                f"{owner.max_requests} ({owner.config.max_num_seqs} running + "
                f"{owner.max_waiting} waiting); retry after {retry} s",
                model, owner.max_requests, retry,
            )  # fmt: skip
        limit = self.worker.config.max_inflight
        total = self.total_in_flight
        if limit is not None and total + count > limit:
            running = sum(m.running for m in self._stats.worker.models)
            retry = retry_after_s(total - running, total, self.latency.mean_s)
            return Overloaded(
                f"device {self.device} has {total} requests in flight over all its models, "
                f"at most {limit}; retry after {retry} s",
                model, limit, retry,
            )  # fmt: skip
        return None

    def _retry_after(self, model: str, in_flight: int) -> int:
        stats = self._stats.model(model)
        running = stats.running if stats is not None else 0
        return retry_after_s(in_flight - running, in_flight, self.models[model].latency.mean_s)

    async def add_request(
        self, model: str, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> RequestStream:
        """Queue a request for `model`; returns once the worker has taken it (a model that
        is not awake is woken, or the request waits for memory to wake it). Raises the
        engine's ValueError for a bad request, `EngineOverloaded` or `EngineClosed`."""
        owner = self._model(model)
        stream = RequestStream(request_id, owner)
        accepted: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise EngineClosed(f"the worker of {self.device} is shut down")
            if model not in self._streams:  # removed since `_model` found it
                raise KeyError(f"unknown model {model!r}; on this worker: {sorted(self.models)}")
            if any(request_id in streams for streams in self._streams.values()):
                raise ValueError(f"request id {request_id!r} is already in use")
            if (overloaded := self.overload(model)) is not None:
                raise overloaded
            self._streams[model][request_id] = stream
            self._since[request_id] = time.monotonic()
            self._commands.append(_Add(model, prompt, params, request_id, accepted))
            self._cond.notify()
        try:
            await asyncio.wrap_future(accepted)
        except BaseException:
            stream.close()
            raise
        return stream

    async def generate(
        self, model: str, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come; leaving early aborts the request."""
        stream = await self.add_request(model, prompt, params, request_id)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Abort a request; its stream (if still open) gets a final ABORT output."""
        self._submit(_Abort(request_id))

    async def add_model(
        self, spec: ModelSpec, max_waiting: int = DEFAULT_MAX_WAITING
    ) -> AsyncModel:
        """Load a model into host memory (CACHED) and serve it. The weights are read on a
        helper thread, so the models already here keep stepping meanwhile."""
        await self.call(partial(self.worker.check_new, spec))  # fail before loading
        slot = await asyncio.to_thread(ModelSlot, spec, self.device, self.worker.pool)
        try:
            await self.call(partial(self.worker.adopt, slot))
        except MemoryError:
            raise  # static mode could not wake it: the worker has closed it
        except BaseException:
            if self.worker.models.get(spec.name) is not slot:  # not adopted after all
                slot.close()
            raise
        model = AsyncModel(self, slot, max_waiting)
        with self._cond:
            self._streams[spec.name] = {}
            self.models[spec.name] = model
        return model

    async def remove_model(self, model: str) -> None:
        """Stop serving `model` and free its host copy and device memory. Raises
        `ModelConflict` while it has requests in flight."""
        self._model(model)
        await self.call(partial(self._remove_now, model))

    async def wake(self, model: str) -> bool:
        """Make `model` resident; False if the memory cannot be had now."""
        self._model(model)
        return await self.call(partial(self.worker.wake, model))

    async def sleep(self, model: str) -> int:
        """Put an idle model to sleep; returns bytes given back to the pool. Raises
        `ModelConflict` if it has requests in flight or the mode never sleeps models."""
        self._model(model)
        return await self.call(partial(self._sleep_now, model))

    async def set_kv_limit(self, model: str, kv_bytes: int) -> int:
        """Cap a model's KV cache; returns bytes it still holds beyond the cap (held by
        running requests). `ModelConflict` before its first wake; ValueError below the
        cache's minimum."""
        self._model(model)
        return await self.call(partial(self._set_kv_limit_now, model, kv_bytes))

    def close(self) -> None:
        """Fail every request in flight with `EngineClosed`, stop the thread, close the
        worker. Blocks for at most the step in progress."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _model(self, name: str) -> AsyncModel:
        model = self.models.get(name)
        if model is None:
            raise KeyError(f"unknown model {name!r}; on this worker: {sorted(self.models)}")
        return model

    async def call(self, fn: Callable[[], T]) -> T:
        """`fn()` run on the worker thread (between steps), e.g. `worker.check_integrity`."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise EngineClosed(f"the worker of {self.device} is shut down")
            self._commands.append(_Call(fn, done))
            self._cond.notify()
        return await asyncio.wrap_future(done)

    def _release(self, model: str, request_id: str) -> None:
        """A stream was closed: abort its request unless the worker is done with it."""
        with self._cond:
            if self._forget(model, request_id) is not None:
                self._commands.append(_Abort(request_id))
                self._cond.notify()

    def _forget(self, model: str, request_id: str) -> RequestStream | None:
        """Under _cond: stop tracking a request; its stream, if it was still tracked."""
        self._since.pop(request_id, None)
        return self._streams.get(model, {}).pop(request_id, None)

    def _submit(self, command: _Command) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    # ---- worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        while (commands := self._wait_for_work()) is not None:
            for command in commands:
                self._apply(command)
            if self.worker.has_work():
                self._step()
                self._expire_wakes()
                self._reject_refused()
            self._stats = self._snapshot()
            self._send_replies()
        self._shutdown()

    def _wait_for_work(self) -> list[_Command] | None:
        """The pending commands once there is something to do; None when stopping."""
        with self._cond:
            while not (self._commands or self._stopping or self.worker.has_work()):
                self._cond.wait()
            if self._stopping:
                return None
            commands, self._commands = self._commands, []
            return commands

    def _apply(self, command: _Command) -> None:
        if isinstance(command, _Add):
            self._add(command)
        elif isinstance(command, _Abort):
            self._abort(command.request_id)
        elif command.done.set_running_or_notify_cancel():  # not given up on by the caller
            try:
                result = command.fn()
            except Exception as e:
                self._replies.append(partial(command.done.set_exception, e))
            else:
                self._replies.append(partial(command.done.set_result, result))

    def _add(self, command: _Add) -> None:
        if not command.accepted.set_running_or_notify_cancel():
            return  # the caller gave up before the request reached the worker
        try:
            self.worker.submit(command.model, command.prompt, command.params, command.request_id)
        except Exception as e:
            with self._cond:
                self._forget(command.model, command.request_id)
            if not isinstance(e, ValueError):  # ValueError: the request itself is bad
                logger.exception("worker %s: adding %s failed", self.device, command.request_id)
                e = EngineError(f"model {command.model!r}: {type(e).__name__}: {e}")
            self._replies.append(partial(command.accepted.set_exception, e))
            return
        self._replies.append(partial(command.accepted.set_result, None))

    def _abort(self, request_id: str) -> None:
        try:
            output = self.worker.abort(request_id)
        except Exception:
            logger.exception("worker %s: abort of %s failed", self.device, request_id)
            return
        with self._cond:
            model = next((m for m, s in self._streams.items() if request_id in s), None)
        if model is None:
            return  # released: nobody listens
        if output is None:  # it was waiting for its model to wake: the engine never saw it
            output = RequestOutput(request_id, [], "", True, FinishReason.ABORT, 0, 0, 0)
        self._deliver(model, output)

    def _step(self) -> None:
        failed: dict[str, EngineError] = {}
        try:
            outputs = self.worker.step()
        except StepError as e:
            for name, error in e.errors.items():
                logger.error("worker %s: step of %r failed", self.device, name, exc_info=error)
            outputs = e.outputs
            failed = {
                name: EngineError(f"model {name!r}: engine step failed: {type(x).__name__}: {x}")
                for name, x in e.errors.items()
            }
        except Exception as e:
            logger.exception("worker %s: step failed", self.device)
            error = EngineError(f"worker step failed: {type(e).__name__}: {e}")
            outputs, failed = [], dict.fromkeys(self.models, error)
        for model, output in outputs:
            self._deliver(model, output)
        for model, error in failed.items():
            self._fail(model, error)

    def _deliver(self, model: str, output: RequestOutput) -> None:
        since = None
        with self._cond:
            if output.finished:
                since = self._since.get(output.request_id)
                stream = self._forget(model, output.request_id)
            else:
                stream = self._streams.get(model, {}).get(output.request_id)
        if since is not None and model in self.models:
            seconds = time.monotonic() - since
            self.models[model].latency.record(seconds)
            self.latency.record(seconds)
        if stream is not None:
            self._replies.append(partial(put_soon, stream, output))

    def _fail(self, model: str, error: EngineError) -> None:
        """Abort every request of `model` the worker holds; their streams raise `error`.
        Requests still in the command queue are not affected."""
        with self._cond:  # taken first: the ABORT outputs must not reach the streams
            queued = {c.request_id for c in self._commands if isinstance(c, _Add)}
            registered = self._streams.get(model, {})
            streams = {i: s for i, s in registered.items() if i not in queued}
            for request_id in streams:
                self._forget(model, request_id)
        engine = self.worker.models[model].engine
        scheduler = engine.scheduler if engine is not None else None
        held = [r.request_id for r in (*scheduler.running, *scheduler.waiting)] if scheduler else []
        for request_id in dict.fromkeys([*streams, *held]):
            try:
                self.worker.abort(request_id)
            except Exception:
                logger.exception("worker %s: abort of %s failed", self.device, request_id)
        for stream in streams.values():
            self._replies.append(partial(put_soon, stream, error))

    def _expire_wakes(self) -> None:
        """Fail the requests that waited too long for their model to wake."""
        timeout = self.worker.config.wake_timeout_s
        for model, request_id in self.worker.expire_pending():
            with self._cond:
                stream = self._forget(model, request_id)
            if stream is None:
                continue
            retry = min(MAX_RETRY_AFTER_S, max(1, math.ceil(self.latency.mean_s)))
            error = WakeTimeout(
                f"model {model!r} could not be woken within {timeout:g} s: the device's "
                f"memory is held by other models' running requests; retry after {retry} s",
                model, retry,
            )  # fmt: skip
            self._replies.append(partial(put_soon, stream, error))

    def _reject_refused(self) -> None:
        """Fail the requests refused once their model woke (`DeviceWorker.take_rejected`)."""
        for model, request_id, why in self.worker.take_rejected():
            with self._cond:
                stream = self._forget(model, request_id)
            if stream is not None:
                error = RequestRejected(f"model {model!r}: {why}", model)
                self._replies.append(partial(put_soon, stream, error))

    def _sleep_now(self, model: str) -> int:
        slot = self.worker.models[model]
        if self.mode is WorkerMode.STATIC:
            raise ModelConflict("static mode never sleeps models")
        stats = self._stats.model(model)
        if not slot.idle:
            running, waiting = (stats.running, stats.waiting) if stats else (0, 0)
            raise ModelConflict(
                f"model {model!r} has requests in flight ({running} running, {waiting} "
                "waiting); it can sleep once they finish"
            )
        return self.worker.sleep(model)

    def _remove_now(self, model: str) -> None:
        with self._cond:
            if self._streams[model]:
                raise ModelConflict(
                    f"model {model!r} has {len(self._streams[model])} requests in flight"
                )
            del self._streams[model]  # no request can be added from here on
            del self.models[model]
        self.worker.remove_model(model)  # idle: its streams were its only requests

    def _set_kv_limit_now(self, model: str, kv_bytes: int) -> int:
        if self.worker.models[model].engine is None:
            raise ModelConflict(f"model {model!r} has no KV cache before its first wake")
        try:
            return self.worker.set_kv_limit(model, kv_bytes)
        except PoolError as e:
            raise ValueError(f"kv_bytes: {e}") from e

    def _snapshot(self) -> WorkerSnapshot:
        stats = self.worker.stats()
        engines = {}
        for model in stats.models:
            engine = self.worker.models[model.name].engine
            kv = engine_stats(engine) if engine is not None else EngineStats()
            engines[model.name] = dataclasses.replace(
                kv, num_running=model.running, num_waiting=model.waiting
            )
        return WorkerSnapshot(stats, self.worker.pool.stats(), engines)

    def _send_replies(self) -> None:
        replies, self._replies = self._replies, []
        for reply in replies:
            reply()

    def _shutdown(self) -> None:
        closed = EngineClosed(f"the worker of {self.device} shut down")
        for model in list(self.models):
            self._fail(model, closed)
        with self._cond:
            commands, self._commands = self._commands, []
        for command in commands:
            if isinstance(command, _Add):
                future: concurrent.futures.Future[Any] = command.accepted
            elif isinstance(command, _Call):
                future = command.done
            else:
                continue
            if future.set_running_or_notify_cancel():
                future.set_exception(closed)
        self._send_replies()
        try:
            self.worker.close()
        except Exception:
            logger.exception("worker %s: close failed", self.device)
