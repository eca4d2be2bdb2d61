"""`DeviceWorker`: every model placed on one device, over one shared page pool.

The worker's loop steps each active model that has work, one step each in turn, so one
model's long prefill (chunked by its engine) never starves another's decodes. Memory
flows through the pool: a model's KV cache grows into free pages; when the pool is dry
it takes back, in order, warm reserves and empty groups of other caches, then — through
the PRESSURE hooks installed here — sleeps idle models (longest idle first), and
finally preempts requests of models of no higher priority. A request never meets a
CUDA out-of-memory: a model that cannot be woken keeps its requests waiting.

Modes, for comparisons: `prism` (all of the above), `static` (a fixed KV share per
model, every model resident, never sleeps), `swap` (one model resident at a time,
requests served first come, first served across models: the resident model admits
only what arrived before the next model's oldest request, then yields to its wake).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from prism.engine.engine import StepInFlight
from prism.engine.output import RequestOutput
from prism.engine.sampling_params import SamplingParams
from prism.engine.scheduler import ScheduledBatch
from prism.memory import PagePool, make_vmm
from prism.serving.model_slot import ModelSlot, ModelSpec, ModelState
from prism.serving.policies.local_scheduler import LocalScheduler, LocalSchedulerConfig
from prism.serving.policies.memory import KVClaim, fair_kv_share, kv_to_lend
from prism.serving.policies.slo import PendingRequest
from prism.serving.sm_partition import SmPartitionError, SmPartitions


class WorkerMode(Enum):
    PRISM = "prism"
    STATIC = "static"
    SWAP = "swap"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    device: str = "cpu"
    budget_bytes: int = 1 << 30  # device memory the pool may hold (weights + KV)
    mode: WorkerMode = WorkerMode.PRISM
    host_page_size: int = 64 << 10  # HostVMM page size on the CPU; CUDA uses 2 MiB
    # Host memory for the models' host copies; beyond it the least recently used models
    # that are not active drop theirs (their next wake reads the checkpoint). None: no cap.
    host_budget_bytes: int | None = None
    # Requests in flight on this device over all its models (enforced by `AsyncWorker`,
    # beyond the per-model bounds); more are refused. None: only the per-model bounds.
    max_inflight: int | None = None
    # How long a request may wait for its model to wake (the memory held by other models'
    # running requests) before `expire_pending` drops it. None: as long as it takes.
    wake_timeout_s: float | None = 30.0
    # How co-located models step. False (rounds): `step()` launches one step per model
    # with work, each on its own stream, and waits for all of them, so every model waits
    # for the round's longest step (a 1B decode behind an 8B prefill chunk). True (free
    # running): `step()` launches the models whose last step has ended and returns once
    # any step has ended; a model steps again as soon as its own step is done. CUDA only
    # makes a difference (on the CPU a step ends when it is launched).
    free_running: bool = False
    # Prefill rate assumed when ordering models by their requests' slack (only the order
    # uses it: a prompt of t tokens of a model of p parameters takes 2·p·t / this long).
    # None: 3e14 FLOP/s on CUDA (~40% of an H200's bf16 rate), 1e11 on the CPU.
    prefill_flops_per_s: float | None = None


_POLL_S = 20e-6  # free running: how often to look whether a launched step has ended
_HEADS = 8  # waiting requests per model the round order looks at (FIFO: the earliest)


class StepError(RuntimeError):
    """Engines of some models raised during a step. The step still ran the other models:
    their outputs are in `outputs`. The failed models' requests are left as they were;
    the caller decides what becomes of them (aborting them, usually)."""

    def __init__(
        self, errors: dict[str, Exception], outputs: list[tuple[str, RequestOutput]]
    ) -> None:
        super().__init__("; ".join(f"{m}: {type(e).__name__}: {e}" for m, e in errors.items()))
        self.errors = errors  # model name -> what its engine raised
        self.outputs = outputs


@dataclass(slots=True)
class _Pending:
    """A request for a model that is not awake yet."""

    model: str
    prompt: str | list[int]
    params: SamplingParams
    request_id: str
    since: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class ModelStats:
    name: str
    state: str
    weight_bytes: int
    weights_mapped_bytes: int
    kv_mapped_bytes: int
    running: int
    waiting: int
    wakes: int
    sleeps: int
    last_wake_s: float
    host_bytes: int = 0  # its host copy (0 once dropped under the host budget)
    busy_s: float = 0.0  # wall time of its engine steps since it was added (cumulative)
    output_tokens: int = 0  # tokens those steps produced (cumulative)
    preemptions: int = 0  # its requests preempted by recompute (cumulative)
    steps: int = 0  # engine steps (cumulative)
    prefill_tokens: int = 0  # prompt tokens computed, recomputation included (cumulative)


@dataclass(frozen=True, slots=True)
class WorkerStats:
    device: str
    mode: str
    budget_bytes: int
    free_bytes: int
    models: tuple[ModelStats, ...] = field(default_factory=tuple)
    # `step()` calls that launched a step, and where their time went: the host's work
    # before waiting (scheduling, wakes, staging and launching, reserve refills) and the
    # wait for the device (rounds: the round's steps; free running: the first to end)
    rounds: int = 0
    round_host_s: float = 0.0
    round_wait_s: float = 0.0


class _Busy:
    """Adds the wall time of a block to a model's engine time (its compute share)."""

    def __init__(self, slot: ModelSlot) -> None:
        self.slot = slot

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.slot.busy_s += time.perf_counter() - self.start


class DeviceWorker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        page = config.host_page_size if config.device == "cpu" else None
        self.pool = PagePool(make_vmm(config.device, page), config.budget_bytes)
        self.models: dict[str, ModelSlot] = {}
        self._pending: deque[_Pending] = deque()
        self._rejected: list[tuple[str, str, str]] = []  # see `take_rejected`
        self._owner: dict[str, str] = {}  # request id -> model name
        self._turn = 0
        self._rounds = 0  # `step()` calls that launched something, and their time
        self._round_host_s = 0.0
        self._round_wait_s = 0.0
        # The model on whose behalf memory is being taken right now, and its priority
        # (the worker is single-threaded): busy models are preempted only for higher
        # priority, or for an equal one when they hold more than a fair share of the KV.
        self._acting: str | None = None
        self._acting_priority = 0
        # Not to be slept or preempted: scheduled this round (until its step is done), or
        # woken with work and not scheduled yet.
        self._protected: set[str] = set()
        # Steps launched and not yet collected (model -> step, launch time); across calls
        # of `step()` only when free running. Outputs of steps that a call other than
        # `step()` had to finish first (`_settle`) wait for the next `step()`.
        self._in_flight: dict[str, tuple[StepInFlight, float]] = {}
        self._settled: list[tuple[str, RequestOutput]] = []
        self._settle_errors: dict[str, Exception] = {}
        self._sms: SmPartitions | None = None  # made for the first model with an SM share

    # ---- models ------------------------------------------------------------------------

    def add_model(self, spec: ModelSpec) -> ModelSlot:
        """Load a model's weights into host memory (state CACHED); `static` mode wakes it."""
        self.check_new(spec)
        return self.adopt(ModelSlot(spec, self.config.device, self.pool))

    def check_new(self, spec: ModelSpec) -> None:
        """Raise ValueError if `spec` cannot join this worker (checked before loading)."""
        if spec.name in self.models:
            raise ValueError(f"model {spec.name!r} is already on this worker")
        if self.config.mode is WorkerMode.STATIC and spec.max_kv_bytes is None:
            raise ValueError(f"static mode: model {spec.name!r} needs max_kv_bytes (its share)")
        if spec.sms is not None:
            if not self.config.device.startswith("cuda"):
                raise ValueError(f"model {spec.name!r}: an SM share (sms) needs a CUDA device")
            try:
                self._partitions().check(spec.name, spec.sms)
            except SmPartitionError as e:
                raise ValueError(str(e)) from e

    def _partitions(self) -> SmPartitions:
        if self._sms is None:
            self._sms = SmPartitions(self.config.device)
        return self._sms

    def adopt(self, slot: ModelSlot) -> ModelSlot:
        """Take a slot built (its host copy loaded) elsewhere, e.g. on another thread so
        loading does not stall the models stepping here. It must be over this pool."""
        if slot.pool is not self.pool:
            raise ValueError(f"model {slot.spec.name!r} was built over another page pool")
        spec = slot.spec
        self.check_new(spec)
        if spec.sms is not None:  # before the first wake: its graphs are captured there
            slot.stream = self._partitions().take(spec.name, spec.sms)
        self.models[spec.name] = slot
        if self.config.mode is WorkerMode.STATIC and not self.wake(spec.name):
            self.remove_model(spec.name)
            raise MemoryError(f"model {spec.name!r} does not fit its static share")
        self._fit_host_budget(keep=spec.name)
        return slot

    def remove_model(self, name: str) -> None:
        slot = self._slot(name)
        if not slot.idle:
            raise RuntimeError(f"model {name!r} has requests in flight")
        slot.close()
        del self.models[name]

    def wake(self, name: str) -> bool:
        """Make `name` resident; False if memory cannot be had now (nothing changes)."""
        slot = self._slot(name)
        if slot.state is ModelState.ACTIVE:
            return True
        if self.config.mode is WorkerMode.SWAP:
            turn = self._swap_turn()
            if turn is not None and turn[0] != name:
                return False  # another model's older requests are served first
            for other in self.models.values():
                if other is not slot and other.state is ModelState.ACTIVE:
                    if other.holds_kv or other.spec.name in self._protected:
                        return False  # the resident model finishes first
                    other.sleep()
        self._acting, self._acting_priority = name, slot.spec.priority
        if not slot.wake():
            return False
        self._fit_host_budget(keep=name)
        self._protected.add(name)
        self._install_pressure_hooks(slot)
        return True

    def _oldest_queued(self, name: str) -> float | None:
        """When the oldest request queued for `name` and not running arrived (held for
        its wake, or waiting in its engine); None if there is none."""
        times = [p.since for p in self._pending if p.model == name]
        engine = self.models[name].engine
        if engine is not None:
            times += [r.arrival_time for r in engine.scheduler.waiting]
        return min(times, default=None)

    def _swap_turn(self) -> tuple[str, float] | None:
        """Swap mode serves requests first come, first served across models: the model
        not resident whose oldest queued request came first, and when it came."""
        turn = None
        for name, slot in self.models.items():
            if slot.state is ModelState.ACTIVE:
                continue
            since = self._oldest_queued(name)
            if since is not None and (turn is None or since < turn[1]):
                turn = (name, since)
        return turn

    def _swap_admission(self) -> None:
        """Swap mode: a resident model admits only requests older than the next model's
        oldest (its newer ones wait for their turn); with none running and none older,
        it leaves the memory phase to that model's wake."""
        if self.config.mode is not WorkerMode.SWAP:
            return  # other modes never set a cutoff
        turn = self._swap_turn()
        for slot in self.models.values():
            if slot.state is ModelState.ACTIVE and slot.engine is not None:
                slot.engine.scheduler.admit_before = None if turn is None else turn[1]

    def _fit_host_budget(self, keep: str) -> None:
        """Drop host copies, least recently used first, of models that are not active
        until the host copies fit the host budget (`keep` keeps its own)."""
        budget = self.config.host_budget_bytes
        if budget is None:
            return
        held = sum(s.host_bytes for s in self.models.values())
        victims = sorted(
            (s for n, s in self.models.items()
             if n != keep and s.host_bytes and s.state is not ModelState.ACTIVE),
            key=lambda s: s.last_used,
        )  # fmt: skip
        for slot in victims:
            if held <= budget:
                return
            held -= slot.drop_host()

    def sleep(self, name: str) -> int:
        """Put an idle model to sleep; returns bytes given back to the pool."""
        slot = self._slot(name)
        if self.config.mode is WorkerMode.STATIC:
            raise RuntimeError("static mode never sleeps models")
        self._settle(name)
        return slot.sleep() * self.pool.page_size

    def set_kv_limit(self, name: str, kv_bytes: int) -> int:
        """Cap a model's KV cache; returns bytes it still holds beyond the cap. The cap is
        hard (the pool's invariant): what running requests hold beyond it is taken back by
        preempting them; they wait, to be recomputed, until they fit."""
        slot = self._slot(name)
        engine = slot.engine
        if engine is None:
            raise RuntimeError(f"model {name!r} has not been woken yet")
        self._settle(name)
        limit = kv_bytes // self.pool.page_size
        over = self.pool.set_limit(engine.kv_cache.config.name, limit)
        if over > 0:
            engine.release_memory(over)
            over = max(0, engine.kv_cache.account.num_owned - limit)
        return over * self.pool.page_size

    def _slot(self, name: str) -> ModelSlot:
        slot = self.models.get(name)
        if slot is None:
            raise KeyError(f"unknown model {name!r}; on this worker: {sorted(self.models)}")
        return slot

    # ---- pressure: how a dry pool takes live memory -----------------------------------

    def _install_pressure_hooks(self, slot: ModelSlot) -> None:
        if self.config.mode is not WorkerMode.PRISM:
            return
        assert slot.engine is not None and slot.arena is not None
        name = slot.spec.name
        slot.arena.on_pressure = lambda pages: self._sleep_for_pressure(name)
        slot.engine.kv_cache.on_pressure = lambda pages: self._relieve(name, pages)

    def _can_sleep(self, slot: ModelSlot) -> bool:
        """Active, nothing running, and not just woken (else two models could wake and
        sleep each other forever without either running a step)."""
        return (
            slot.state is ModelState.ACTIVE
            and not slot.holds_kv
            and slot.spec.name not in self._protected
        )

    def _sleep_for_pressure(self, name: str) -> int:
        """Asked for a model's weights: a model with nothing running gives them by sleeping."""
        slot = self.models[name]
        return slot.sleep() if self._can_sleep(slot) else 0

    def _relieve(self, name: str, pages: int) -> int:
        """Asked for a model's live KV: an idle model sleeps; a busy one not scheduled
        this round preempts what `kv_to_lend` says it owes the model taking memory."""
        slot = self.models[name]
        if slot.state is not ModelState.ACTIVE or slot.engine is None:
            return 0
        if self._can_sleep(slot):
            return slot.sleep()
        if not slot.holds_kv or name in self._protected:
            return 0  # a model scheduled this round keeps its batch's blocks until it ran
        kv = slot.engine.kv_cache
        taker = None
        if self._acting is not None:
            taker = KVClaim(self._acting_priority, self._kv_pages(self._acting))
        lender = KVClaim(slot.spec.priority, self._kv_pages(name), kv.group_pages)
        owed = kv_to_lend(lender, taker, self._fair_kv_share(self._acting), pages)
        return slot.engine.release_memory(owed) if owed else 0

    def _kv_pages(self, name: str) -> int:
        engine = self.models[name].engine
        return 0 if engine is None else engine.kv_cache.account.num_owned

    def _fair_kv_share(self, acting: str | None) -> int:
        """`fair_kv_share` over the models with work: running, queued, or waiting to wake
        (`acting`, the model taking memory now, included)."""
        waiting = {p.model for p in self._pending} | {acting}
        page = self.pool.page_size
        weights = [
            -(-s.weight_bytes // page) for n, s in self.models.items() if not s.idle or n in waiting
        ]
        return fair_kv_share(self.pool.budget_pages, weights)

    # ---- requests ----------------------------------------------------------------------

    def submit(
        self,
        model: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; a sleeping model is woken by it (when memory allows)."""
        slot = self._slot(model)
        params = params or SamplingParams()
        request_id = request_id or f"{model}-{time.monotonic_ns()}"
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        slot.last_used = time.monotonic()
        if slot.state is ModelState.ACTIVE or self.wake(model):
            assert slot.engine is not None
            slot.engine.add_request(prompt, params, request_id)
        else:
            self._pending.append(_Pending(model, prompt, params, request_id))
        self._owner[request_id] = model
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        model = self._owner.pop(request_id, None)
        if model is None:
            return None
        for pending in list(self._pending):
            if pending.request_id == request_id:
                self._pending.remove(pending)
                return None
        self._settle(model)
        engine = self.models[model].engine
        return engine.abort(request_id) if engine is not None else None

    def has_work(self) -> bool:
        return (
            bool(self._pending or self._in_flight or self._settled or self._settle_errors)
            or any(not s.idle for s in self.models.values())
        )  # fmt: skip

    def step(self) -> list[tuple[str, RequestOutput]]:
        """One engine step for each active model with work (free running: each whose
        last step has ended), and wakes for sleeping ones. Raises `StepError` (with the
        others' outputs) if an engine's step raised.

        A call has three phases. Memory: schedule every active model in turn, then wake
        the sleeping models with work (and hand waiting requests to models now awake);
        all memory moves happen here, and none touches a model with a step in flight. A
        model scheduled is neither preempted nor slept by the models after it (its
        batch's blocks stay put) until its step is collected, and a model woken is not
        slept before it has been scheduled: active models admit their own queues before
        a wake may take their memory, and a model just woken gets its turn (else two
        models could wake and sleep each other without either running). Launch: every
        model's step on its own CUDA stream, without waiting. Collect: in rounds, wait
        for each in turn and take its outputs, so co-located models' kernels overlap on
        the device; free running, take the outputs of every step that has ended, waiting
        only when none has."""
        started = time.perf_counter()
        outputs, self._settled = self._settled, []
        errors, self._settle_errors = self._settle_errors, {}
        free = self.config.free_running
        if free:
            self._collect(outputs, errors, wait="none")
        self._swap_admission()
        names = [
            n for n, s in self.models.items()
            if s.state is ModelState.ACTIVE and not s.idle and n not in self._in_flight
            and not self._yields_turn(s)
        ]  # fmt: skip
        if names:  # rotate the order so no model always goes first (to take memory)
            self._turn = (self._turn + 1) % len(names)
            names = names[self._turn :] + names[: self._turn]
            names = self._below_share_first(self._slo_order(names))
        batches: dict[str, ScheduledBatch] = {}
        for name in names:
            slot = self.models[name]
            if slot.state is not ModelState.ACTIVE:
                continue  # slept for an earlier model of this round (it had nothing running)
            assert slot.engine is not None
            self._acting, self._acting_priority = name, slot.spec.priority
            self._protected.add(name)  # neither slept nor preempted until its step is done
            with _Busy(slot):
                try:
                    batches[name] = batch = slot.engine.schedule()
                except Exception as e:  # the other models' outputs must not be lost with it
                    errors[name] = e
                    continue
            if batch.requests:
                slot.steps += 1
                slot.prefill_tokens += _prefill_tokens(batch)
        self._wake_sleepers_with_work()
        self._admit_pending()
        for name, batch in batches.items():
            slot = self.models[name]
            assert slot.engine is not None
            with _Busy(slot), slot.stream_context():
                try:
                    step = slot.engine.launch_step(batch)
                except Exception as e:
                    errors[name] = e
                    if slot.stream is not None:  # what it queued ends before memory moves
                        slot.stream.synchronize()
                    continue
            if step is not None:
                self._in_flight[name] = (step, time.perf_counter())
        self.pool.refill_reserves()  # while the GPU runs the steps: keep reserves mapped
        launched = time.perf_counter()
        self._collect(outputs, errors, wait="all" if not free else "none" if outputs else "any")
        if batches:
            self._rounds += 1
            self._round_host_s += launched - started
            self._round_wait_s += time.perf_counter() - launched
        # Protected now: the models with a step in flight, and those woken with work that
        # have not been scheduled yet (woken in this call's memory phase, or since).
        self._protected = set(self._in_flight) | {
            n for n in self._protected
            if n not in batches and n in self.models and not self.models[n].idle
            and self.models[n].state is ModelState.ACTIVE
        }  # fmt: skip
        if errors:
            raise StepError(errors, outputs)
        return outputs

    def _yields_turn(self, slot: ModelSlot) -> bool:
        """Swap mode: nothing running and nothing it may admit before another model's
        turn — not scheduled, so that model's wake can take its place."""
        cutoff = slot.engine.scheduler.admit_before if slot.engine is not None else None
        if cutoff is None or slot.holds_kv:
            return False
        oldest = self._oldest_queued(slot.spec.name)
        return oldest is None or oldest >= cutoff

    def _below_share_first(self, names: list[str]) -> list[str]:
        """The models below their fair share of the KV schedule before those at or above
        it, each group in the order given. A model scheduled earlier in the round keeps
        its blocks until its step ran, so a model below its share ordered after one above
        it could never take back its share (`_relieve`) while the other stayed first — it
        would wait on the other's backlog, or chunk a long prompt and lose it again."""
        if self.config.mode is not WorkerMode.PRISM or len(names) < 2:
            return names
        share = self._fair_kv_share(None)  # between rounds nobody is taking memory
        return sorted(names, key=lambda n: self._kv_pages(n) >= share)

    def _slo_order(self, names: list[str]) -> list[str]:
        """The round's order when every model in it has an SLO: models with only running
        requests first (their decodes' growth comes before new admissions), then those
        with waiting requests in the order `LocalScheduler` admits their queue heads
        (Moore–Hodgson on deadline = arrival + the model's TTFT SLO). The first model
        schedules first: it takes memory first, and its step is launched first."""
        slos = {n: self.models[n].spec.slo for n in names}
        if len(names) < 2 or any(slo is None for slo in slos.values()):
            return names
        rate = self.config.prefill_flops_per_s or (3e14 if self.config.device != "cpu" else 1e11)
        pending, decoding = [], []
        estimators = {}
        for name in names:
            slot = self.models[name]
            assert slot.engine is not None
            waiting = list(itertools.islice(slot.engine.scheduler.waiting, _HEADS))
            if not waiting:
                decoding.append(name)
                continue
            flops = 2.0 * slot.config.num_parameters
            estimators[name] = lambda tokens, flops=flops: flops * tokens / rate
            pending += [
                PendingRequest(r.request_id, name, r.arrival_time,
                               r.num_tokens - r.num_computed_tokens, slot.spec.priority)
                for r in waiting
            ]  # fmt: skip
        if len(estimators) < 2:
            return names
        config = LocalSchedulerConfig({n: s for n, s in slos.items() if s is not None})
        order = LocalScheduler(config, estimators).order(pending, time.monotonic())
        ranked = list(dict.fromkeys(p.model for p in order))
        return decoding + ranked

    def _collect(
        self,
        outputs: list[tuple[str, RequestOutput]],
        errors: dict[str, Exception],
        wait: str,
        only: str | None = None,
    ) -> None:
        """Take the outputs of steps in flight (`only`: that model's): "all" waits for
        each in launch order, "any" for the first to end (then takes every one that
        has), "none" takes only those that have ended."""
        if wait == "any":
            while self._in_flight and not any(s.ready() for s, _ in self._in_flight.values()):
                time.sleep(_POLL_S)  # no wait-for-any-event in CUDA; this releases the GIL
        for name, (step, launched) in list(self._in_flight.items()):
            if (only is not None and name != only) or (wait != "all" and not step.ready()):
                continue
            del self._in_flight[name]
            slot = self.models[name]
            assert slot.engine is not None
            start = launched if self.config.free_running else time.perf_counter()
            try:
                step_outputs = slot.engine.complete_step(step)
            except Exception as e:
                errors[name] = e
                continue
            finally:  # rounds: the wait for this step; free running: its whole span
                slot.busy_s += time.perf_counter() - start
            for out in step_outputs:
                slot.output_tokens += len(out.new_token_ids)
                if out.finished:
                    self._owner.pop(out.request_id, None)
                outputs.append((name, out))
            slot.last_used = time.monotonic()

    def _settle(self, name: str) -> None:
        """Finish `name`'s step in flight, if any, before its memory or requests change
        outside `step()`; its outputs (or error) come with the next `step()`."""
        if name in self._in_flight:
            self._collect(self._settled, self._settle_errors, wait="all", only=name)

    def _wake_sleepers_with_work(self) -> None:
        """Models put to sleep with requests still queued in their engines."""
        for name, slot in self.models.items():
            if slot.state is ModelState.ASLEEP and not slot.idle:
                self.wake(name)

    def _admit_pending(self) -> None:
        for pending in list(self._pending):
            slot = self.models[pending.model]
            if slot.state is ModelState.ACTIVE or self.wake(pending.model):
                assert slot.engine is not None
                self._pending.remove(pending)
                try:
                    slot.engine.add_request(
                        pending.prompt, pending.params, pending.request_id,
                        arrival_time=pending.since,
                    )  # fmt: skip
                except ValueError as e:  # the engine it waited for refuses it
                    self._owner.pop(pending.request_id, None)
                    self._rejected.append((pending.model, pending.request_id, str(e)))

    def take_rejected(self) -> list[tuple[str, str, str]]:
        """The requests refused once their model woke, as (model, request id, why): held
        for a model whose engine did not exist yet, they met its checks (prompt length,
        token ids) only then. Whoever drives the loop tells their owners."""
        rejected, self._rejected = self._rejected, []
        return rejected

    def expire_pending(self) -> list[tuple[str, str]]:
        """Drop the requests that have waited `wake_timeout_s` or more for their model to
        wake; returns their (model, request id). The step never drops a request itself:
        whoever drives the loop calls this and tells the requests' owners."""
        timeout = self.config.wake_timeout_s
        if timeout is None or not self._pending:
            return []
        cutoff = time.monotonic() - timeout
        expired = [p for p in self._pending if p.since <= cutoff]
        for pending in expired:
            self._pending.remove(pending)
            self._owner.pop(pending.request_id, None)
        return [(p.model, p.request_id) for p in expired]

    def run_until_idle(self, max_steps: int = 100_000) -> list[tuple[str, RequestOutput]]:
        outputs: list[tuple[str, RequestOutput]] = []
        for _ in range(max_steps):
            if not self.has_work():
                return outputs
            outputs += self.step()
        raise RuntimeError(f"worker still busy after {max_steps} steps")

    # ---- introspection -----------------------------------------------------------------

    def stats(self) -> WorkerStats:
        models = []
        for name, slot in self.models.items():
            engine = slot.engine
            models.append(
                ModelStats(
                    name=name,
                    state=slot.state.value,
                    weight_bytes=slot.weight_bytes,
                    weights_mapped_bytes=(
                        slot.arena.account.num_owned * self.pool.page_size if slot.arena else 0
                    ),
                    kv_mapped_bytes=engine.kv_cache.mapped_bytes if engine else 0,
                    running=len(engine.scheduler.running) if engine else 0,
                    waiting=(len(engine.scheduler.waiting) if engine else 0)
                    + sum(p.model == name for p in self._pending),  # queued for its wake
                    wakes=slot.wakes,
                    sleeps=slot.sleeps,
                    last_wake_s=slot.last_wake_s,
                    host_bytes=slot.host_bytes,
                    busy_s=slot.busy_s,
                    output_tokens=slot.output_tokens,
                    preemptions=engine.scheduler.preemptions if engine else 0,
                    steps=slot.steps,
                    prefill_tokens=slot.prefill_tokens,
                )
            )
        pool = self.pool.stats()
        free = (pool.budget_pages - pool.owned_pages) * pool.page_size
        return WorkerStats(
            self.config.device, self.config.mode.value, self.config.budget_bytes, free,
            tuple(models), self._rounds, self._round_host_s, self._round_wait_s,
        )  # fmt: skip

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        for slot in self.models.values():
            if slot.engine is not None:
                slot.engine.kv.check_integrity()
                slot.engine.kv_cache.check_integrity()

    def close(self) -> None:
        for name in list(self._in_flight):
            self._settle(name)
        for name in list(self.models):
            slot = self.models.pop(name)
            slot.close()
        if self._sms is not None:
            self._sms.close()
        self.pool.close()


def _prefill_tokens(batch: ScheduledBatch) -> int:
    """Tokens of `batch` that are prompt (or recomputed) tokens, not a decode's one."""
    return sum(n for r, n in zip(batch.requests, batch.num_tokens, strict=True)
               if n > 1 or r.num_computed_tokens < r.num_tokens - 1)  # fmt: skip
