"""`ModelRegistry`: the models the server answers for, by name.

Every model lives on the `AsyncWorker` of its device: one `DeviceWorker` (one page pool)
per device, hosting all of that device's models, which sleep and wake as memory and
load demand. Routes only ever `get(name)` a `ServedModel` and iterate `models()`; its
`engine` (the model's `AsyncModel`) takes requests and wakes the model when it is not
resident. `Registry`, `ModelEngine` and `ModelWorker` are what the routes use of them:
`FleetRegistry` (fleet_registry.py) gives the same surface over the multi-device
`Controller`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from prism.engine.async_engine import EngineStats
from prism.engine.engine import EngineConfig
from prism.engine.output import RequestOutput
from prism.engine.sampling_params import SamplingParams
from prism.models.tokenizer import Tokenizer
from prism.serving import model_slot
from prism.serving.async_worker import AsyncModel, AsyncWorker, WorkerSnapshot
from prism.serving.worker import DeviceWorker, ModelStats, WorkerConfig, WorkerMode

logger = logging.getLogger(__name__)


class ModelState(Enum):
    REGISTERED = "registered"  # known; weights only on disk (host copy dropped)
    CACHED = "cached"  # weights in host memory, nothing on the device yet
    ACTIVE = "active"  # resident on the device, serving
    ASLEEP = "asleep"  # device memory given back; the next request wakes it
    STOPPED = "stopped"  # its worker is shut down


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    source: str  # HF directory or GGUF file


class OutputStream(Protocol):
    """One request's outputs; closing it before the end aborts the request."""

    @property
    def finished(self) -> bool: ...

    def __aiter__(self) -> OutputStream: ...

    async def __anext__(self) -> RequestOutput: ...

    def close(self) -> None: ...


class ModelWorker(Protocol):
    """The worker of one device, as the admin routes and metrics read it."""

    @property
    def device(self) -> str: ...

    @property
    def mode(self) -> WorkerMode: ...

    @property
    def is_running(self) -> bool: ...

    def stats(self) -> WorkerSnapshot:
        """The latest snapshot (never waits)."""
        ...


class ModelEngine(Protocol):
    """One served model's requests and admin calls: `AsyncModel` in-process,
    `RoutedModel` over the controller."""

    @property
    def config(self) -> EngineConfig: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def weight_bytes(self) -> int: ...

    @property
    def max_requests(self) -> int: ...

    @property
    def worker(self) -> ModelWorker: ...

    @property
    def is_running(self) -> bool: ...

    @property
    def state(self) -> model_slot.ModelState: ...

    @property
    def stats(self) -> EngineStats: ...

    @property
    def model_stats(self) -> ModelStats | None: ...

    def check_capacity(self, count: int) -> None: ...

    async def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> OutputStream: ...

    async def wake(self) -> bool: ...

    async def sleep(self) -> int: ...

    async def set_kv_limit(self, kv_bytes: int) -> int: ...


@dataclass(frozen=True, slots=True)
class ServedModel:
    name: str
    source: str
    engine: ModelEngine  # takes its requests (and wakes it) on its device's worker
    tokenizer: Tokenizer
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def state(self) -> ModelState:
        if not self.engine.is_running:
            return ModelState.STOPPED
        return ModelState(self.engine.state.value)

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    @property
    def worker(self) -> ModelWorker:
        return self.engine.worker


class Registry(Protocol):
    """What the server needs of its models: `ModelRegistry` (one device, in-process) or
    `FleetRegistry` (a fleet over the controller). `start` and `stop` run on the
    server's event loop, at its start and end."""

    @property
    def workers(self) -> Sequence[ModelWorker]: ...

    def get(self, name: str) -> ServedModel | None: ...

    def models(self) -> list[ServedModel]: ...

    def __iter__(self) -> Iterator[ServedModel]: ...

    def __len__(self) -> int: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ModelRegistry:
    def __init__(self, workers: Sequence[AsyncWorker] = ()) -> None:
        self.workers: list[AsyncWorker] = []
        self._models: dict[str, ServedModel] = {}
        for worker in workers:
            self.add_worker(worker)

    @classmethod
    def load(
        cls,
        specs: list[ModelSpec],
        *,
        worker: WorkerConfig | None = None,
        engine: EngineConfig | None = None,
        preload: bool = False,
        max_waiting: int = 256,
        max_kv_bytes: int | None = None,
    ) -> ModelRegistry:
        """One worker for `worker.device` with every model of `specs` loaded into host
        memory (CACHED; their first request wakes them), or woken now with `preload`
        as far as the budget allows. `max_kv_bytes` caps each model's KV cache (its
        share, which `static` mode needs)."""
        device = DeviceWorker(worker or WorkerConfig())
        try:
            for spec in specs:
                _add_model(device, spec, engine or EngineConfig(), max_kv_bytes)
            if preload:
                _preload(device)
            async_worker = AsyncWorker(device, max_waiting=max_waiting)
        except BaseException:
            device.close()
            raise
        try:
            return cls([async_worker])
        except BaseException:
            async_worker.close()
            raise

    def add_worker(self, worker: AsyncWorker) -> None:
        """Serve every model of `worker` (each needs a tokenizer and a unique name)."""
        for name, model in worker.models.items():
            if name in self._models:
                raise ValueError(f"model {name!r} is already registered")
            if model.tokenizer is None:
                raise ValueError(f"model {name!r} has no tokenizer; the server needs one")
        for name, model in worker.models.items():
            assert model.tokenizer is not None
            self._models[name] = ServedModel(name, _source(model), model, model.tokenizer)
        self.workers.append(worker)

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.models())

    def __len__(self) -> int:
        return len(self._models)

    async def start(self) -> None:
        """Nothing to do: the workers run from construction."""

    async def stop(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


def _add_model(
    device: DeviceWorker, spec: ModelSpec, engine: EngineConfig, max_kv_bytes: int | None
) -> None:
    config = dataclasses.replace(engine, name=spec.name)
    slot = device.add_model(
        model_slot.ModelSpec(spec.name, spec.source, max_kv_bytes=max_kv_bytes, engine=config)
    )
    budget = device.config.budget_bytes
    if slot.weight_bytes > budget:
        raise ValueError(
            f"model {spec.name!r} needs {slot.weight_bytes / 2**30:.2f} GiB for its weights; "
            f"the device budget is {budget / 2**30:.2f} GiB"
        )


def _preload(device: DeviceWorker) -> None:
    for name in device.models:
        if not device.wake(name):
            logger.warning("model %s does not fit beside the others: it wakes on demand", name)


def _source(model: AsyncModel) -> str:
    source = model.source
    return source if isinstance(source, str) else f"random {source.architecture}"


def default_name(source: str | Path) -> str:
    """A model name from its path: the directory name, or the file name up to the first
    dot (`SmolLM2-135M-Instruct.Q4_1.gguf` → `SmolLM2-135M-Instruct`)."""
    path = Path(source)
    return path.name.split(".")[0] if path.suffix == ".gguf" else path.name
