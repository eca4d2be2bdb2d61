"""`SimGPU`: one simulated device — a page pool, the model instances placed on it, and
its serving loop as a sequence of timed tasks.

The loop mirrors `DeviceWorker.step`: wake what is queued for waking, admit waiting
requests in the local scheduler's order, then one engine step for every instance with
work (the steps run one after another; a round's time is their sum). To stay fast, a
run of identical decode-only rounds is one task (a *segment*) that ends at the first
request completion, or earlier when something arrives (`interrupt`). A wake blocks
the loop for its duration, as `ModelSlot.wake` does; sleeps charge their unmapping
time to the next task.

Memory modes: `elastic` (prism: one pool, pressure hooks sleep idle models and preempt
work of lower priority, or of an equal beyond its fair share), `quota` (static/spatial:
every model resident with a fixed KV limit, never sleeps), `swap` (one resident model at
a time; the resident one drains before the next is woken).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice

from prism.memory.page_pool import PagePool
from prism.serving.policies.memory import KVClaim, fair_kv_share, kv_to_lend
from prism.sim.cost_model import CostModel
from prism.sim.instance import Instance, State, StepPlan
from prism.sim.request import SimModel, SimRequest
from prism.sim.vmm import SimVMM

Order = Callable[["SimGPU", list[SimRequest], float], list[SimRequest]]
ELASTIC, QUOTA, SWAP = "elastic", "quota", "swap"


@dataclass(frozen=True, slots=True)
class GPUConfig:
    memory_bytes: int
    headroom_bytes: int = 4 << 30  # CUDA context, activations, graph pools not in the pool
    page_size: int = 2 << 20
    block_size: int = 16
    model_overhead_bytes: int = 256 << 20  # per resident model: workspaces, graph memory
    max_num_seqs: int = 128
    max_batched_tokens: int = 2048  # per engine step, as EngineConfig
    # Token counts of the graphs a step with prefill replays (the next size up, padding
    # included), as EngineConfig.cuda_graph_tokens; () for eager steps
    graph_tokens: tuple[int, ...] = (64, 128, 256, *range(384, 2049, 128))
    max_rounds: int = 256  # longest decode segment; step times are refreshed after it
    mode: str = ELASTIC

    @property
    def budget_bytes(self) -> int:
        return self.memory_bytes - self.headroom_bytes


@dataclass(slots=True)
class Task:
    kind: str  # "step" | "segment" | "wake"
    start: float
    end: float
    rounds: int = 1
    round_s: float = 0.0
    plans: list[StepPlan] = field(default_factory=list)
    waking: Instance | None = None


class SimGPU:
    def __init__(self, index: int, config: GPUConfig, cost: CostModel, order: Order) -> None:
        self.index = index
        self.config = config
        self.cost = cost
        self.order = order
        vmm = SimVMM(config.page_size, f"sim:{index}")
        self.pool = PagePool(vmm, config.budget_bytes, max_events=1)
        self.instances: dict[int, Instance] = {}  # model index -> instance
        self.wake_queue: deque[Instance] = deque()
        self.task: Task | None = None
        self.version = 0  # bumped whenever the running task's end moves
        self.stall_s = 0.0  # loop time owed (sleeps) by the next task
        self.busy_s = 0.0  # time spent in steps and wakes
        self._acting: Instance | None = None  # on whose behalf memory is taken now
        self._protected: set[Instance] = set()  # stepping in this task: not to be slept
        # Woken since the last admission: not to be slept before it had a chance to admit
        # (the worker protects a model for the step that woke it).
        self._woken: set[Instance] = set()
        self._rewake: set[Instance] = set()  # slept with requests queued: to wake again
        self.now = 0.0  # the simulator's clock, as of the last call into this GPU
        self.wakes_by_model: Counter[int] = Counter()
        self.sleeps_by_model: Counter[int] = Counter()
        self.rounds = 0  # rounds of steps finished (a decode segment's each)
        self._kv_charged = (0, 0)  # KV pages mapped, unmapped: charged as loop time so far

    # ---- instances -------------------------------------------------------------------

    def add(self, model: SimModel, kv_max_bytes: int | None = None) -> Instance:
        pages = None if kv_max_bytes is None else kv_max_bytes // self.config.page_size
        instance = Instance(
            model,
            self.index,
            self.pool,
            block_size=self.config.block_size,
            overhead_bytes=self.config.model_overhead_bytes,
            kv_max_pages=pages,
        )
        if self.config.mode == ELASTIC:
            instance.weights.on_pressure = lambda pages: self._sleep_for_pressure(instance)
            instance.kv.on_pressure = lambda pages: self._relieve(instance, pages)
        self.instances[model.index] = instance
        return instance

    def remove(self, model: int) -> None:
        self._charge_kv_moves()  # what it moved here is owed before its counts leave
        instance = self.instances.pop(model)
        mapped, unmapped = self._kv_charged
        self._kv_charged = mapped - instance.kv.pages_mapped, unmapped - instance.kv.pages_unmapped
        if instance in self.wake_queue:
            self.wake_queue.remove(instance)
        instance.close()

    def request_wake(self, instance: Instance) -> None:
        if instance.state in (State.CACHED, State.ASLEEP) and instance not in self.wake_queue:
            self.wake_queue.append(instance)

    def wake_now(self, instance: Instance, now: float) -> bool:
        """Make an instance resident at once, at no cost (the start of a run)."""
        if not instance.take_memory():
            return False
        instance.finish_wake(now)
        instance.wakes = 0
        return True

    def sleep(self, instance: Instance) -> int:
        """Unmap an instance with nothing running; one with requests still queued is
        queued to wake again (as the worker wakes such sleepers at its next step)."""
        pages = instance.sleep()
        if pages:
            self.stall_s += self.cost.sleep_s(pages * self.config.page_size)
            self.sleeps_by_model[instance.model.index] += 1
        if instance.waiting:
            self.request_wake(instance)
            self._rewake.add(instance)
        return pages

    @property
    def free_bytes(self) -> int:
        stats = self.pool.stats()
        return (stats.budget_pages - stats.owned_pages) * stats.page_size

    # ---- pressure hooks (elastic mode): as DeviceWorker's ------------------------------

    def _can_sleep(self, instance: Instance) -> bool:
        """Active, nothing running (queued requests do not keep it awake, as in the
        worker), and neither stepping, just woken, nor the one taking memory."""
        return (
            instance.state is State.ACTIVE
            and not instance.holds_kv
            and instance not in self._protected
            and instance not in self._woken
            and instance is not self._acting
        )

    def _sleep_for_pressure(self, instance: Instance) -> int:
        return self.sleep(instance) if self._can_sleep(instance) else 0

    def _relieve(self, instance: Instance, pages: int) -> int:
        """Live KV wanted: an idle model sleeps; a busy one not stepping this round
        preempts what `kv_to_lend` says it owes the model taking memory (as
        `DeviceWorker._relieve`)."""
        if instance.state is not State.ACTIVE:
            return 0
        if self._can_sleep(instance):
            return self.sleep(instance)
        if not instance.holds_kv or instance in self._protected:
            return 0
        acting = self._acting
        taker = None if acting is None else KVClaim(acting.model.priority, acting.kv.mapped_pages)
        kv = instance.kv
        lender = KVClaim(instance.model.priority, kv.mapped_pages, kv.group_pages)
        owed = kv_to_lend(lender, taker, self._fair_kv_share(), pages)
        return instance.release_for_pressure(owed) if owed else 0

    def _fair_kv_share(self) -> int:
        """`fair_kv_share` over the models with work: running, queued or waiting to wake
        (the one taking memory now included)."""
        weights = [
            i.weights.num_pages
            for i in self.instances.values()
            if i.has_work or i is self._acting or i in self.wake_queue
        ]
        return fair_kv_share(self.pool.budget_pages, weights)

    # ---- the loop ----------------------------------------------------------------------

    def start_task(self, now: float) -> Task | None:
        """Begin the next task if idle and there is work; returns it (None: stays idle)."""
        self.now = now
        if self.task is not None:
            return None
        self._protected.clear()
        if self.config.mode == SWAP:
            self._admit(now)  # the resident model takes what came before the next swap
        # a model slept by the steps' admissions with requests queued is woken right away
        task = self._start_wake(now) or self._start_steps(now) or self._start_wake(now)
        self._charge_kv_moves()
        if task is not None:
            task.end += self.stall_s
            self.stall_s = 0.0
            self.task = task
            self.version += 1
        return task

    def finish_task(self, now: float) -> list[SimRequest]:
        """The running task ended at `now`: apply it; returns the requests it finished."""
        self.now = now
        task = self.task
        assert task is not None
        self.task = None
        self.busy_s += task.end - task.start
        if task.kind == "wake":
            assert task.waking is not None
            task.waking.finish_wake(now)
            self.wakes_by_model[task.waking.model.index] += 1
            return []
        done: list[SimRequest] = []
        self.rounds += task.rounds
        if task.kind == "segment":
            for plan in task.plans:
                plan.instance.steps += task.rounds
                plan.instance.busy_s += task.rounds * plan.seconds
                done += plan.instance.decode(task.rounds, now)
        else:
            for plan in task.plans:
                done += plan.instance.finish_step(plan, now)
        return done

    def _charge_kv_moves(self) -> None:
        """The worker maps and unmaps KV pages in its loop as caches grow and shrink: the
        pages moved since the last charge are loop time owed by the next task."""
        mapped = sum(i.kv.pages_mapped for i in self.instances.values())
        unmapped = sum(i.kv.pages_unmapped for i in self.instances.values())
        done_mapped, done_unmapped = self._kv_charged
        self._kv_charged = mapped, unmapped
        if mapped > done_mapped or unmapped > done_unmapped:
            page = self.config.page_size
            self.stall_s += self.cost.kv_moves_s(
                (mapped - done_mapped) * page, (unmapped - done_unmapped) * page
            )

    def interrupt(self, now: float) -> float | None:
        """Something arrived: end the running segment after its current round. Returns
        the new end time (None: nothing changed)."""
        task = self.task
        if task is None or task.kind != "segment" or task.rounds <= 1:
            return None
        rounds = int((now - task.start) / task.round_s) + 1 if task.round_s > 0 else 1
        if rounds >= task.rounds:
            return None
        task.rounds = rounds
        task.end = task.start + rounds * task.round_s
        self.version += 1
        return task.end

    # ---- wakes -------------------------------------------------------------------------

    def _start_wake(self, now: float) -> Task | None:
        while self.wake_queue and self.wake_queue[0].state not in (State.CACHED, State.ASLEEP):
            self.wake_queue.popleft()
        if not self.wake_queue:
            return None
        instance = self.wake_queue[0]
        if self.config.mode == SWAP and not self._swap_out(instance):
            return None
        # A model slept with requests queued wakes, as in the worker, after the round's
        # active models have scheduled: those with running requests keep their KV, and the
        # wake takes free memory, idle models and empty page groups. (A wake for a new
        # arrival, the worker's at `submit`, may take an equal's excess over its share.)
        rewake = instance in self._rewake
        running = {i for i in self.instances.values() if rewake and i.holds_kv}
        self._protected |= running
        self._acting = instance
        ok = instance.take_memory()
        self._acting = None
        self._protected -= running
        if not ok:
            return None
        self._rewake.discard(instance)
        self.wake_queue.popleft()
        self._woken.add(instance)
        return Task("wake", now, now + self.cost.wake_s(instance.model.shape), waking=instance)

    def _swap_out(self, incoming: Instance) -> bool:
        """Swap mode: sleep every other resident model; False while one still runs."""
        for other in self.instances.values():
            if other is not incoming and other.resident:
                if other.holds_kv or other.state is State.WAKING:
                    return False
                self.sleep(other)
                if other.waiting:
                    self.request_wake(other)  # its turn comes again
        return True

    # ---- steps -------------------------------------------------------------------------

    def _admit(self, now: float) -> None:
        """Waiting requests of resident models get KV, in the local scheduler's order."""
        candidates: list[SimRequest] = []
        for instance in self.instances.values():
            room = self.config.max_num_seqs - instance.running
            if instance.state is State.ACTIVE and instance.waiting and room > 0:
                candidates.extend(islice(instance.waiting, min(room, 64)))
        if self.config.mode == SWAP and self.wake_queue:
            # first come, first served across models: the resident one drains
            cutoff = min((r.arrival for i in self.wake_queue for r in i.waiting), default=now)
            candidates = [r for r in candidates if r.arrival < cutoff]
        if not candidates:
            return
        blocked: set[int] = set()
        for request in self.order(self, candidates, now):
            instance = self.instances[request.model]
            if request.model in blocked or instance.state is not State.ACTIVE:
                continue  # no memory for it, or slept for an earlier model's admission
            self._acting = instance
            if not instance.admit(request, self.config.max_num_seqs):
                blocked.add(request.model)
        self._acting = None

    def _start_steps(self, now: float) -> Task | None:
        self._admit(now)
        self._woken.clear()
        busy = self._busy()
        if not busy:
            # An admission preempted or slept the others and still failed: what it freed
            # goes to the next in line, as at the worker's next step.
            self._admit(now)
            busy = self._busy()
        if not busy:
            return None
        self._protected.update(busy)
        if any(i.prefilling for i in busy):
            config = self.config
            plans = [
                p for i in busy
                if (p := i.plan_step(self.cost, config.max_batched_tokens, config.graph_tokens))
            ]  # fmt: skip
            seconds = sum(p.seconds for p in plans) + self.cost.calibration.round_fixed_s
            return Task("step", now, now + seconds, 1, seconds, plans)
        return self._start_segment(busy, now)

    def _busy(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.state is State.ACTIVE and i.holds_kv]

    def _start_segment(self, busy: list[Instance], now: float) -> Task | None:
        rounds = min(min(i.decode_rounds_possible() for i in busy), self.config.max_rounds)
        for instance in busy:
            self._acting = instance
            rounds = min(rounds, instance.reserve_decode(rounds) or rounds)
        self._acting = None
        busy = [i for i in busy if i.decoding]
        if not busy:
            return None  # everything was preempted; the waiting ones are admitted next
        rounds = max(1, min(rounds, min(i.decode_rounds_possible() for i in busy)))
        plans = []
        round_s = self.cost.calibration.round_fixed_s
        for instance in busy:
            batch = len(instance.decoding)
            mid_tokens = instance.decode_kv_tokens() + batch * (rounds - 1) // 2
            seconds = self.cost.decode_s(instance.model.shape, batch, mid_tokens)
            plans.append(StepPlan(instance, seconds, []))
            round_s += seconds
        return Task("segment", now, now + rounds * round_s, rounds, round_s, plans)

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        for instance in self.instances.values():
            instance.kv.check_integrity()
