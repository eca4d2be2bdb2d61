"""Cluster policies the simulator compares: which model lives where, in which order a
GPU admits requests, and when a model sleeps.

- `static`: a dedicated partition. Each model gets whole GPUs, planned from the
  workload's mean rates (spare GPUs become replicas of the busiest models); every model
  is resident from the start and never sleeps. Models without a GPU are not served.
- `spatial` (MuxServe-style): several models per GPU, packed from mean rates, each with
  a fixed KV quota (its share of the GPU's memory after weights); never sleeps.
- `swap`: models spread over GPUs; one resident model per GPU at a time, swapped
  whole on demand (the resident one drains first).
- `prism`: the paper's Algorithm 1 re-run every interval on sliding-window rates: the
  KV-pressure greedy, a model moving only when that lowers its pressure by more than the
  migration threshold τ (`ComputeAwarePlacement` with its compute term, move cap and
  residence time switched off: what is left is KV pressure plus hysteresis τ);
  Moore–Hodgson admission (`LocalScheduler`), elastic memory with the worker's pressure
  hooks, and idle eviction: every model idle past the threshold sleeps (a timer).
- `prism-no-tau` (ablation, not in the default set): `KVPressurePlacement` as is,
  stateless, so every re-placement may move any model.
- `prism-worker` (not in the default set): one `DeviceWorker` as it runs on its own,
  with no controller — elastic memory and its pressure hooks, its models admitting in
  turn as the worker rotates them when they have no SLOs (`RotatingOrder`), each first
  come first served, no idle timer (a model sleeps only when memory is wanted). What
  `benchmarks/validate_sim.py` compares the live worker with.
- `prism-worker-resident` (not in the default set): `prism-worker` with every model
  resident from the start, as `benchmarks/bench_multimodel.py` starts its worker, and
  `prism-worker-slo`, the same admitting by Moore–Hodgson (its models have SLOs);
  `spatial-even`: `spatial` with even KV quotas, as the worker's `static` mode.
- `prism+`: `ComputeAwarePlacement` (compute term, hysteresis, a cap of one move per GPU
  per minute, residence time) re-run every 10 s, and `EvictionPolicy`'s score: idle
  models sleep only under memory pressure, cheapest expected wake stall first.

The baselines admit first come, first served (`FIFOOrder`). Everything that decides
is a baseline's fixed plan or a class of `prism.serving.policies`, used unchanged;
`prism.sim.adapters` builds their inputs.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from prism.serving.policies import (
    ComputeAwareConfig,
    ComputeAwarePlacement,
    EvictionConfig,
    EvictionPolicy,
    FIFOOrder,
    KVPressurePlacement,
    LocalScheduler,
    PlacementPolicy,
    RotatingOrder,
)
from prism.sim.adapters import (
    ModelStats,
    SchedulerOrder,
    bytes_wanted,
    device_info,
    eviction_candidates,
    make_scheduler,
    model_demand,
)
from prism.sim.cost_model import CostModel
from prism.sim.gpu import ELASTIC, QUOTA, SWAP, GPUConfig, SimGPU
from prism.sim.request import SimModel, SimRequest

if TYPE_CHECKING:
    from prism.sim.simulator import Simulator


class Policy:
    """A FCFS, never-moving policy; subclasses plan placement and change the knobs."""

    name = "base"
    mode = ELASTIC
    scheduler: type[LocalScheduler] = FIFOOrder
    _order: SchedulerOrder | None = None

    def gpu_config(self, base: GPUConfig) -> GPUConfig:
        return replace(base, mode=self.mode)

    def attach(self, models: list[SimModel], cost: CostModel, config: GPUConfig) -> None:
        """Called once by the simulator, before anything else."""
        scheduler = make_scheduler(self.scheduler, models, cost, config.max_batched_tokens)
        self._order = SchedulerOrder(scheduler, models)

    def setup(self, sim: Simulator) -> None:
        """Place models before the first arrival."""

    def order(self, gpu: SimGPU, requests: list[SimRequest], now: float) -> list[SimRequest]:
        """Admission order of a GPU's waiting requests."""
        assert self._order is not None, "attach() first"
        return self._order(gpu, requests, now)

    def on_arrival(self, sim: Simulator, request: SimRequest, now: float) -> None:
        """Every request, before it is routed."""

    def on_finish(self, request: SimRequest) -> None:
        """Every request that finished."""

    def place_new(self, sim: Simulator, model: int, now: float) -> int | None:
        """A GPU for a model's first request when it has none; None: not served."""
        return None

    def tick(self, sim: Simulator, now: float) -> None:
        """Periodic re-placement and eviction."""


class Static(Policy):
    name = "static"
    mode = QUOTA

    def setup(self, sim: Simulator) -> None:
        rates = sim.workload.rates()
        by_rate = sorted(range(len(rates)), key=lambda m: (-rates[m], m))
        gpus = len(sim.gpus)
        replicas = {m: 1 for m in by_rate[:gpus]}
        for _ in range(gpus - len(replicas)):  # spare GPUs: the most load per replica
            busiest = max(replicas, key=lambda m: (rates[m] / replicas[m], -m))
            replicas[busiest] += 1
        gpu = 0
        for model in by_rate:
            for _ in range(replicas.get(model, 0)):
                instance = sim.place(model, gpu)
                sim.gpus[gpu].wake_now(instance, 0.0)
                gpu += 1


class Spatial(Policy):
    """MuxServe-style: models packed by demand onto the least-loaded GPU their weights
    fit on; each GPU's KV memory split by demand into fixed quotas."""

    name = "spatial"
    mode = QUOTA
    min_kv_bytes = 2 << 30  # the smallest quota a model is given

    def setup(self, sim: Simulator) -> None:
        rates = sim.workload.rates()
        demand = [rates[m] * sim.models[m].shape.kv_bytes_per_token for m in range(len(rates))]
        budget = sim.gpus[0].config.budget_bytes
        overhead = sim.gpus[0].config.model_overhead_bytes
        load = [0.0] * len(sim.gpus)
        free = [budget] * len(sim.gpus)
        members: list[list[int]] = [[] for _ in sim.gpus]
        for m in sorted(range(len(rates)), key=lambda m: (-demand[m], m)):
            need = sim.models[m].shape.weight_bytes + overhead + self.min_kv_bytes
            fits = [g for g in range(len(sim.gpus)) if free[g] >= need]
            if not fits:
                continue  # not served
            g = min(fits, key=lambda g: (load[g], len(members[g]), g))
            members[g].append(m)
            load[g] += demand[m]
            free[g] -= need
        for g, models in enumerate(members):
            total = sum(demand[m] for m in models) or 1.0
            for m in models:
                page = sim.gpus[g].config.page_size  # weights round up to whole pages
                quota = self.min_kv_bytes + int(free[g] * demand[m] / total) - page
                instance = sim.place(m, g, kv_max_bytes=quota)
                sim.gpus[g].wake_now(instance, 0.0)


class SpatialEven(Spatial):
    """`spatial` with the KV memory split evenly between a GPU's models, whatever their
    rates: what `DeviceWorker`'s `static` mode does."""

    name = "spatial-even"

    def setup(self, sim: Simulator) -> None:
        budget = sim.gpus[0].config.budget_bytes
        overhead = sim.gpus[0].config.model_overhead_bytes
        members: list[list[int]] = [[] for _ in sim.gpus]
        free = [budget] * len(sim.gpus)
        for m, model in enumerate(sim.models):  # model order, the least filled GPU
            need = model.shape.weight_bytes + overhead + sim.gpus[0].config.page_size
            fits = [g for g in range(len(sim.gpus)) if free[g] >= need]
            if fits:
                g = max(fits, key=lambda g: (free[g], -g))
                members[g].append(m)
                free[g] -= model.shape.weight_bytes + overhead
        for g, models in enumerate(members):
            page = sim.gpus[g].config.page_size
            for m in models:
                quota = free[g] // len(models) - page  # weights round up to whole pages
                sim.gpus[g].wake_now(sim.place(m, g, kv_max_bytes=quota), 0.0)


class Swap(Policy):
    """Models dealt over GPUs by descending rate (round robin); one resident per GPU."""

    name = "swap"
    mode = SWAP

    def setup(self, sim: Simulator) -> None:
        rates = sim.workload.rates()
        for i, m in enumerate(sorted(range(len(rates)), key=lambda m: (-rates[m], m))):
            sim.place(m, i % len(sim.gpus))


@dataclass(frozen=True, slots=True)
class PrismConfig:
    placement_interval_s: float = 30.0  # re-placement on fresh rates
    rate_window_s: float = 60.0  # RateWindow span
    idle_threshold_s: float = 45.0  # no model idle for less than this is evicted
    pressure_gated: bool = False  # evict only under memory pressure, by EvictionPolicy's score
    low_water_fraction: float = 0.05  # free memory below this share of a GPU is pressure
    start_resident: bool = False  # models placed at the start are woken at once, free


class PrismPolicy(Policy):
    """Placement from `prism.serving.policies` on windowed rates; every model is placed
    (asleep) from the start and woken on its device by its first request."""

    mode = ELASTIC
    scheduler = LocalScheduler

    def __init__(
        self,
        name: str,
        placement: Callable[[int], PlacementPolicy],
        config: PrismConfig,
        scheduler: type[LocalScheduler] = LocalScheduler,
    ) -> None:
        self.name = name
        self.scheduler = scheduler
        self.make_placement = placement  # number of GPUs -> the placement policy
        self.placement: PlacementPolicy | None = None
        self.config = config
        self.stats: list[ModelStats] = []
        self.eviction: EvictionPolicy | None = None
        self._last_placement = 0.0

    def attach(self, models: list[SimModel], cost: CostModel, config: GPUConfig) -> None:
        super().attach(models, cost, config)
        self.stats = [ModelStats.new(self.config.rate_window_s) for _ in models]
        effective_h2d = cost.gpu.h2d_bytes_per_s / cost.calibration.wake_overhead
        self.eviction = EvictionPolicy(EvictionConfig(self.config.idle_threshold_s, effective_h2d))

    def setup(self, sim: Simulator) -> None:
        self.placement = self.make_placement(len(sim.gpus))
        self._replace(sim, 0.0)
        if self.config.start_resident:  # as far as memory goes, in model order
            for gpu in sim.gpus:
                for instance in list(gpu.instances.values()):
                    gpu.wake_now(instance, 0.0)

    def on_arrival(self, sim: Simulator, request: SimRequest, now: float) -> None:
        self.stats[request.model].arrive(request, now)

    def on_finish(self, request: SimRequest) -> None:
        self.stats[request.model].finish(request)

    def place_new(self, sim: Simulator, model: int, now: float) -> int | None:
        self._replace(sim, now)  # it was unplaced (no room): try again with fresh rates
        homes = sim.homes.get(model)
        return homes[0] if homes else None

    def tick(self, sim: Simulator, now: float) -> None:
        if now - self._last_placement >= self.config.placement_interval_s:
            self._replace(sim, now)
        for gpu in sim.gpus:
            self._evict(sim, gpu, now)

    def _replace(self, sim: Simulator, now: float) -> None:
        self._last_placement = now
        overhead = sim.gpus[0].config.model_overhead_bytes
        demands = [
            model_demand(m, self.stats[m.index], now, sim.cost, overhead) for m in sim.models
        ]
        current = {sim.models[m].name: str(g[0]) for m, g in sim.homes.items() if g}
        assert self.placement is not None, "setup() first"
        devices = [device_info(g) for g in sim.gpus]
        placement = self.placement.place(demands, devices, current, now)
        index = {m.name: m.index for m in sim.models}
        for name, device in placement.assignment.items():
            model, gpu = index[name], int(device)
            if name not in current:
                sim.place(model, gpu)
            elif current[name] != device:
                sim.migrate(model, int(current[name]), gpu)

    def _evict(self, sim: Simulator, gpu: SimGPU, now: float) -> None:
        assert self.eviction is not None
        candidates = eviction_candidates(gpu, self.stats, now)
        if not candidates:
            return
        if self.config.pressure_gated:
            low_water = int(gpu.config.budget_bytes * self.config.low_water_fraction)
            needed = bytes_wanted(gpu, low_water)
        else:  # a timer: every model idle past the threshold goes
            needed = sum(c.resident_bytes for c in candidates)
        for victim in self.eviction.choose_victims(candidates, needed):
            sim.sleep(gpu.index, int(victim.name))


# The paper's migration threshold τ, in units of KV pressure (Σ demand / KV memory of a
# device); the same value as prism+'s hysteresis, so the two differ only in what they add.
PAPER_TAU = ComputeAwareConfig().min_improvement


def _prism() -> Policy:
    kv_pressure_only = ComputeAwareConfig(
        overload_penalty=0.0,
        min_improvement=PAPER_TAU,
        max_migrations=sys.maxsize,
        min_residence_s=0.0,
        incremental=False,  # the paper's greedy, re-run from scratch
    )
    return PrismPolicy("prism", lambda gpus: ComputeAwarePlacement(kv_pressure_only), PrismConfig())


def _prism_no_tau() -> Policy:
    return PrismPolicy("prism-no-tau", lambda gpus: KVPressurePlacement(), PrismConfig())


def _prism_worker() -> Policy:
    no_timer = PrismConfig(idle_threshold_s=math.inf)
    return PrismPolicy("prism-worker", lambda gpus: KVPressurePlacement(), no_timer, RotatingOrder)


def _prism_worker_resident() -> Policy:
    config = PrismConfig(idle_threshold_s=math.inf, start_resident=True)
    return PrismPolicy(
        "prism-worker-resident", lambda g: KVPressurePlacement(), config, RotatingOrder
    )


def _prism_worker_slo() -> Policy:
    config = PrismConfig(idle_threshold_s=math.inf, start_resident=True)
    return PrismPolicy("prism-worker-slo", lambda g: KVPressurePlacement(), config)


def _prism_plus_placement(gpus: int) -> PlacementPolicy:
    """ComputeAwarePlacement with its move cap scaled to the cluster: one move per GPU
    per window (at least the default 2). A cluster-wide 2 per minute moved the neighbours
    of a model that turned hot off its GPU one by one, over minutes (measured on the
    58-model workload: 13 GPUs needed instead of 12); hysteresis and the residence time
    still keep any one model from moving back and forth."""
    default = ComputeAwareConfig()
    return ComputeAwarePlacement(replace(default, max_migrations=max(default.max_migrations, gpus)))


def _prism_plus() -> Policy:
    config = PrismConfig(placement_interval_s=10.0, pressure_gated=True)
    return PrismPolicy("prism+", _prism_plus_placement, config)


POLICIES = {
    "static": Static,
    "spatial": Spatial,
    "swap": Swap,
    "prism": _prism,
    "prism+": _prism_plus,
}
# accepted by name, not run by default
ABLATIONS = {
    "prism-no-tau": _prism_no_tau,
    "prism-worker": _prism_worker,
    "prism-worker-resident": _prism_worker_resident,
    "prism-worker-slo": _prism_worker_slo,
    "spatial-even": SpatialEven,
}
KNOWN = {**POLICIES, **ABLATIONS}


def make_policy(name: str) -> Policy:
    try:
        return KNOWN[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(KNOWN)}") from None
