"""SimKVCache and SimWeights over the real PagePool and BlockAllocator: geometry,
reclaim levels, pressure hooks, and a random walk that keeps every ledger consistent."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from prism.memory.page_pool import PagePool
from prism.sim.cost_model import SHAPES
from prism.sim.kv_cache import SimKVCache, SimWeights
from prism.sim.vmm import SimVMM

MiB = 1 << 20


def _pool(pages: int) -> PagePool:
    return PagePool(SimVMM(2 * MiB), pages * 2 * MiB)


def test_group_geometry_matches_the_real_layout() -> None:
    """A group is one page in each of the 2·L K/V tensors (8B: 64 blocks = 1024 tokens)."""
    pool = _pool(10_000)
    kv = SimKVCache("8b", SHAPES["llama-3.1-8b"], pool)
    assert kv.group_pages == 64 and kv.blocks_per_group == 64
    one_b = SimKVCache("1b", SHAPES["llama-3.2-1b"], pool)
    assert one_b.group_pages == 32 and one_b.blocks_per_group == 128
    kv.check_integrity()
    pool.check_integrity()


def test_wake_maps_the_padding_group_and_sleep_returns_everything() -> None:
    pool = _pool(1000)
    kv = SimKVCache("a", SHAPES["llama-3.2-1b"], pool)
    assert kv.asleep and kv.mapped_pages == 0
    assert kv.wake()
    assert kv.mapped_pages == kv.group_pages and kv.used_blocks == 0
    blocks = kv.allocate(200)
    assert blocks is not None and kv.used_blocks == 200
    kv.free(blocks)
    mapped = kv.mapped_pages
    assert mapped == 2 * kv.group_pages  # 200 blocks + padding, 128 blocks a group
    assert kv.sleep() == mapped and kv.asleep
    assert pool.stats().owned_pages == 0
    pool.check_integrity()


def test_a_dry_pool_takes_other_caches_free_groups_then_asks_their_owner() -> None:
    """FREE level first (empty groups of another cache), then the PRESSURE hook."""
    pool = _pool(96)  # three 32-page groups of a 1B cache
    a = SimKVCache("a", SHAPES["llama-3.2-1b"], pool)
    b = SimKVCache("b", SHAPES["llama-3.2-1b"], pool)
    assert a.wake() and b.wake()
    held = a.allocate(a.blocks_per_group)  # a maps its second group
    assert held is not None
    a.free(held)  # ... which is now empty: reclaimable at FREE level
    asked: list[int] = []

    def decline(pages: int) -> int:
        asked.append(pages)
        return 0

    a.on_pressure = b.on_pressure = decline
    assert b.allocate(b.blocks_per_group) is not None  # took a's empty group
    assert not asked and a.mapped_pages == a.group_pages
    assert a.allocate(a.blocks_per_group) is None  # only b's live blocks are left: b is asked
    assert asked == [b.group_pages]
    for cache in (a, b):
        cache.check_integrity()
    pool.check_integrity()


def test_weights_are_all_or_nothing() -> None:
    pool = _pool(100)
    w = SimWeights("w", 60, pool)
    assert w.materialize() and w.resident
    other = SimWeights("x", 60, pool)
    assert not other.materialize()  # 40 left; weights never go by halves
    w.on_pressure = lambda pages: w.evict()
    assert other.materialize()  # the pool made w give its pages back
    assert not w.resident
    pool.check_integrity()


class CacheMachine(RuleBasedStateMachine):
    """Two caches and a weights tenant on one small pool, driven at random."""

    def __init__(self) -> None:
        super().__init__()
        self.vmm = SimVMM(2 * MiB)
        self.pool = PagePool(self.vmm, 200 * 2 * MiB)
        self.caches = [
            SimKVCache(f"kv{i}", SHAPES["llama-3.2-1b"], self.pool, reserve_groups=i)
            for i in range(2)
        ]
        self.weights = SimWeights("w", 50, self.pool)
        self.held: list[list[list[int]]] = [[], []]

    @rule(i=st.integers(0, 1), count=st.integers(1, 300))
    def allocate(self, i: int, count: int) -> None:
        cache = self.caches[i]
        if cache.asleep:
            cache.wake()
            return
        blocks = cache.allocate(count)
        if blocks is not None:
            self.held[i].append(blocks)

    @precondition(lambda self: any(self.held))
    @rule(i=st.integers(0, 1))
    def free(self, i: int) -> None:
        if self.held[i]:
            self.caches[i].free(self.held[i].pop())

    @rule(i=st.integers(0, 1))
    def sleep_if_idle(self, i: int) -> None:
        if not self.held[i]:
            self.caches[i].sleep()

    @rule(i=st.integers(0, 1), keep=st.integers(0, 2))
    def trim(self, i: int, keep: int) -> None:
        if not self.caches[i].asleep:
            self.caches[i].trim(keep)

    @rule()
    def refill(self) -> None:
        self.pool.refill_reserves()

    @rule()
    def toggle_weights(self) -> None:
        if self.weights.resident:
            self.weights.evict()
        else:
            self.weights.materialize()

    @invariant()
    def ledgers_agree(self) -> None:
        for i, cache in enumerate(self.caches):
            cache.check_integrity()
            assert cache.used_blocks == sum(len(b) for b in self.held[i])
        self.pool.check_integrity()
        assert self.vmm.live == self.pool.stats().created_pages


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
