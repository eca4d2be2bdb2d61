"""`Scheduler` with a real `KVBlockManager` over a fake block pool: admission order,
token budget, running-before-waiting, preemption; and a hypothesis state machine over
add / step / finish / abort checking the block bookkeeping after every move."""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
from engine_helpers import FakeBlockSource, fake_request
from hypothesis import event, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from prism.engine import RequestStatus, SamplingParams
from prism.engine.kv_manager import KVBlockManager
from prism.engine.request import Request
from prism.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig

BS = 4


def make(
    num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 64, prefix_caching: bool = False,
    reserve: bool = True,
) -> tuple[Scheduler, KVBlockManager, FakeBlockSource]:  # fmt: skip
    source = FakeBlockSource(num_blocks)
    kv = KVBlockManager(source, BS, prefix_caching=prefix_caching)
    config = SchedulerConfig(max_num_seqs, budget, 256, reserve_prompt=reserve)
    return Scheduler(config, kv), kv, source


def request(prompt_len: int, start: int = 0, max_tokens: int = 8) -> Request:
    return fake_request(range(start, start + prompt_len), SamplingParams(max_tokens=max_tokens))


def advance(kv: KVBlockManager, batch: ScheduledBatch) -> None:
    """What the engine does after the model ran: count computed tokens, publish full
    blocks, and append a token to every request whose prompt is now complete."""
    for req, count in zip(batch.requests, batch.num_tokens, strict=True):
        req.num_computed_tokens += count
        kv.commit(req)
        if req.num_computed_tokens == req.num_tokens:
            req.token_ids.append(sum(req.token_ids[-3:]) % 11)


def test_fifo_admission_up_to_max_num_seqs() -> None:
    """Waiting requests are admitted in arrival order, no more than max_num_seqs."""
    sched, kv, _ = make(max_num_seqs=2)
    reqs = [request(5, 10 * i) for i in range(3)]
    for r in reqs:
        sched.add(r)
    batch = sched.schedule()
    assert batch.requests == reqs[:2] and batch.num_tokens == [5, 5]
    assert [r.status for r in reqs] == [RequestStatus.RUNNING] * 2 + [RequestStatus.WAITING]
    assert list(sched.waiting) == reqs[2:] and reqs[2].block_ids == []
    kv.check_integrity()


def test_admission_stops_at_requests_newer_than_the_cutoff() -> None:
    """With `admit_before` set, waiting requests that arrived at or after it stay queued
    (running ones still run); cleared, they are admitted."""
    sched, kv, _ = make()
    old, new = request(5, 0), request(5, 10)
    old.arrival_time, new.arrival_time = 1.0, 2.0
    sched.add(old)
    sched.add(new)
    sched.admit_before = 2.0
    batch = sched.schedule()
    assert batch.requests == [old] and list(sched.waiting) == [new]
    advance(kv, batch)
    assert sched.schedule().requests == [old]  # the running one decodes; new still waits
    sched.admit_before = None
    assert sched.schedule().requests == [old, new]
    kv.check_integrity()


def test_token_budget_chunks_prefills() -> None:
    """Each step computes at most max_num_batched_tokens: a prompt that does not fit is
    chunked, and later steps carry on with it beside the decodes."""
    sched, kv, _ = make(budget=16)
    reqs = [request(10, 100 * i) for i in range(3)]
    for r in reqs:
        sched.add(r)
    batch = sched.schedule()
    assert batch.requests == reqs[:2] and batch.num_tokens == [10, 6]
    assert reqs[2].status is RequestStatus.WAITING
    advance(kv, batch)
    batch = sched.schedule()
    assert batch.requests == reqs and batch.num_tokens == [1, 4, 10]
    for _ in range(20):
        advance(kv, batch)
        batch = sched.schedule()
        assert batch.total_tokens <= 16
    kv.check_integrity()


def test_running_requests_go_before_waiting_ones() -> None:
    """Requests already running are scheduled first, in arrival order; a newcomer gets
    what budget is left."""
    sched, kv, _ = make(budget=8)
    first, second = request(3), request(3, 50)
    sched.add(first)
    sched.add(second)
    advance(kv, sched.schedule())
    late = request(20, 200)
    sched.add(late)
    batch = sched.schedule()
    assert batch.requests == [first, second, late] and batch.num_tokens == [1, 1, 6]
    kv.check_integrity()


def test_preemption_takes_the_latest_arrival() -> None:
    """When a running request needs a block and the pool is dry, the most recently
    arrived running request is preempted: its blocks freed, its progress reset, its
    output kept, and it waits at the head of the queue, not re-admitted this step."""
    sched, kv, source = make(num_blocks=7, reserve=False)  # 6 usable blocks: three 8-token prompts
    # (blocks taken a chunk at a time, so the prompts fill the cache exactly)
    reqs = [request(8, 20 * i) for i in range(3)]
    for r in reqs:
        sched.add(r)
    advance(kv, sched.schedule())
    assert source.free_blocks == 0 and all(r.num_tokens == 9 for r in reqs)
    newcomer = request(2, 500)
    sched.add(newcomer)
    batch = sched.schedule()
    assert batch.preempted == [reqs[2]] and batch.requests == reqs[:2]
    victim = reqs[2]
    assert victim.status is RequestStatus.WAITING and victim.num_preemptions == 1
    assert victim.block_ids == [] and victim.num_computed_tokens == 0
    assert victim.num_tokens == 9 and victim.output_token_ids == reqs[2].token_ids[8:]
    assert list(sched.waiting) == [victim, newcomer]
    assert reqs[0].num_preemptions == reqs[1].num_preemptions == 0
    kv.check_integrity()


def test_request_preempts_itself_when_it_is_the_latest() -> None:
    """If the request that needs a block is itself the latest, it gives way."""
    sched, kv, source = make(
        num_blocks=5, reserve=False
    )  # 4 usable blocks, taken a chunk at a time
    a, b = request(8), request(7, 100)
    sched.add(a)
    sched.add(b)
    advance(kv, sched.schedule())
    assert source.free_blocks == 0
    batch = sched.schedule()  # a needs a 3rd block; b (latest) is preempted for it
    assert batch.requests == [a] and batch.preempted == [b]
    advance(kv, batch)
    sched.finish(a)
    batch = sched.schedule()
    assert batch.requests == [b] and batch.num_tokens == [b.num_tokens]
    kv.check_integrity()


def test_preempted_request_resumes_before_newer_ones() -> None:
    """A preempted request is recomputed (prompt and output) before later arrivals."""
    sched, kv, _ = make(num_blocks=7, budget=64, reserve=False)  # blocks a chunk at a time
    reqs = [request(8, 20 * i) for i in range(3)]
    for r in reqs:
        sched.add(r)
    advance(kv, sched.schedule())
    batch = sched.schedule()
    assert batch.preempted == [reqs[2]]
    advance(kv, batch)
    late = request(3, 900)
    sched.add(late)
    sched.finish(reqs[0])
    batch = sched.schedule()
    assert batch.requests[-1] is reqs[2] and batch.num_tokens[-1] == 9
    assert late.status is RequestStatus.WAITING
    kv.check_integrity()


def test_finish_frees_running_and_waiting_requests() -> None:
    """finish() removes a request from wherever it is and gives its blocks back."""
    sched, kv, source = make(max_num_seqs=1)
    running, waiting = request(6), request(6, 50)
    sched.add(running)
    sched.add(waiting)
    advance(kv, sched.schedule())
    sched.finish(waiting)
    sched.finish(running)
    assert sched.num_unfinished == 0 and source.free_blocks == 63
    assert running.is_finished and waiting.is_finished
    kv.check_integrity()


def test_empty_schedule() -> None:
    """Nothing to do gives an empty batch."""
    sched, _, _ = make()
    batch = sched.schedule()
    assert not batch and batch.total_tokens == 0


# ---- state machine ----------------------------------------------------------------------

PREFIXES = [(), (1, 2, 3, 4), (1, 2, 3, 4, 5, 6, 7, 8), (9, 9, 9, 9, 1, 2)]


class SchedulerMachine(RuleBasedStateMachine):
    """Random add / step / finish / abort against the real scheduler and block manager.

    The pool has 9 usable blocks of 4 tokens; a request is at most 14 + 10 tokens (6
    blocks), so every request fits alone and everything must eventually finish, while a
    few together overflow the pool and force preemptions.
    """

    @initialize(
        prefix_caching=st.booleans(), budget=st.sampled_from([3, 8, 64]), seqs=st.integers(1, 4),
        reserve=st.booleans(),
    )  # fmt: skip
    def setup(self, prefix_caching: bool, budget: int, seqs: int, reserve: bool) -> None:
        self.source = FakeBlockSource(10)
        self.kv = KVBlockManager(self.source, BS, prefix_caching=prefix_caching)
        self.config = SchedulerConfig(seqs, budget, 64, reserve_prompt=reserve)
        self.sched = Scheduler(self.config, self.kv)
        self.live: list[Request] = []

    @precondition(lambda self: len(self.live) < 8)
    @rule(
        prefix=st.sampled_from(PREFIXES),
        tail=st.lists(st.integers(0, 5), min_size=1, max_size=6),
        max_tokens=st.integers(1, 10),
    )
    def add(self, prefix: tuple[int, ...], tail: list[int], max_tokens: int) -> None:
        req = fake_request([*prefix, *tail], SamplingParams(max_tokens=max_tokens))
        self.sched.add(req)
        self.live.append(req)

    @rule()
    def step(self) -> None:
        batch = self.sched.schedule()
        assert batch.total_tokens <= self.config.max_num_batched_tokens
        assert all(n > 0 for n in batch.num_tokens)
        assert len({r.request_id for r in batch.requests}) == len(batch)
        assert not {r.request_id for r in batch.preempted} & {r.request_id for r in batch.requests}
        assert len(self.sched.running) <= self.config.max_num_seqs
        if batch.preempted:
            event("preempted")
        if any(r.num_cached_tokens for r in batch.requests):
            event("prefix hit")
        advance(self.kv, batch)
        for req in batch.requests:
            if req.num_output_tokens >= req.params.max_tokens:
                self.finish(req)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        self.finish(data.draw(st.sampled_from(self.live)))

    def finish(self, req: Request) -> None:
        self.sched.finish(req)
        self.live.remove(req)
        assert req.is_finished and req.block_ids == []

    @invariant()
    def blocks_are_accounted_for(self) -> None:
        """Every handed-out block is held by live requests or cached unheld, never both;
        a block held twice is a prefix-cached block whose refcount counts its holders."""
        self.kv.check_integrity()
        holders = Counter(b for r in self.live for b in r.block_ids)
        evictable = set(self.kv._evictable)  # the manager's own view, checked against ours
        assert not evictable & set(holders)
        assert self.source.allocated == set(holders) | evictable
        assert len(self.source.allocated) + self.source.free_blocks == 9
        for block, count in holders.items():
            if count > 1 or block in self.kv._refs:
                assert self.kv._refs.get(block) == count, f"block {block}"

    @invariant()
    def requests_hold_what_they_computed(self) -> None:
        """Waiting requests hold nothing; running ones hold blocks for exactly their
        computed tokens — or, with `reserve_prompt`, at least those and at most what
        their tokens and the next one need (the prompt was reserved at admission)."""
        for req in self.sched.waiting:
            assert req.status is RequestStatus.WAITING and not req.block_ids
        for req in self.sched.running:
            assert req.status is RequestStatus.RUNNING
            computed = self.kv.blocks_needed(req.num_computed_tokens)
            if self.config.reserve_prompt:
                assert computed <= len(req.block_ids)
                assert len(req.block_ids) <= self.kv.blocks_needed(req.num_tokens + 1)
            else:
                assert len(req.block_ids) == computed
            assert len(req.block_hashes) <= len(req.block_ids)
        assert len(self.sched.waiting) + len(self.sched.running) == len(self.live)

    def teardown(self) -> None:
        """Liveness: with no new arrivals, everything finishes in bounded steps."""
        if not hasattr(self, "sched"):
            return
        for _ in range(400):
            if not self.live:
                break
            self.step()
        assert not self.live, "requests left unfinished"
        self.kv.reset_prefix_cache()
        assert self.source.free_blocks == 9


SchedulerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None
)
test_scheduler_state_machine = SchedulerMachine.TestCase


def _long_prompt_into_short_cache(reserve: bool) -> tuple[Scheduler, Request]:
    """A request (16 prompt + 8 output tokens: 6 blocks at the end) holds part of a
    10-block cache; a 24-token prompt (6 blocks + 1 for its first token) arrives, with a
    budget of 8 tokens a step."""
    source = FakeBlockSource(10)
    kv = KVBlockManager(source, BS, prefix_caching=False)
    sched = Scheduler(SchedulerConfig(8, 8, 256, reserve_prompt=reserve), kv)
    first = request(16, 0, max_tokens=8)
    sched.add(first)
    for _ in range(2):
        advance(kv, sched.schedule())  # 16 prompt tokens in two chunks: 4 blocks
    long = request(24, 100)
    sched.add(long)
    return sched, long


def _finish_done(sched: Scheduler) -> None:
    for req in list(sched.running):
        if len(req.token_ids) - len(req.prompt_token_ids) >= req.params.max_tokens:
            sched.finish(req)


def test_chunk_by_chunk_admission_preempts_the_prompt_it_admitted() -> None:
    """Without reservation the long prompt is admitted on its first chunk's blocks and
    loses them (preempted) when the decode's growth and its next chunk do not fit."""
    sched, long = _long_prompt_into_short_cache(reserve=False)
    for _ in range(12):
        advance(sched.kv, sched.schedule())
        _finish_done(sched)
    assert long.num_preemptions > 0


def test_reserve_prompt_waits_instead_of_preempting() -> None:
    """With `reserve_prompt` the long prompt is admitted only once its whole prompt fits:
    nothing is preempted, and it is computed a chunk a step from then on."""
    sched, long = _long_prompt_into_short_cache(reserve=True)
    admitted_at = None
    for step in range(80):
        batch = sched.schedule()
        assert not batch.preempted
        if long in batch.requests and admitted_at is None:
            admitted_at = step
            assert len(long.block_ids) == 7  # 24 prompt tokens + the first output token
            assert batch.num_tokens[batch.requests.index(long)] <= 8
        advance(sched.kv, batch)
        _finish_done(sched)
        if long.num_computed_tokens >= 24:
            break
    assert admitted_at is not None and long.num_preemptions == 0
    sched.kv.check_integrity()
