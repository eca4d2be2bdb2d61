"""`Controller`: every model of a fleet, served by one worker per device.

- **Registry.** One entry per model of the fleet file: its spec, its traffic (a sliding
  `RateWindow`, mean request lengths), its *home* (the worker its requests go to), the
  workers holding its host copy, and its requests in flight per worker.
- **Routing.** A request goes to its model's home. When the model is asleep there and
  nothing of it is in flight, that first request may place it anew: on the
  least-pressured device with room for its weights (the home unless another device's KV
  pressure is lower by more than the hysteresis margin, or the home has no room).
- **Placement.** Every `placement_interval_s`, `ComputeAwarePlacement` (hysteresis, a cap
  on moves per window, minimum residence; pinned models stay) runs on the windowed rates,
  each model's compute share (demanded tokens/s × the engine seconds per token its
  workers measured, `StepCostWindow`) and the workers' budgets. A move is a migration:
  load and wake on the target first, switch the model's traffic there once it is
  resident, wait for the requests still on the source to finish, then sleep the source.
  No request is moved or dropped.
- **Idle eviction.** Every tick, per worker: models with nothing in flight are candidates
  once idle for `idle_eviction_s`, and `EvictionPolicy` sleeps the cheapest of them only
  while the worker is under memory pressure (free memory below its low-water mark, or
  models waiting to wake). Idleness alone never sleeps a model.
- **Crashes.** A worker process that dies fails its requests in flight with
  `WorkerCrashed` (each stream raises it). The controller starts a new process for the
  device and reloads the models homed there; requests arriving meanwhile wait for it.
  After `max_restarts` crashes within `restart_window_s` the device is given up and its
  models are placed on the others.

Everything runs on the event loop that called `start()`; the workers run in child
processes (`ProcessWorker`) or, for tests, in this one (`LocalWorker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch

from prism.engine.async_engine import EngineClosed, EngineError, RequestStream
from prism.engine.output import RequestOutput
from prism.engine.sampling_params import SamplingParams
from prism.serving.async_worker import WorkerSnapshot
from prism.serving.fleet import (
    DEFAULT_CPU_BUDGET,
    GPU_BUDGET_FRACTION,
    ControllerConfig,
    FleetConfig,
    FleetConfigError,
    FleetModel,
    default_dtype,
    describe_model,
    torch_device,
)
from prism.serving.model_slot import ModelSpec
from prism.serving.policies import (
    ComputeAwareConfig,
    ComputeAwarePlacement,
    DeviceInfo,
    EvictionCandidate,
    EvictionConfig,
    EvictionPolicy,
    Migration,
    ModelDemand,
    RateWindow,
    RateWindowConfig,
    StepCostWindow,
)
from prism.serving.policies.placement import pressure
from prism.serving.worker import WorkerConfig
from prism.serving.worker_client import WorkerClient
from prism.serving.worker_process import ProcessWorker

logger = logging.getLogger(__name__)


class WorkerFactory(Protocol):
    """Makes a (not yet started) client for one device: `ProcessWorker`, `LocalWorker`."""

    def __call__(
        self,
        worker_id: str,
        config: WorkerConfig,
        *,
        budget_fraction: float | None = None,
        threads: int | None = None,
    ) -> WorkerClient: ...


@dataclass(frozen=True, slots=True)
class ControllerEvent:
    t: float  # on the controller's clock
    kind: str  # place, wake, migrate, sleep, evict, migrate-failed, crash, restart, give-up
    model: str | None
    worker: str | None
    detail: str = ""


class Traffic:
    """One model's recent traffic: sliding-window rates and mean request lengths."""

    def __init__(self, window_s: float, start_s: float) -> None:
        self.window = RateWindow(RateWindowConfig(window_s), start_s=start_s)
        self.cost = StepCostWindow(window_s)  # engine seconds per output token
        self.finished = 0
        self.prompt_tokens = 0
        self.output_tokens = 0

    def arrive(self, now: float, max_tokens: int) -> None:
        """Counted with the tokens it is expected to produce (outputs are known at the end)."""
        expected = min(max_tokens, self.mean_output) if self.finished else max_tokens
        self.window.record(now, max(1, round(expected)))

    def compute_share(self, now: float) -> float:
        """Demanded output tokens/s × measured engine seconds per token: the fraction of a
        device the model needs (0 until its steps have been measured)."""
        per_token = self.cost.seconds_per_token(now)
        return 0.0 if per_token is None else self.window.rate(now).tokens_per_s * per_token

    def finish(self, output: RequestOutput) -> None:
        self.finished += 1
        self.prompt_tokens += output.num_prompt_tokens
        self.output_tokens += output.num_output_tokens

    @property
    def mean_output(self) -> float:
        return self.output_tokens / self.finished if self.finished else 0.0

    @property
    def context_tokens(self) -> int:
        """Mean KV a running request holds: its prompt and half its output."""
        if not self.finished:
            return 1024
        return max(1, round((self.prompt_tokens + self.output_tokens / 2) / self.finished))


@dataclass(slots=True)
class _Model:
    fleet: FleetModel
    spec: ModelSpec  # what a worker loads
    weight_bytes: int
    kv_bytes_per_token: int
    traffic: Traffic
    home: str = ""  # worker id its requests go to
    loaded: set[str] = field(default_factory=set)  # workers holding its host copy
    in_flight: Counter[str] = field(default_factory=Counter)  # worker id → requests
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # routing decisions
    load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    migrating: bool = False

    @property
    def name(self) -> str:
        return self.fleet.name


@dataclass(slots=True)
class _Worker:
    worker_id: str
    index: int
    config: WorkerConfig
    budget_fraction: float | None
    client: WorkerClient
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    snapshot: WorkerSnapshot | None = None
    crashes: deque[float] = field(default_factory=deque)
    failed: bool = False  # given up after too many crashes

    def state(self, model: str) -> str | None:
        stats = self.snapshot.model(model) if self.snapshot is not None else None
        return stats.state if stats is not None else None

    @property
    def usable(self) -> bool:
        return self.ready.is_set() and not self.failed and self.snapshot is not None


class RoutedStream:
    """A request's outputs from the worker serving it. The controller counts the request
    in flight on that worker until the stream ends: finished, failed or closed."""

    def __init__(
        self,
        inner: RequestStream,
        worker_id: str,
        on_end: Callable[[RequestOutput | None], None],
    ) -> None:
        self.request_id = inner.request_id
        self.worker_id = worker_id
        self._inner = inner
        self._on_end: Callable[[RequestOutput | None], None] | None = on_end

    @property
    def finished(self) -> bool:
        return self._inner.finished

    def __aiter__(self) -> RoutedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            output = await self._inner.__anext__()
        except BaseException:
            self._end(None)
            raise
        if output.finished:
            self._end(output)
        return output

    def close(self) -> None:
        self._inner.close()
        self._end(None)

    def _end(self, output: RequestOutput | None) -> None:
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end(output)


class Controller:
    def __init__(
        self,
        fleet: FleetConfig,
        *,
        config: ControllerConfig | None = None,
        spawn: WorkerFactory = ProcessWorker,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`spawn` makes a (not yet started) worker client per device: `ProcessWorker`
        (a child process each) or `LocalWorker` (in this process). `clock` times rates,
        idleness and placement (tests pass a fake one)."""
        self.fleet = fleet
        self.config = config or fleet.controller
        self.spawn = spawn
        self.clock = clock
        pinned = {m.name: m.pinned for m in fleet.models if m.pinned is not None}
        self.placement = ComputeAwarePlacement(
            ComputeAwareConfig(
                pinned=pinned,
                min_improvement=self.config.min_improvement,
                max_migrations=self.config.max_migrations,
                migration_window_s=self.config.migration_window_s,
                min_residence_s=self.config.min_residence_s,
            )
        )
        self.eviction = EvictionPolicy(EvictionConfig(idle_threshold_s=self.config.idle_eviction_s))
        self.events: deque[ControllerEvent] = deque(maxlen=10_000)
        self.workers: dict[str, _Worker] = {}
        self.models: dict[str, _Model] = {}
        self._requests: dict[str, tuple[_Model, str]] = {}  # request id → (model, worker id)
        self._migrations: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_placement = -math.inf
        self._closed = False

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start a worker per device, place every model, load each on its home (CACHED:
        its first request wakes it)."""
        devices = self.fleet.device_ids()
        for m in self.fleet.models:
            if m.pinned is not None and m.pinned not in devices:
                raise FleetConfigError(
                    f"{self.fleet.path}: model {m.name}: pinned to {m.pinned}, "
                    f"not in the devices {list(devices)}"
                )
        now = self.clock()
        dtype = default_dtype(devices[0])  # one size per model for placement
        self.models = await asyncio.to_thread(self._describe, dtype, now)
        for index, device_id in enumerate(devices):
            config, fraction = self._worker_config(device_id)
            client = self._make_client(device_id, config, fraction)
            self.workers[device_id] = _Worker(device_id, index, config, fraction, client)
        try:
            await asyncio.gather(*(w.client.start() for w in self.workers.values()))
            await self._refresh()
            self._place_initially(now)
            await asyncio.gather(
                *(self._load(m, self.workers[m.home]) for m in self.models.values())
            )
        except BaseException:
            await self.close()
            raise
        for worker in self.workers.values():
            worker.ready.set()
        if self.config.tick_s is not None:
            self._spawn(self._run())

    async def close(self) -> None:
        """Stop every worker; requests in flight end with `EngineClosed`."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(
            *(w.client.close() for w in self.workers.values()), return_exceptions=True
        )

    def _describe(self, dtype: torch.dtype, now: float) -> dict[str, _Model]:
        """Each model's sizes from its checkpoint's config (no weights read)."""
        models = {}
        for i, m in enumerate(self.fleet.models):
            found = describe_model(self.fleet, i, dtype)
            traffic = Traffic(self.config.rate_window_s, now)
            models[m.name] = _Model(
                m, found.spec, found.weight_bytes, found.kv_bytes_per_token, traffic
            )
        return models

    def _worker_config(self, device_id: str) -> tuple[WorkerConfig, float | None]:
        device = torch_device(device_id)
        budget = self.fleet.budget_bytes
        if budget is None and device == "cpu":
            budget = DEFAULT_CPU_BUDGET
        config = self.fleet.worker_config(device, budget or 0)
        return config, (GPU_BUDGET_FRACTION if budget is None else None)

    def _make_client(
        self, device_id: str, config: WorkerConfig, fraction: float | None
    ) -> WorkerClient:
        client = self.spawn(
            device_id, config, budget_fraction=fraction, threads=self._threads(config)
        )
        client.on_exit = self._on_exit
        return client

    def _threads(self, config: WorkerConfig) -> int | None:
        """CPU workers split the host's cores; GPU workers keep torch's default."""
        if config.device != "cpu":
            return None
        cpu_workers = sum(torch_device(d) == "cpu" for d in self.fleet.device_ids())
        affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere all cores
        cores = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
        return max(1, cores // max(1, cpu_workers))

    def _place_initially(self, now: float) -> None:
        placement = self.placement.place(self._demands(now), self._devices(), {}, now)
        if placement.unplaced:
            raise FleetConfigError(
                f"{self.fleet.path}: no device can hold model(s) {placement.unplaced} "
                "(weights and min_memory beyond every budget, or pinned where they do not fit)"
            )
        for name, device in placement.assignment.items():
            self.models[name].home = device
            self._event("place", name, device, "initial placement")

    # ---- requests ----------------------------------------------------------------------

    async def add_request(
        self, model: str, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> RoutedStream:
        """Route a request to its model's worker; returns once that worker has taken it.
        Raises KeyError for an unknown model, and what the worker raises."""
        entry = self._model(model)
        if self._closed:
            raise EngineClosed("the controller is shut down")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        entry.traffic.arrive(self.clock(), params.max_tokens)
        async with entry.lock:
            worker = await self._route(entry)
            entry.in_flight[worker.worker_id] += 1
            self._requests[request_id] = (entry, worker.worker_id)
        end = partial(self._end, request_id)
        try:
            inner = await worker.client.add_request(model, prompt, params, request_id)
        except BaseException:
            end(None)
            raise
        return RoutedStream(inner, worker.worker_id, end)

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
        """Abort a request; its stream gets a final ABORT output."""
        found = self._requests.get(request_id)
        if found is not None:
            self.workers[found[1]].client.abort(request_id)

    def _end(self, request_id: str, output: RequestOutput | None) -> None:
        found = self._requests.pop(request_id, None)
        if found is None:
            return
        entry, worker_id = found
        entry.in_flight[worker_id] -= 1
        if output is not None:
            entry.traffic.finish(output)

    async def _route(self, entry: _Model) -> _Worker:
        """The worker for `entry`'s next request, ready and holding the model."""
        while True:
            home = self.workers[entry.home]
            if home.failed:
                if entry.fleet.pinned is not None:
                    raise EngineError(
                        f"model {entry.name!r} is pinned to {home.worker_id}, which is down"
                    )
                target = self._wake_target(entry)
                if self.workers[target].failed:
                    raise EngineError(f"model {entry.name!r}: no worker is up")
                self._rehome(entry, target, f"{home.worker_id} was given up")
            elif self._asleep_and_idle(entry):
                await self._refresh()
                target = self._wake_target(entry) if self._asleep_and_idle(entry) else entry.home
                if target != entry.home:
                    self._rehome(
                        entry, target, f"woken on the least-pressured device (was {home.worker_id})"
                    )
            worker = self.workers[entry.home]
            if await self._wait_ready(worker):
                await self._load(entry, worker)
                return worker

    def _asleep_and_idle(self, entry: _Model) -> bool:
        if entry.fleet.pinned is not None or entry.migrating or entry.in_flight.total():
            return False
        home = self.workers[entry.home]
        return home.usable and home.state(entry.name) != "active"

    def _wake_target(self, entry: _Model) -> str:
        """The least-pressured usable device with room for the model's weights; the home
        unless another is better by more than the hysteresis margin (or the home has no
        room)."""
        now = self.clock()
        candidates = [w for w in self.workers.values() if w.usable]
        if not candidates:
            return entry.home
        demand = self._demand(entry, now)
        loads = {w.worker_id: self._pressure_with(w, entry, demand, now) for w in candidates}
        fits = {w.worker_id: self._room(w) >= demand.weight_bytes for w in candidates}
        best = min(candidates, key=lambda w: (not fits[w.worker_id], loads[w.worker_id], w.index))
        home = entry.home
        if fits.get(home):
            if loads[home] - loads[best.worker_id] <= self.config.min_improvement:
                return home
        elif home in fits and not fits[best.worker_id]:
            return home
        return best.worker_id

    def _pressure_with(
        self, worker: _Worker, entry: _Model, demand: ModelDemand, now: float
    ) -> float:
        """The worker's KV pressure with `entry` woken there: the demand of the models
        resident on it over the memory their weights leave."""
        assert worker.snapshot is not None
        resident = demand.weight_bytes
        total = demand.kv_demand_bytes
        for stats in worker.snapshot.worker.models:
            other = self.models.get(stats.name)
            if other is None or other is entry or stats.state != "active":
                continue
            resident += stats.weights_mapped_bytes
            total += self._demand(other, now).kv_demand_bytes
        return pressure(total, worker.snapshot.worker.budget_bytes - resident)

    def _room(self, worker: _Worker) -> int:
        """Memory the worker can give without putting anyone to sleep."""
        assert worker.snapshot is not None
        return worker.snapshot.worker.free_bytes

    def _rehome(self, entry: _Model, target: str, why: str) -> None:
        entry.home = target
        self._event("place", entry.name, target, why)

    async def _wait_ready(self, worker: _Worker) -> bool:
        """Wait while the worker (re)starts; False if it was given up."""
        if not worker.ready.is_set():
            timeout = self.config.worker_start_timeout_s
            try:
                await asyncio.wait_for(worker.ready.wait(), timeout)
            except asyncio.TimeoutError:  # not the builtin on Python 3.10
                raise EngineError(
                    f"worker {worker.worker_id} is restarting and was not back within {timeout} s"
                ) from None
        return not worker.failed

    async def _load(self, entry: _Model, worker: _Worker) -> None:
        """Make sure `worker` holds `entry`'s host copy."""
        async with entry.load_lock:
            if worker.worker_id not in entry.loaded:
                await worker.client.add_model(entry.spec, self.config.max_waiting)
                entry.loaded.add(worker.worker_id)

    # ---- admin -------------------------------------------------------------------------

    async def wake(self, model: str) -> bool:
        entry = self._model(model)
        async with entry.lock:
            worker = await self._route(entry)
        return await worker.client.wake(model)

    async def sleep(self, model: str) -> int:
        """Put `model` to sleep on its home (`ModelConflict` while it is busy)."""
        entry = self._model(model)
        worker = self.workers[entry.home]
        if entry.home not in entry.loaded:
            return 0
        return await worker.client.sleep(model)

    async def set_kv_limit(self, model: str, kv_bytes: int) -> int:
        entry = self._model(model)
        async with entry.lock:
            worker = await self._route(entry)
        return await worker.client.set_kv_limit(model, kv_bytes)

    def homes(self) -> dict[str, str]:
        """Model → the worker its requests go to."""
        return {name: m.home for name, m in self.models.items()}

    def in_flight(self) -> int:
        return len(self._requests)

    async def stats(self) -> dict[str, WorkerSnapshot]:
        """Fresh snapshots of the live workers, by worker id (none of one restarting)."""
        await self._refresh()
        live = (w for w in self.workers.values() if w.usable and w.snapshot is not None)
        return {w.worker_id: w.snapshot for w in live if w.snapshot is not None}

    async def check_integrity(self) -> None:
        for worker in self.workers.values():
            if worker.usable:
                await worker.client.check_integrity()

    def _model(self, name: str) -> _Model:
        entry = self.models.get(name)
        if entry is None:
            raise KeyError(f"unknown model {name!r}; served: {sorted(self.models)}")
        return entry

    # ---- placement, migration, eviction ------------------------------------------------

    async def _run(self) -> None:
        assert self.config.tick_s is not None
        while True:
            await asyncio.sleep(self.config.tick_s)
            try:
                await self.tick()
            except Exception:
                logger.exception("controller tick failed")

    async def tick(self) -> list[Migration]:
        """Refresh the workers' stats; re-place when the interval is up (starting the
        migrations it decides, see `settle`); sleep idle models under pressure."""
        now = self.clock()
        await self._refresh()
        moves: list[Migration] = []
        if now - self._last_placement >= self.config.placement_interval_s:
            self._last_placement = now
            moves = self._replace(now)
        await self._evict(now)
        return moves

    async def settle(self) -> None:
        """Wait for the migrations in progress to end."""
        await asyncio.gather(*self._migrations.values(), return_exceptions=True)

    async def _refresh(self) -> None:
        async def refresh(worker: _Worker) -> None:
            with contextlib.suppress(EngineError):  # a crash: `_on_exit` deals with it
                worker.snapshot = await worker.client.stats()
                now = self.clock()
                for stats in worker.snapshot.worker.models:
                    entry = self.models.get(stats.name)
                    if entry is not None:
                        entry.traffic.cost.sample(
                            now, worker.worker_id, stats.busy_s, stats.output_tokens
                        )

        await asyncio.gather(*(refresh(w) for w in self.workers.values() if w.client.alive))

    def _demand(self, entry: _Model, now: float) -> ModelDemand:
        return ModelDemand(
            name=entry.name,
            weight_bytes=entry.weight_bytes + entry.fleet.min_memory,
            kv_bytes_per_token=entry.kv_bytes_per_token,
            token_rate=entry.traffic.window.rate(now).tokens_per_s,
            tpot_slo_s=entry.fleet.slo.tpot_s,
            compute_share=entry.traffic.compute_share(now),
            context_tokens=entry.traffic.context_tokens,
        )

    def _demands(self, now: float) -> list[ModelDemand]:
        return [self._demand(m, now) for m in self.models.values()]

    def _devices(self) -> list[DeviceInfo]:
        return [
            DeviceInfo(w.worker_id, w.snapshot.worker.budget_bytes)
            for w in self.workers.values()
            if not w.failed and w.snapshot is not None
        ]

    def _replace(self, now: float) -> list[Migration]:
        """Re-place the models with traffic in the window. An idle model keeps its home
        until its first request places it (see `_route`): moving it now would spend the
        migration budget on a model that may never be asked for again."""
        devices = self._devices()
        ids = {d.device_id for d in devices}
        demands = [d for d in self._demands(now) if d.active]
        current = {d.name: self.models[d.name].home for d in demands}
        current = {name: home for name, home in current.items() if home in ids}
        placement = self.placement.place(demands, devices, current, now)
        for name, device in placement.assignment.items():
            if name not in current:  # its device was given up
                self._rehome(self.models[name], device, "re-placed")
        started = []
        for move in placement.migrations:
            if move.model not in self._migrations:
                entry = self.models[move.model]
                task = self._spawn(self._migrate(entry, move.source, move.target))
                self._migrations[move.model] = task
                started.append(move)
        return started

    async def _migrate(self, entry: _Model, source: str, target: str) -> None:
        """Wake on the target first, switch traffic there, drain and sleep the source."""
        entry.migrating = True
        try:
            src, dst = self.workers[source], self.workers[target]
            busy = src.state(entry.name) == "active" or entry.in_flight[source] > 0
            if busy:  # else only its home changes: its next request loads and wakes it
                if not await self._wait_ready(dst):
                    return
                await self._load(entry, dst)
                if not await dst.client.wake(entry.name):
                    self._event("migrate-failed", entry.name, target, "no memory to wake it")
                    return
                self._event("wake", entry.name, target, f"migrating from {source}")
            async with entry.lock:
                entry.home = target
            self._event("migrate", entry.name, target, f"from {source}")
            if busy:
                await self._drain(entry, source)
                await self._sleep_source(entry, src)
        except Exception as e:
            logger.warning(
                "migration of %s from %s to %s failed: %s", entry.name, source, target, e
            )
            self._event("migrate-failed", entry.name, target, f"{type(e).__name__}: {e}")
        finally:
            entry.migrating = False
            self._migrations.pop(entry.name, None)

    async def _sleep_source(self, entry: _Model, source: _Worker) -> None:
        if not source.usable:
            return  # restarting or given up: nothing of the model is resident there
        try:
            freed = await source.client.sleep(entry.name)
        except Exception as e:  # still busy after the drain timeout; or it died
            self._event("sleep-deferred", entry.name, source.worker_id, f"{type(e).__name__}: {e}")
            return
        self._event("sleep", entry.name, source.worker_id, f"migrated away; {freed} bytes freed")

    async def _drain(self, entry: _Model, worker_id: str) -> None:
        """Until `entry` has no request left on `worker_id` (or the drain timeout)."""
        deadline = time.monotonic() + self.config.drain_timeout_s
        while entry.in_flight[worker_id] > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def _evict(self, now: float) -> None:
        for worker in self.workers.values():
            if not worker.usable:
                continue
            candidates = self._eviction_candidates(worker, now)
            if not candidates:
                continue
            for victim in self.eviction.choose_victims(candidates, self._bytes_wanted(worker)):
                try:
                    freed = await worker.client.sleep(victim.name)
                except Exception as e:  # a request came in meanwhile; or the worker died
                    logger.info("evicting %s on %s: %s", victim.name, worker.worker_id, e)
                    continue
                self._event("evict", victim.name, worker.worker_id, f"idle; {freed} bytes freed")

    def _eviction_candidates(self, worker: _Worker, now: float) -> list[EvictionCandidate]:
        """Resident models of `worker` with nothing in flight."""
        assert worker.snapshot is not None
        out = []
        for stats in worker.snapshot.worker.models:
            entry = self.models.get(stats.name)
            if entry is None or stats.state != "active" or entry.migrating:
                continue
            if stats.running or stats.waiting or entry.in_flight[worker.worker_id]:
                continue
            out.append(
                EvictionCandidate(
                    name=stats.name,
                    resident_bytes=stats.weights_mapped_bytes + stats.kv_mapped_bytes,
                    weight_bytes=stats.weight_bytes,
                    idle_s=entry.traffic.window.idle_for(now),
                    request_rate=entry.traffic.window.rate(now).requests_per_s,
                    pinned=entry.fleet.pinned is not None,
                )
            )
        return out

    def _bytes_wanted(self, worker: _Worker) -> int:
        """Memory pressure on a worker: what keeps its free memory above the low-water
        mark, plus the weights of models waiting to wake there, minus what is free."""
        assert worker.snapshot is not None
        stats = worker.snapshot.worker
        waking = sum(m.weight_bytes for m in stats.models if m.state != "active" and m.waiting)
        low_water = int(stats.budget_bytes * self.config.low_water_fraction)
        return max(0, waking + low_water - stats.free_bytes)

    # ---- crashes -----------------------------------------------------------------------

    def _on_exit(self, client: WorkerClient, error: EngineError) -> None:
        """A worker process died: its requests already failed with `error`; restart it."""
        worker = self.workers.get(client.worker_id)
        if worker is None or worker.client is not client or self._closed:
            return
        worker.ready.clear()
        worker.crashes.append(self.clock())
        for entry in self.models.values():
            entry.loaded.discard(worker.worker_id)
        self._event("crash", None, worker.worker_id, str(error))
        self._spawn(self._restart(worker))

    async def _restart(self, worker: _Worker) -> None:
        while True:
            now = self.clock()
            while worker.crashes and now - worker.crashes[0] > self.config.restart_window_s:
                worker.crashes.popleft()
            if len(worker.crashes) > self.config.max_restarts:
                self._give_up(worker)
                return
            client = self._make_client(worker.worker_id, worker.config, worker.budget_fraction)
            worker.client = client
            try:
                await client.start()
                homed = [m for m in self.models.values() if m.home == worker.worker_id]
                await asyncio.gather(*(self._load(m, worker) for m in homed))
                worker.snapshot = await client.stats()
            except Exception as e:
                logger.warning("restarting worker %s failed: %s", worker.worker_id, e)
                worker.crashes.append(self.clock())
                await client.close()
                await asyncio.sleep(1.0)
                continue
            worker.ready.set()
            self._event("restart", None, worker.worker_id, f"after {len(worker.crashes)} crash(es)")
            return

    def _give_up(self, worker: _Worker) -> None:
        worker.failed = True
        worker.ready.set()  # requests waiting for it fail or move on (see `_route`)
        self._event("give-up", None, worker.worker_id, f"{len(worker.crashes)} crashes")
        self._last_placement = -math.inf  # re-place its models at the next tick

    # ---- helpers -----------------------------------------------------------------------

    def _event(self, kind: str, model: str | None, worker: str | None, detail: str = "") -> None:
        self.events.append(ControllerEvent(self.clock(), kind, model, worker, detail))
        logger.info("%s %s on %s: %s", kind, model or "-", worker or "-", detail)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
