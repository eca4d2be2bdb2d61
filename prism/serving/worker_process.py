"""A device's worker in a child process, and `ProcessWorker`, the controller's end of it.

Transport: a `multiprocessing` child started with `spawn` (a fresh interpreter: no CUDA
state inherited) and one duplex pipe. Messages are the frozen dataclasses below, pickled;
each side sends a *list* of them per write, gathered over one turn of its event loop, so
a decode step of many requests costs one write, not one per token. Errors cross as
`RemoteError` (class name and message) and are raised again as the same class on the
other side when it is one the API documents, else as `RuntimeError`.

The child runs a `LocalWorker` on an asyncio loop: `Call`s become its methods, each
`Submit` a task that forwards the request's outputs. The parent's reader thread hands
what arrives to its event loop; when the pipe breaks (the child died: killed, out of
memory, a native crash), every call and request still open fails with `WorkerCrashed`
and `on_exit` tells the controller. If the parent dies, the child sees the pipe break and
shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from prism.engine.async_engine import (
    EngineClosed,
    EngineError,
    EngineOverloaded,
    RequestStream,
)
from prism.engine.output import RequestOutput
from prism.engine.sampling_params import SamplingParams
from prism.memory import PoolError
from prism.serving.async_worker import (
    DEFAULT_MAX_WAITING,
    ModelConflict,
    Overloaded,
    RequestRejected,
    WakeTimeout,
    WorkerSnapshot,
)
from prism.serving.model_slot import ModelSpec
from prism.serving.worker import WorkerConfig
from prism.serving.worker_client import LocalWorker, ModelInfo, WorkerClient, WorkerCrashed

logger = logging.getLogger(__name__)

# ---- messages: controller → worker --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    call_id: int
    method: str  # one of CALLS
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Submit:
    call_id: int  # answered by a Reply once the worker has taken (or refused) it
    model: str
    prompt: str | list[int]
    params: SamplingParams
    request_id: str


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


# ---- messages: worker → controller --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteError:
    kind: str  # exception class name
    message: str
    # Errors whose fields the server answers with (Retry-After) travel whole (pickled).
    exception: Exception | None = None


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int


@dataclass(frozen=True, slots=True)
class Reply:
    call_id: int
    value: Any = None
    error: RemoteError | None = None


@dataclass(frozen=True, slots=True)
class Output:
    request_id: str
    output: RequestOutput


@dataclass(frozen=True, slots=True)
class Failed:
    """The request ended with an error (its engine failed, the worker shut down)."""

    request_id: str
    error: RemoteError


CALLS = frozenset(
    {"add_model", "remove_model", "wake", "sleep", "set_kv_limit", "stats", "check_integrity"}
)
# Raised again as themselves on the controller's side; anything else as RuntimeError.
_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        WorkerCrashed, EngineClosed, EngineOverloaded, EngineError, ModelConflict, PoolError,
        FileNotFoundError, KeyError, ValueError, TypeError, MemoryError, RuntimeError,
    )
}  # fmt: skip


def encode_error(error: BaseException) -> RemoteError:
    kind = next((c.__name__ for c in type(error).__mro__ if c.__name__ in _ERRORS), "RuntimeError")
    message = str(error.args[0]) if len(error.args) == 1 else str(error)
    whole = error if isinstance(error, (Overloaded, WakeTimeout, RequestRejected)) else None
    return RemoteError(kind, message, whole)


def decode_error(error: RemoteError) -> Exception:
    if error.exception is not None:
        return error.exception
    return _ERRORS.get(error.kind, RuntimeError)(error.message)


# ---- the child --------------------------------------------------------------------------


def worker_main(
    conn: Connection,
    worker_id: str,
    config: WorkerConfig,
    budget_fraction: float | None,
    threads: int | None,
) -> None:
    """Entry point of the worker process."""
    logging.basicConfig(level=logging.WARNING, format=f"[worker {worker_id}] %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if threads is not None:
        torch.set_num_threads(threads)
    worker = LocalWorker(worker_id, config, budget_fraction=budget_fraction)
    asyncio.run(_WorkerServer(conn, worker).serve())


class _WorkerServer:
    """Serves one `LocalWorker` over the pipe until `Shutdown` or the pipe breaks."""

    def __init__(self, conn: Connection, worker: LocalWorker) -> None:
        self.conn = conn
        self.worker = worker
        self.outbox: list[object] = []
        self.streams: dict[str, RequestStream] = {}
        self.submitting: set[str] = set()  # submitted, not yet taken by the worker
        self.aborted: set[str] = set()  # of those, aborted meanwhile
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        await self.worker.start()
        threading.Thread(target=self._read, name="worker-pipe", daemon=True).start()
        self._send(Ready(os.getpid()))
        await self.stopped.wait()
        await self.worker.close()  # open streams end with EngineClosed: sent as Failed
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self._flush()
        self.conn.close()

    def _read(self) -> None:
        """Reader thread: messages to the loop; a broken pipe means the controller is gone."""
        while True:
            try:
                messages = self.conn.recv()
            except (EOFError, OSError):
                messages = [Shutdown()]
            self.loop.call_soon_threadsafe(self._dispatch, messages)
            if any(isinstance(m, Shutdown) for m in messages):
                return

    def _dispatch(self, messages: list[object]) -> None:
        for message in messages:
            if isinstance(message, Call):
                self._spawn(self._call(message))
            elif isinstance(message, Submit):
                self.submitting.add(message.request_id)
                self._spawn(self._serve_request(message))
            elif isinstance(message, Abort):
                if message.request_id in self.streams:
                    self.worker.abort(message.request_id)
                elif message.request_id in self.submitting:
                    self.aborted.add(message.request_id)  # aborted once the worker has it
            elif isinstance(message, Shutdown):
                self.stopped.set()

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _call(self, call: Call) -> None:
        try:
            if call.method not in CALLS:
                raise ValueError(f"unknown worker call {call.method!r}")
            value = await getattr(self.worker, call.method)(*call.args)
        except Exception as e:
            self._send(Reply(call.call_id, error=encode_error(e)))
        else:
            self._send(Reply(call.call_id, value))

    async def _serve_request(self, submit: Submit) -> None:
        request_id = submit.request_id
        try:
            stream = await self.worker.add_request(
                submit.model, submit.prompt, submit.params, request_id
            )
        except Exception as e:
            self._send(Reply(submit.call_id, error=encode_error(e)))
            return
        finally:
            self.submitting.discard(request_id)
        self._send(Reply(submit.call_id))
        self.streams[request_id] = stream
        if request_id in self.aborted:
            self.aborted.discard(request_id)
            self.worker.abort(request_id)
        try:
            async for output in stream:
                self._send(Output(request_id, output))
        except Exception as e:
            self._send(Failed(request_id, encode_error(e)))
        finally:
            stream.close()
            del self.streams[request_id]

    def _send(self, message: object) -> None:
        if not self.outbox:
            self.loop.call_soon(self._flush)  # after what else this turn of the loop sends
        self.outbox.append(message)

    def _flush(self) -> None:
        messages, self.outbox = self.outbox, []
        if messages and not self.conn.closed:
            try:
                self.conn.send(messages)
            except OSError:  # the controller is gone
                self.stopped.set()


# ---- the controller's end -----------------------------------------------------------------


class ProcessWorker(WorkerClient):
    """A `WorkerClient` whose worker runs in a child process (one per device)."""

    def __init__(
        self,
        worker_id: str,
        config: WorkerConfig,
        *,
        budget_fraction: float | None = None,
        threads: int | None = None,
        start_timeout_s: float = 300.0,
    ) -> None:
        """`budget_fraction`: as `LocalWorker`'s, measured in the child. `threads`: torch's
        CPU threads in the child (several CPU workers on one host split its cores: two
        processes spinning on the same cores each run many times slower)."""
        super().__init__(worker_id, config)
        self.budget_fraction = budget_fraction
        self.threads = threads
        self.start_timeout_s = start_timeout_s
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._streams: dict[str, RequestStream] = {}
        self._ready: asyncio.Future[int] | None = None
        self._closing = False
        self._lost: EngineError | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return (
            self._process is not None
            and self._lost is None
            and not self._closing
            and self._ready is not None
            and self._ready.done()
        )

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe(duplex=True)
        self._process = context.Process(
            target=worker_main,
            args=(child, self.worker_id, self.config, self.budget_fraction, self.threads),
            name=f"prism-worker-{self.worker_id}",
            daemon=True,
        )
        self._ready = self._loop.create_future()
        await asyncio.to_thread(self._process.start)
        child.close()
        threading.Thread(target=self._read, name=f"pipe-{self.worker_id}", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self.start_timeout_s)
        except BaseException:
            self.kill()
            raise

    async def close(self) -> None:
        if self._process is None or self._closing:
            return
        self._closing = True
        self._post([Shutdown()])
        await asyncio.to_thread(self._process.join, 30)
        if self._process.is_alive():
            self.kill()
            await asyncio.to_thread(self._process.join, 5)
        self._fail_all(EngineClosed(f"worker {self.worker_id} shut down"))

    def kill(self) -> None:
        """SIGKILL the child (tests; a worker that does not stop)."""
        if self._process is not None and self._process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._process.pid, signal.SIGKILL)

    # ---- the worker API ----------------------------------------------------------------

    async def add_model(self, spec: ModelSpec, max_waiting: int = DEFAULT_MAX_WAITING) -> ModelInfo:
        info: ModelInfo = await self._call("add_model", spec, max_waiting)
        return info

    async def remove_model(self, name: str) -> None:
        await self._call("remove_model", name)

    async def wake(self, name: str) -> bool:
        return bool(await self._call("wake", name))

    async def sleep(self, name: str) -> int:
        return int(await self._call("sleep", name))

    async def set_kv_limit(self, name: str, kv_bytes: int) -> int:
        return int(await self._call("set_kv_limit", name, kv_bytes))

    async def stats(self) -> WorkerSnapshot:
        snapshot: WorkerSnapshot = await self._call("stats")
        return snapshot

    async def check_integrity(self) -> None:
        await self._call("check_integrity")

    async def add_request(
        self, model: str, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> RequestStream:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        try:
            await self._request(lambda call_id: Submit(call_id, model, prompt, params, request_id))
        except BaseException:
            stream.close()  # aborts it in the worker, if it got there
            raise
        return stream

    def abort(self, request_id: str) -> None:
        if request_id in self._streams:
            self._post([Abort(request_id)])

    def _release(self, request_id: str) -> None:
        """A stream was closed: abort its request unless it has ended."""
        if self._streams.pop(request_id, None) is not None:
            self._post([Abort(request_id)])

    # ---- transport ---------------------------------------------------------------------

    async def _call(self, method: str, *args: Any) -> Any:
        return await self._request(lambda call_id: Call(call_id, method, args))

    async def _request(self, message: Callable[[int], object]) -> Any:
        if self._lost is not None:
            raise self._lost
        if self._closing or self._conn is None:
            raise EngineClosed(f"worker {self.worker_id} is shut down")
        call_id = next(self._ids)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._calls[call_id] = future
        self._post([message(call_id)])
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _post(self, messages: list[object]) -> None:
        if self._conn is None or self._lost is not None:
            return
        with self._send_lock, contextlib.suppress(OSError):  # a dead child: _read reports it
            self._conn.send(messages)

    def _read(self) -> None:
        """Reader thread: messages to the event loop until the pipe breaks."""
        assert self._conn is not None and self._process is not None
        while True:
            try:
                messages = self._conn.recv()
            except (EOFError, OSError):
                break
            if not self._to_loop(self._dispatch, messages):
                return
        self._process.join(timeout=5)
        self._to_loop(self._on_lost, self._process.exitcode)

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False
        return True

    def _dispatch(self, messages: list[object]) -> None:
        for message in messages:
            if isinstance(message, Output):
                output = message.output
                if output.finished:
                    stream = self._streams.pop(message.request_id, None)
                else:
                    stream = self._streams.get(message.request_id)
                if stream is not None:
                    stream.put(output)
            elif isinstance(message, Reply):
                future = self._calls.get(message.call_id)
                if future is None or future.done():
                    continue
                if message.error is not None:
                    future.set_exception(decode_error(message.error))
                else:
                    future.set_result(message.value)
            elif isinstance(message, Failed):
                stream = self._streams.pop(message.request_id, None)
                if stream is not None:
                    stream.put(decode_error(message.error))
            elif isinstance(message, Ready) and self._ready and not self._ready.done():
                self._ready.set_result(message.pid)

    def _on_lost(self, exitcode: int | None) -> None:
        """The pipe broke: a crash unless we asked the worker to stop."""
        if self._closing:
            self._fail_all(EngineClosed(f"worker {self.worker_id} shut down"))
            return
        error = WorkerCrashed(
            f"worker {self.worker_id} (pid {self.pid}) exited unexpectedly "
            f"(exit code {exitcode}); its requests in flight are lost"
        )
        self._lost = error
        started = self._had_started()
        self._fail_all(error)
        if started and self.on_exit is not None:  # a failed start is start()'s to raise
            self.on_exit(self, error)

    def _had_started(self) -> bool:
        ready = self._ready
        return (
            ready is not None and ready.done() and not ready.cancelled() and not ready.exception()
        )

    def _fail_all(self, error: EngineError) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # start() may have given up waiting: retrieved here
        calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(error)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(error)
