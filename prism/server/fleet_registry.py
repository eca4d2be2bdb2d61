"""`FleetRegistry`: the server's models served by a multi-device `Controller`.

The same surface as `ModelRegistry` (see `Registry` in registry.py), so routes, admin
and metrics do not know which one they serve. Each model is a `RoutedModel`: its
requests and admin calls go through the controller, which routes them to the worker
currently holding the model (waking, placing and restarting as it does); its state and
stats come from that worker's latest snapshot. Each device is a `FleetWorker`.

Prompts are tokenised here, in the server's process, so every model's tokenizer is
loaded here too (the workers load their own). The controller and its worker processes
start on the server's event loop (`start`, from the app's lifespan): the pipes' replies
come back to that loop. Snapshots are refreshed every `refresh_s` and after every admin
call, so routes read them without waiting on a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from prism.engine.async_engine import EngineClosed, EngineStats
from prism.engine.sampling_params import SamplingParams
from prism.models.checkpoint import open_checkpoint
from prism.server.registry import OutputStream, ServedModel
from prism.serving.async_worker import WorkerSnapshot
from prism.serving.controller import Controller, WorkerFactory
from prism.serving.fleet import FleetConfig, default_dtype, describe_model
from prism.serving.model_slot import ModelSpec, ModelState
from prism.serving.worker import ModelStats, WorkerMode
from prism.serving.worker_process import ProcessWorker

logger = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 0.5


class FleetWorker:
    """One device of the fleet as the admin routes and metrics read it."""

    def __init__(self, controller: Controller, worker_id: str, mode: WorkerMode) -> None:
        self.controller = controller
        self.worker_id = worker_id
        self.mode = mode

    @property
    def device(self) -> str:
        return self.worker_id  # "cpu:1", "cuda:0": unique in the fleet

    @property
    def is_running(self) -> bool:
        """Started, not restarting after a crash, not given up."""
        worker = self.controller.workers.get(self.worker_id)
        return worker is not None and worker.usable and worker.client.alive

    def stats(self) -> WorkerSnapshot:
        """Its latest snapshot (the last one before a crash while it restarts)."""
        worker = self.controller.workers.get(self.worker_id)
        if worker is None or worker.snapshot is None:
            raise EngineClosed(f"worker {self.worker_id} has not started")
        return worker.snapshot


class RoutedModel:
    """One fleet model's requests and admin calls, through the controller."""

    def __init__(
        self,
        registry: FleetRegistry,
        spec: ModelSpec,
        *,
        vocab_size: int,
        weight_bytes: int,
        max_waiting: int,
    ) -> None:
        self.name = spec.name
        self.config = spec.engine
        self.vocab_size = vocab_size
        self.weight_bytes = weight_bytes
        self.max_requests = self.config.max_num_seqs + max_waiting
        self._registry = registry
        self._controller = registry.controller

    @property
    def worker(self) -> FleetWorker:
        """The worker its requests go to now (its home; it changes on migration)."""
        entry = self._controller.models.get(self.name)
        return self._registry.worker(entry.home if entry is not None else None)

    @property
    def is_running(self) -> bool:
        return self.worker.is_running

    @property
    def state(self) -> ModelState:
        stats = self.model_stats
        return ModelState(stats.state) if stats is not None else ModelState.REGISTERED

    @property
    def stats(self) -> EngineStats:
        return self.worker.stats().engines.get(self.name, EngineStats())

    @property
    def model_stats(self) -> ModelStats | None:
        """None while its home has not loaded it (it loads on the next request)."""
        return self.worker.stats().model(self.name)

    def check_capacity(self, count: int) -> None:
        """Nothing checked here: the worker refuses requests beyond its bounds, and the
        refusal crosses the pipe as `EngineOverloaded` (a 429)."""

    async def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> OutputStream:
        return await self._controller.add_request(self.name, prompt, params, request_id)

    async def wake(self) -> bool:
        woken = await self._controller.wake(self.name)
        await self._registry.refresh()
        return woken

    async def sleep(self) -> int:
        freed = await self._controller.sleep(self.name)
        await self._registry.refresh()
        return freed

    async def set_kv_limit(self, kv_bytes: int) -> int:
        beyond = await self._controller.set_kv_limit(self.name, kv_bytes)
        await self._registry.refresh()
        return beyond


class FleetRegistry:
    def __init__(
        self,
        fleet: FleetConfig,
        *,
        spawn: WorkerFactory = ProcessWorker,
        refresh_s: float = DEFAULT_REFRESH_S,
    ) -> None:
        """Every model of `fleet`, described and its tokenizer loaded (no weights read);
        `ValueError` for a model without a tokenizer, `FleetConfigError` for one that
        cannot be served. Nothing runs until `start()`."""
        self.controller = Controller(fleet, spawn=spawn)
        self.refresh_s = refresh_s
        devices = fleet.device_ids()
        self.workers = [FleetWorker(self.controller, d, fleet.mode) for d in devices]
        self._models: dict[str, ServedModel] = {}
        max_waiting = self.controller.config.max_waiting
        for i, m in enumerate(fleet.models):
            found = describe_model(fleet, i, default_dtype(devices[0]))
            checkpoint = open_checkpoint(found.spec.source, found.spec.load_format)  # type: ignore[arg-type]
            tokenizer = checkpoint.load_tokenizer()
            if tokenizer is None:
                raise ValueError(f"model {m.name!r} has no tokenizer; the server needs one")
            engine = RoutedModel(
                self,
                found.spec,
                vocab_size=checkpoint.config.vocab_size,
                weight_bytes=found.weight_bytes,
                max_waiting=max_waiting,
            )
            source = found.spec.source
            label = source if isinstance(source, str) else f"random {source.architecture}"
            self._models[m.name] = ServedModel(m.name, label, engine, tokenizer)
        self._refresher: asyncio.Task[None] | None = None

    def worker(self, worker_id: str | None) -> FleetWorker:
        """The device `worker_id` (the first one for None)."""
        return next((w for w in self.workers if w.worker_id == worker_id), self.workers[0])

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.models())

    def __len__(self) -> int:
        return len(self._models)

    async def start(self) -> None:
        """Start the controller (a worker per device, every model loaded on its home)."""
        await self.controller.start()
        await self.refresh()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def stop(self) -> None:
        """Stop the workers; requests in flight end with `EngineClosed` (a 503)."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self.controller.close()

    async def refresh(self) -> None:
        """Fresh snapshots of the live workers."""
        await self.controller.stats()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:
                logger.exception("refreshing the workers' stats failed")
