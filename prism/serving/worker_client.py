"""`WorkerClient`: the worker API the controller uses, and `LocalWorker`, its in-process form.

One client stands for one device's worker: models come and go (`add_model`,
`remove_model`), wake, sleep and get limits; requests are added (`add_request` → a
`RequestStream` of their outputs) and aborted; `stats()` is the worker's latest snapshot.
Two implementations: `LocalWorker` (an `AsyncWorker` in this process: tests, one-device
serving, and the body of every worker process) and `ProcessWorker` (the same worker in a
child process, in `worker_process.py`). A worker that dies fails every request in flight
with `WorkerCrashed` and reports itself through `on_exit`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch

from prism.engine.async_engine import EngineClosed, EngineError, RequestStream
from prism.engine.sampling_params import SamplingParams
from prism.serving.async_worker import DEFAULT_MAX_WAITING, AsyncModel, AsyncWorker, WorkerSnapshot
from prism.serving.model_slot import ModelSpec
from prism.serving.worker import DeviceWorker, WorkerConfig


class WorkerCrashed(EngineError):
    """The worker process serving this request died; the request is lost."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the worker reports of a model it has loaded."""

    name: str
    weight_bytes: int
    kv_bytes_per_token: int
    max_model_len: int
    vocab_size: int
    has_tokenizer: bool


ExitHandler = Callable[["WorkerClient", EngineError], None]


class WorkerClient(ABC):
    """One device's worker as the controller sees it. Every method runs on the event loop
    that called `start()`."""

    def __init__(self, worker_id: str, config: WorkerConfig) -> None:
        self.worker_id = worker_id  # "cpu:0", "cuda:1": unique in a fleet
        self.config = config
        self.on_exit: ExitHandler | None = None  # called once if the worker dies unasked

    @property
    @abstractmethod
    def alive(self) -> bool:
        """Started, not closed, not crashed."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None:
        """Stop the worker; requests in flight end with `EngineClosed`."""

    @abstractmethod
    async def add_model(self, spec: ModelSpec, max_waiting: int = DEFAULT_MAX_WAITING) -> ModelInfo:
        """Load `spec` into host memory (CACHED); its first request wakes it."""

    @abstractmethod
    async def remove_model(self, name: str) -> None: ...

    @abstractmethod
    async def wake(self, name: str) -> bool:
        """Make `name` resident; False if the memory cannot be had now."""

    @abstractmethod
    async def sleep(self, name: str) -> int:
        """Put an idle model to sleep; bytes given back. `ModelConflict` if it is busy."""

    @abstractmethod
    async def set_kv_limit(self, name: str, kv_bytes: int) -> int:
        """Cap a model's KV cache; bytes it still holds beyond the cap."""

    @abstractmethod
    async def add_request(
        self, model: str, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> RequestStream:
        """Queue a request; its outputs come through the stream (closing it aborts)."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Abort a request; its stream gets a final ABORT output."""

    @abstractmethod
    async def stats(self) -> WorkerSnapshot: ...

    @abstractmethod
    async def check_integrity(self) -> None:
        """The worker's pool and caches are consistent (raises if not)."""


class LocalWorker(WorkerClient):
    """The worker in this process: an `AsyncWorker` over a `DeviceWorker`."""

    def __init__(
        self,
        worker_id: str,
        config: WorkerConfig,
        *,
        budget_fraction: float | None = None,
        threads: int | None = None,
    ) -> None:
        """`budget_fraction`: set the budget at start to this share of the device's free
        memory (measured here, in the process that owns the device). `threads` is for a
        worker that owns its process (`ProcessWorker`); in-process, torch's threads are
        the caller's and are left as they are."""
        super().__init__(worker_id, config)
        self.budget_fraction = budget_fraction
        self._worker: AsyncWorker | None = None

    @property
    def alive(self) -> bool:
        return self._worker is not None and self._worker.is_running

    @property
    def worker(self) -> AsyncWorker:
        if self._worker is None:
            raise EngineClosed(f"worker {self.worker_id} is not started")
        return self._worker

    async def start(self) -> None:
        if self.budget_fraction is not None:
            budget = int(free_device_memory(self.config.device) * self.budget_fraction)
            self.config = dataclasses.replace(self.config, budget_bytes=budget)
        device = await asyncio.to_thread(DeviceWorker, self.config)
        self._worker = AsyncWorker(device)

    async def close(self) -> None:
        if self._worker is not None:
            await asyncio.to_thread(self._worker.close)

    async def add_model(self, spec: ModelSpec, max_waiting: int = DEFAULT_MAX_WAITING) -> ModelInfo:
        return model_info(await self.worker.add_model(spec, max_waiting))

    async def remove_model(self, name: str) -> None:
        await self.worker.remove_model(name)

    async def wake(self, name: str) -> bool:
        return await self.worker.wake(name)

    async def sleep(self, name: str) -> int:
        return await self.worker.sleep(name)

    async def set_kv_limit(self, name: str, kv_bytes: int) -> int:
        return await self.worker.set_kv_limit(name, kv_bytes)

    async def add_request(
        self, model: str, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> RequestStream:
        return await self.worker.add_request(model, prompt, params, request_id)

    def abort(self, request_id: str) -> None:
        self.worker.abort(request_id)

    async def stats(self) -> WorkerSnapshot:
        return self.worker.stats()

    async def check_integrity(self) -> None:
        await self.worker.call(self.worker.worker.check_integrity)


def model_info(model: AsyncModel) -> ModelInfo:
    return ModelInfo(
        name=model.name,
        weight_bytes=model.weight_bytes,
        kv_bytes_per_token=model.kv_bytes_per_token,
        max_model_len=model.config.max_model_len,
        vocab_size=model.vocab_size,
        has_tokenizer=model.tokenizer is not None,
    )


def free_device_memory(device: str) -> int:
    """Bytes free on `device` now (host RAM available, for the CPU)."""
    if device == "cpu":
        return int(psutil.virtual_memory().available)
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free)
