"""`Scheduler`: which requests run this step, and how many of their tokens.

Running requests go first, in arrival order: a decode needs one token, an unfinished
prefill its next chunk. Then waiting requests are admitted while the token budget,
the sequence limit and the KV cache allow. Prefills are chunked to the budget, so a
long prompt never stalls the decodes running beside it. When the KV cache cannot give
a running request its next block, the most recently arrived running request is
preempted by recompute: its blocks are freed and it waits again, keeping its output.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from prism.engine.kv_manager import KVBlockManager
from prism.engine.request import Request, RequestStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 128  # sequences in one step
    max_num_batched_tokens: int = 2048  # tokens in one step: the chunked-prefill budget
    max_model_len: int = 4096  # prompt + output tokens of one request
    # Admit a request only when KV for its whole remaining prompt (and its first output
    # token) can be had, and hold it from admission; it is still computed a chunk a step.
    # Off: blocks a chunk at a time, so a prompt admitted into a full cache is preempted
    # (its chunks lost) when its next chunk does not fit, and admitted again — on the
    # H200 at 14 req/s an 8B model so churned made no first token for 4.8 s.
    reserve_prompt: bool = True


@dataclass(slots=True)
class ScheduledBatch:
    """The contract between scheduler and model runner for one step."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens to compute, per request
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVBlockManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0  # requests preempted so far (for its own growth or another's)
        # Waiting requests that arrived at or after this time (time.monotonic) are not
        # admitted: another model's older requests go first (the worker's swap mode)
        self.admit_before: float | None = None

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.config.max_num_batched_tokens)
        self._admit_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            count = min(req.num_tokens - req.num_computed_tokens, budget)
            if self._make_room(req, count, batch):
                batch.requests.append(req)
                batch.num_tokens.append(count)
                budget -= count
                i += 1
        return budget

    def _make_room(self, req: Request, count: int, batch: ScheduledBatch) -> bool:
        """Blocks for `count` more tokens of running `req`, preempting the latest running
        requests while the cache is short; False if `req` itself had to give way."""
        while not self.kv.allocate(req, count):
            victim = self.running.pop()
            self._preempt(victim, batch)
            if victim is req:
                return False
        return True

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req in batch.preempted:
                break  # not back in the step that preempted it
            if self.admit_before is not None and req.arrival_time >= self.admit_before:
                break  # its turn comes after another model's older requests
            count = self.kv.admit(req, budget, reserve=self.config.reserve_prompt)
            if count == 0:
                break  # the cache is full: the head of the queue waits
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_tokens.append(count)
            budget -= count

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_cached_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)
        batch.preempted.append(req)

    def preempt_latest(self) -> Request | None:
        """Preempt the most recently arrived running request (memory is wanted elsewhere)."""
        if not self.running:
            return None
        victim = self.running.pop()
        self._preempt(victim, ScheduledBatch())
        return victim

    def preempt(self, req: Request) -> None:
        """Preempt a running request (memory is wanted elsewhere)."""
        self.running.remove(req)
        self._preempt(req, ScheduledBatch())

    def finish(self, req: Request, *, free: bool = True) -> None:
        """Remove a finished or aborted request and free its blocks (unless `free` is
        False: a step still in flight uses them, and the caller frees them after it)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if free:
            self.kv.free(req)
        req.status = RequestStatus.FINISHED
