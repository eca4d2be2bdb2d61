"""`Instance`: one model on one simulated GPU — its memory, its queues, its engine steps.

It plays the part of a `ModelSlot` plus its engine's scheduler: requests wait (no KV),
are admitted (KV blocks for their prompt), prefill in chunks, then decode one token a
step until done. States as in the worker: CACHED (never woken here) → ACTIVE ⇄ ASLEEP;
WAKING while the weights are copied in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from prism.kvcache.victims import group_to_empty
from prism.memory.page_pool import PagePool
from prism.sim.cost_model import CostModel
from prism.sim.kv_cache import SimKVCache, SimWeights
from prism.sim.request import SimModel, SimRequest


class State(Enum):
    CACHED = "cached"
    WAKING = "waking"
    ACTIVE = "active"
    ASLEEP = "asleep"


@dataclass(slots=True)
class StepPlan:
    """One engine step of one instance: its decodes and the prefill chunks it runs."""

    instance: Instance
    seconds: float
    chunks: list[tuple[SimRequest, int]]  # (request, prompt tokens prefilled this step)


class Instance:
    def __init__(
        self,
        model: SimModel,
        gpu: int,
        pool: PagePool,
        *,
        block_size: int,
        overhead_bytes: int,
        kv_max_pages: int | None = None,
    ) -> None:
        self.model = model
        self.gpu = gpu
        self.state = State.CACHED
        name = f"{model.name}@{gpu}"
        weight_pages = -(-(model.shape.weight_bytes + overhead_bytes) // pool.page_size)
        self.weights = SimWeights(f"{name}/weights", weight_pages, pool, priority=model.priority)
        self.kv = SimKVCache(
            f"{name}/kv",
            model.shape,
            pool,
            block_size=block_size,
            max_pages=kv_max_pages,
            priority=model.priority,
        )
        self.waiting: deque[SimRequest] = deque()  # arrived, no KV yet
        self.prefilling: list[SimRequest] = []  # admitted, prompt not done
        self.decoding: list[SimRequest] = []  # producing one token per step
        self.last_used = 0.0  # time of the last arrival or step
        self.draining = False  # being moved away: finish what runs, take nothing new
        self.wakes = 0
        self.sleeps = 0
        # cumulative, as the live worker's ModelStats (the validation timelines compare them)
        self.busy_s = 0.0  # seconds of this model's steps (its share of each round)
        self.steps = 0  # engine steps (a decode segment's rounds count one each)
        self.output_tokens = 0
        self.prefill_tokens = 0  # prompt tokens computed, recomputation included
        self.preemptions = 0

    # ---- state -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    @property
    def holds_kv(self) -> bool:
        return bool(self.prefilling or self.decoding)

    @property
    def resident(self) -> bool:
        return self.state in (State.ACTIVE, State.WAKING)

    def memory_bytes(self, page_size: int) -> tuple[int, int]:
        """(weight bytes, KV bytes) mapped now."""
        return self.weights.account.num_owned * page_size, self.kv.mapped_pages * page_size

    # ---- wake and sleep --------------------------------------------------------------

    def take_memory(self) -> bool:
        """Map weights and the KV padding group (for a wake); False, with nothing taken,
        if the pool cannot give them."""
        if not self.weights.materialize():
            return False
        if not self.kv.wake():
            self.weights.evict()
            return False
        self.state = State.WAKING
        return True

    def finish_wake(self, now: float) -> None:
        self.state = State.ACTIVE
        self.wakes += 1
        self.last_used = now

    def sleep(self) -> int:
        """Give every page back; nothing may be running. Returns pages released."""
        if self.holds_kv:
            raise RuntimeError(f"{self.name}: cannot sleep with {self.running} requests running")
        if not self.resident:
            return 0
        released = self.kv.sleep() + self.weights.evict()
        self.state = State.ASLEEP
        self.sleeps += 1
        return released

    def close(self) -> None:
        self.kv.close()
        self.weights.close()

    # ---- admission and preemption -----------------------------------------------------

    def admit(self, request: SimRequest, max_seqs: int) -> bool:
        """Give a waiting request KV for its prompt (and first token); False if the
        engine is full or memory cannot be had."""
        if self.running >= max_seqs:
            return False
        blocks = self.kv.allocate(self.kv.blocks_for(request.to_prefill + 1))
        if blocks is None:
            return False
        request.blocks = blocks
        self.waiting.remove(request)
        self.prefilling.append(request)
        return True

    def preempt_newest(self) -> SimRequest | None:
        """Recompute-preempt the latest admitted request: free its KV, queue it first."""
        pool = self.prefilling or self.decoding
        if not pool:
            return None
        victim = max(pool, key=lambda r: (r.arrival, r.id))
        self._preempt(victim)
        return victim

    def _preempt(self, victim: SimRequest) -> None:
        (self.prefilling if victim in self.prefilling else self.decoding).remove(victim)
        self._free(victim)
        self.preemptions += 1
        victim.preempt()
        self.waiting.appendleft(victim)

    def release_for_pressure(self, pages: int) -> int:
        """Preempt the owners of a page group at a time, as the engine's `release_memory`
        chooses them (`group_to_empty`), until `pages` could be given back; trims and
        returns pages."""
        freed = 0
        while freed < pages:
            running = {r.id: r for r in (*self.prefilling, *self.decoding) if r.blocks}
            blocks = {i: r.blocks or [] for i, r in running.items()}
            victims = group_to_empty(blocks, self.kv.blocks_per_group)
            if not victims:
                break
            for victim in sorted((running[i] for i in victims), key=lambda r: (r.arrival, r.id)):
                self._preempt(victim)
            freed = self.kv.allocator.empty_groups * self.kv.group_pages
        return self.kv.trim(0)

    def _free(self, request: SimRequest) -> None:
        if request.blocks:
            self.kv.free(request.blocks)
        request.blocks = None

    # ---- engine steps ----------------------------------------------------------------

    def plan_step(
        self, cost: CostModel, token_budget: int, graph_tokens: Sequence[int] = ()
    ) -> StepPlan | None:
        """One step: every decode plus prefill chunks up to the token budget, replayed
        from the smallest of the engine's `graph_tokens` graphs that holds it (eager if
        none does)."""
        if not self.holds_kv:
            return None
        shape = self.model.shape
        batch = len(self.decoding)
        kv_tokens = sum(r.kv_tokens for r in self.decoding)
        budget = max(token_budget - batch, 0)
        chunks: list[tuple[SimRequest, int]] = []
        tokens = 0
        flops = 0.0
        for request in self.prefilling:
            if budget <= 0:
                break
            n = min(request.to_prefill, budget)
            chunks.append((request, n))
            flops += cost.prefill_flops(shape, n, request.kv_tokens)
            tokens += n
            budget -= n
        rows = batch + tokens
        graph = min((t for t in graph_tokens if t >= rows), default=0) if tokens else 0
        seconds = cost.step_s(shape, batch, kv_tokens, tokens, flops, len(chunks), graph)
        return StepPlan(self, seconds, chunks)

    def finish_step(self, plan: StepPlan, now: float) -> list[SimRequest]:
        """Apply one step that ended at `now`; returns the requests it finished."""
        done = self.decode(1, now)
        self.steps += 1
        self.busy_s += plan.seconds
        for request, n in plan.chunks:
            self.prefill_tokens += n
            request.to_prefill -= n
            request.kv_tokens += n
            if request.to_prefill == 0:
                self.prefilling.remove(request)
                if request.first_token < 0:
                    request.first_token = now
                request.generated += 1
                self.output_tokens += 1
                if request.remaining <= 0:
                    self._finish(request, now)
                    done.append(request)
                else:
                    self.decoding.append(request)
        self.last_used = now
        return done

    def decode_rounds_possible(self) -> int:
        """Rounds until the first running request finishes."""
        return min((r.output - r.generated for r in self.decoding), default=0)

    def decode_kv_tokens(self) -> int:
        return sum(r.kv_tokens for r in self.decoding)

    def reserve_decode(self, rounds: int) -> int:
        """Blocks for `rounds` more tokens of every decode, oldest first; returns the
        rounds that memory allows (fewer when short; requests are preempted when not
        even one more token fits)."""
        size = self.kv.block_size
        # Only requests whose blocks run out within `rounds` allocate (`rounds` only
        # shrinks below, so this is every request that could); the age order matters
        # only among them.
        needy = [
            r
            for r in self.decoding
            if (r.kv_tokens + rounds + size - 1) // size > len(r.blocks or ())
        ]
        if len(needy) > 1:
            needy.sort(key=lambda r: (r.arrival, r.id))
        for request in needy:
            if request.blocks is None:
                continue  # preempted below, for an older request
            need = self.kv.blocks_for(request.kv_tokens + rounds) - len(request.blocks)
            if need <= 0:
                continue
            got = self.kv.allocate(need)
            if got is not None:
                request.blocks += got
                continue
            slack = len(request.blocks) * size - request.kv_tokens
            if slack > 0:
                rounds = slack  # stop before this request needs its next block
                continue
            rounds = min(rounds, size)  # one more block: `size` more tokens
            while got is None:
                got = self.kv.allocate(1)
                if got is None and self.preempt_newest() in (request, None):
                    break
            if got is not None:
                request.blocks += got
        return rounds if self.decoding else 0

    def decode(self, rounds: int, now: float) -> list[SimRequest]:
        """Every decode produced `rounds` tokens, the last at `now`."""
        if not rounds:
            return []
        finished = False
        self.output_tokens += rounds * len(self.decoding)
        for request in self.decoding:
            request.generated += rounds
            request.kv_tokens += rounds
            if request.generated >= request.output:
                finished = True
        self.last_used = now
        if not finished:
            return []
        done = [r for r in self.decoding if r.generated >= r.output]
        self.decoding = [r for r in self.decoding if r.generated < r.output]
        for request in done:
            self._finish(request, now)
        return done

    def _finish(self, request: SimRequest, now: float) -> None:
        request.finish = now
        self._free(request)
