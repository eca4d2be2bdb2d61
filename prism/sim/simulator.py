"""`Simulator`: a discrete-event run of a workload over simulated GPUs.

A virtual clock and one heap of events (a GPU's task ending, the policy's tick, a
memory sample); arrivals come straight from the workload's sorted list. Each arrival
is routed to the GPU its model is placed on (the policy places a model on its first
request when it has no home yet), queued in that model's instance there, and wakes
it if it sleeps. GPUs run their loop (`SimGPU`) as tasks; the policy re-places,
migrates and evicts on its tick. Nothing reads the wall clock except for reporting.
"""

from __future__ import annotations

import gc
import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prism.sim.cost_model import CostModel
from prism.sim.gpu import GPUConfig, SimGPU
from prism.sim.instance import Instance, State
from prism.sim.metrics import MemoryTrace, SimResult
from prism.sim.policies import Policy
from prism.sim.request import SimModel, SimRequest
from prism.sim.workloads import RequestSpec, Workload

_GPU_DONE, _TICK, _SAMPLE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class SimConfig:
    num_gpus: int
    gpu: GPUConfig
    tick_s: float = 5.0  # how often the policy re-places and evicts
    sample_s: float = 10.0  # how often memory per model is recorded
    drain_s: float = 120.0  # after the workload ends, time for requests in flight


class Simulator:
    def __init__(
        self,
        workload: Workload,
        models: Sequence[SimModel],
        policy: Policy,
        config: SimConfig,
        cost: CostModel | None = None,
    ) -> None:
        if len(models) != workload.num_models:
            raise ValueError(f"{len(models)} models for a workload of {workload.num_models}")
        self.workload = workload
        self.models = list(models)
        self.policy = policy
        self.config = config
        self.cost = cost or CostModel()
        gpu_config = policy.gpu_config(config.gpu)
        policy.attach(self.models, self.cost, gpu_config)
        self.gpus = [SimGPU(i, gpu_config, self.cost, policy.order) for i in range(config.num_gpus)]
        self.homes: dict[int, list[int]] = {}  # model -> GPUs serving it (new requests)
        self.draining: list[Instance] = []  # moved away: removed once idle
        self.requests: list[SimRequest] = []
        self.dropped = 0  # requests no GPU could ever hold, or of unplaced models
        self.migrations = 0
        self.now = 0.0
        self._events: list[tuple[float, int, int, int, int]] = []
        self._seq = 0
        self._progress: Callable[[float], None] | None = None
        self.memory = MemoryTrace(len(self.models))

    # ---- used by policies ---------------------------------------------------------------

    def place(self, model: int, gpu: int, *, kv_max_bytes: int | None = None) -> Instance:
        """Add `model` to `gpu` (not resident yet) and route its new requests there."""
        instance = self.gpus[gpu].add(self.models[model], kv_max_bytes)
        self.homes.setdefault(model, []).append(gpu)
        return instance

    def migrate(self, model: int, src: int, dst: int) -> None:
        """Route `model`'s new requests to `dst`; the instance on `src` finishes what it
        holds (its waiting requests move along) and then leaves."""
        old = self.gpus[src].instances[model]
        self.homes[model] = [g for g in self.homes[model] if g != src]
        new = self.gpus[dst].instances.get(model)
        if new is not None and new.draining:  # moving back before it left: keep it
            new.draining = False
            self.draining.remove(new)
            self.homes[model].append(dst)
        else:
            new = self.place(model, dst)
        while old.waiting:
            new.waiting.append(old.waiting.popleft())
        if new.waiting:
            self.gpus[dst].request_wake(new)
            self.kick(dst)
        old.draining = True
        self.draining.append(old)
        self.migrations += 1
        self._retire_drained()

    def sleep(self, gpu: int, model: int) -> bool:
        """Evict an idle model; False if it is not idle."""
        instance = self.gpus[gpu].instances[model]
        if instance.has_work or instance.state is not State.ACTIVE:
            return False
        self.gpus[gpu].sleep(instance)
        return True

    def kick(self, gpu: int) -> None:
        """Let a GPU notice new work: start a task if idle, else end its segment early."""
        g = self.gpus[gpu]
        if g.task is None:
            task = g.start_task(self.now)
            if task is not None:
                self._push(task.end, _GPU_DONE, gpu, g.version)
        else:
            end = g.interrupt(self.now)
            if end is not None:
                self._push(end, _GPU_DONE, gpu, g.version)

    # ---- the run ----------------------------------------------------------------------

    def run(self, progress: Callable[[float], None] | None = None) -> SimResult:
        """Simulate the whole workload; `progress(now)` is called now and then."""
        # The run allocates millions of short-lived objects and frees them by reference
        # counting; the cycle collector would rescan the long-lived ones over and over
        # (measured: 2.4x slower), so it is paused for the run.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(progress)
        finally:
            if enabled:
                gc.enable()

    def _run(self, progress: Callable[[float], None] | None) -> SimResult:
        start_wall = time.perf_counter()
        self._progress = progress
        self.policy.setup(self)
        for gpu in range(len(self.gpus)):
            self.kick(gpu)
        self._push(self.config.tick_s, _TICK, 0, 0)
        self._push(0.0, _SAMPLE, 0, 0)
        specs = self.workload.requests
        end = self.workload.duration_s + self.config.drain_s
        i, n, events = 0, len(specs), self._events
        while True:
            next_arrival = specs[i].arrival if i < n else float("inf")
            if events and events[0][0] <= next_arrival:
                when, _, kind, a, b = heapq.heappop(events)
                idle = i >= n and kind != _GPU_DONE and self._quiet()
                if when > end or (idle and when >= self.workload.duration_s):
                    break
                self.now = when
                self._handle(kind, a, b)
            elif i < n:
                self.now = next_arrival
                self._arrive(specs[i])
                i += 1
                if progress is not None and i % 4096 == 0:
                    progress(self.now)
            else:
                break
        self.now = max(self.now, self.workload.duration_s)
        return SimResult.collect(self, time.perf_counter() - start_wall)

    def _quiet(self) -> bool:
        return all(g.task is None for g in self.gpus)

    def _handle(self, kind: int, a: int, b: int) -> None:
        if kind == _GPU_DONE:
            gpu = self.gpus[a]
            if b != gpu.version or gpu.task is None:
                return  # superseded by an interrupt
            for request in gpu.finish_task(self.now):
                self.policy.on_finish(request)
            if self.draining:
                self._retire_drained()
            self.kick(a)
        elif kind == _TICK:
            self.policy.tick(self, self.now)
            self._push(self.now + self.config.tick_s, _TICK, 0, 0)
            if self._progress is not None:
                self._progress(self.now)
        else:
            self.memory.sample(self.now, self.gpus)
            self._push(self.now + self.config.sample_s, _SAMPLE, 0, 0)

    def _arrive(self, spec: RequestSpec) -> None:
        model = self.models[spec.model]
        request = SimRequest.from_spec(spec, model.ttft_slo_s)
        self.requests.append(request)
        self.policy.on_arrival(self, request, self.now)
        gpu = self._route(request)
        if gpu is None:
            self.dropped += 1
            return
        instance = self.gpus[gpu].instances[request.model]
        instance.waiting.append(request)
        instance.last_used = self.now
        if not instance.resident:
            self.gpus[gpu].request_wake(instance)
        self.kick(gpu)

    def _route(self, request: SimRequest) -> int | None:
        homes = self.homes.get(request.model)
        if not homes:
            gpu = self.policy.place_new(self, request.model, self.now)
            if gpu is None:
                return None
            homes = self.homes[request.model]
        if not self._fits(request, homes[0]):
            return None
        if len(homes) == 1:
            return homes[0]
        return min(homes, key=lambda g: (self._load(g, request.model), g))

    def _load(self, gpu: int, model: int) -> int:
        instance = self.gpus[gpu].instances[model]
        return len(instance.waiting) + instance.running

    def _fits(self, request: SimRequest, gpu: int) -> bool:
        """Could the request's whole context ever be held there, alone? (Within the
        model's KV limit, next to its weights.) If not, it is refused, as an engine
        refuses a prompt longer than its KV capacity."""
        g = self.gpus[gpu]
        kv = g.instances[request.model].kv
        blocks = kv.blocks_for(request.prompt + request.output) + 1  # + the padding block
        pages = -(-blocks // kv.blocks_per_group) * kv.group_pages
        weights = g.instances[request.model].weights.num_pages
        return pages <= kv.account.max_pages and pages + weights <= g.pool.budget_pages

    def _retire_drained(self) -> None:
        for instance in list(self.draining):
            gpu = self.gpus[instance.gpu]
            if instance.has_work or instance.state is State.WAKING:
                continue
            self.draining.remove(instance)
            if instance.resident:
                gpu.sleep(instance)
            gpu.remove(instance.model.index)

    def _push(self, when: float, kind: int, a: int, b: int) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, kind, a, b))
