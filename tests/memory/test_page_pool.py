"""PagePool: the ledger of pooled page handles, its tenants, limits, budget and reclaim.

The pool and the HostVMM under it are real; `FakeConsumer` stands for what would map a
tenant's pages (a KV cache, a weight arena): it really holds the handles the pool gave
it and gives them back through `PagePool.release`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from prism.memory import (
    DefaultReclaimPolicy,
    HostVMM,
    OutOfPhysicalMemory,
    PageNotOwned,
    PagePool,
    PoolError,
    ReclaimLevel,
    TenantAccount,
    TenantLimitExceeded,
    UnknownTenant,
)

PAGE = 64 << 10
RESERVE, FREE, PRESSURE = ReclaimLevel.RESERVE, ReclaimLevel.FREE, ReclaimLevel.PRESSURE
CACHED = ReclaimLevel.CACHED


class FakeConsumer:
    """A tenant's consumer holding real pool pages in piles, one per reclaim level.

    RESERVE: warm reserve; FREE: empty pages beyond it; CACHED: pages holding cached
    prefixes; PRESSURE: pages holding data, given up only when `yields_live`. A `busy`
    consumer declines every shrink.
    """

    def __init__(
        self,
        pool: PagePool,
        name: str,
        *,
        min_pages: int = 0,
        max_pages: int | None = None,
        priority: int = 0,
        reserve_target: int = 0,
        yields_live: bool = True,
        log: list[tuple[str, ReclaimLevel, int]] | None = None,
    ) -> None:
        self.pool = pool
        self.name = name
        self.piles: dict[ReclaimLevel, list[int]] = {level: [] for level in ReclaimLevel}
        self.reserve_target = reserve_target
        self.yields_live = yields_live
        self.busy = False
        self.log = [] if log is None else log  # (name, level, pages) per shrink, in order
        self._lock = threading.Lock()
        self.account = pool.register(
            name, min_pages=min_pages, max_pages=max_pages, priority=priority, consumer=self
        )

    @property
    def held(self) -> set[int]:
        with self._lock:
            return {p for pile in self.piles.values() for p in pile}

    def count(self, level: ReclaimLevel) -> int:
        return len(self.piles[level])

    def take(self, count: int, level: ReclaimLevel = PRESSURE, *, reclaim: bool = True) -> bool:
        pages = self.pool.acquire(self.name, count, reclaim=reclaim)
        if pages is None:
            return False
        with self._lock:
            self.piles[level] += pages
        return True

    def give(self, count: int, level: ReclaimLevel = PRESSURE) -> None:
        """Release `count` pages of a pile of the consumer's own accord."""
        with self._lock:
            pile = self.piles[level]
            pages = pile[len(pile) - count :]
            del pile[len(pile) - count :]
        self.pool.release(self.name, pages)

    def move(self, count: int, src: ReclaimLevel, dst: ReclaimLevel) -> None:
        """Pages change role (a reserve page gets used, a live page is freed)."""
        with self._lock:
            pile = self.piles[src]
            moved = pile[len(pile) - count :]
            del pile[len(pile) - count :]
            self.piles[dst] += moved

    # ---- PoolConsumer -------------------------------------------------------------

    def reclaimable(self, level: ReclaimLevel) -> int:
        if level is PRESSURE and not self.yields_live:
            return 0
        return len(self.piles[level])

    def shrink(self, pages: int, level: ReclaimLevel) -> int:
        if self.busy:
            return 0
        with self._lock:
            give = min(pages, self.reclaimable(level))
            pile = self.piles[level]
            taken = pile[len(pile) - give :]
            del pile[len(pile) - give :]
        if give:
            self.pool.release(self.name, taken, reclaimed=True)
            self.log.append((self.name, level, give))
        return give

    def refill_reserve(self) -> None:
        missing = self.reserve_target - self.count(RESERVE)
        fill = min(missing, self.pool.available(self.name))
        if fill > 0:
            self.take(fill, RESERVE, reclaim=False)


class CappedHostVMM(HostVMM):
    """The real host backend, made to run out of physical memory after `cap` pages."""

    def __init__(self, page_size: int, cap: int) -> None:
        super().__init__(page_size)
        self.cap = cap

    def create(self) -> int:
        if self.live_pages >= self.cap:
            raise OutOfPhysicalMemory("fallocate(create)", "ENOMEM (test cap)")
        return super().create()


@pytest.fixture
def vmm() -> Iterator[HostVMM]:
    backend = HostVMM(PAGE)
    yield backend
    backend.close()


@pytest.fixture
def pool(vmm: HostVMM) -> Iterator[PagePool]:
    p = PagePool(vmm, 16 * PAGE)
    yield p
    p.stop_refiller()


def _owned(pool: PagePool, name: str) -> int:
    return pool.tenant(name).num_owned


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return condition()


# ---- acquire / release ----------------------------------------------------------------


def test_acquire_and_release_reuse_pooled_handles(pool: PagePool, vmm: HostVMM) -> None:
    """Released pages stay created and go to the next tenant without a new create."""
    pool.register("a")
    pool.register("b")
    pages = pool.acquire("a", 4)
    assert pages is not None and len(set(pages)) == 4
    assert vmm.live_pages == 4 and pool.tenant("a").owned == set(pages)
    pool.release("a", pages)
    stats = pool.stats()
    assert (stats.created_pages, stats.free_pages, stats.owned_pages) == (4, 4, 0)
    again = pool.acquire("b", 3)
    assert again is not None and set(again) <= set(pages)
    assert vmm.live_pages == 4  # no page was created for b
    assert pool.acquire("b", 0) == []
    pool.release("b", again)
    pool.check_integrity()


def test_budget_caps_created_pages(pool: PagePool, vmm: HostVMM) -> None:
    """With no one to reclaim from, an acquire past the budget answers None."""
    pool.register("a")
    pool.register("b")
    assert pool.acquire("a", 10) is not None
    assert pool.available("b") == 6
    assert pool.acquire("b", 7) is None
    assert pool.tenant("b").failed_acquires == 1
    assert pool.events[-1].kind == "no_memory" and pool.events[-1].tenant == "b"
    assert pool.acquire("b", 6) is not None
    assert vmm.live_pages == 16 and pool.available("a") == 0
    pool.check_integrity()


def test_acquire_is_all_or_none(pool: PagePool, vmm: HostVMM) -> None:
    """A failed acquire leaves the ledger exactly as it was."""
    pool.register("a")
    pool.register("b")
    a_pages = pool.acquire("a", 15)
    assert a_pages is not None
    pool.release("a", a_pages[:3])  # 3 free, 1 never created: 4 to be had
    before = pool.stats()
    assert pool.acquire("b", 5) is None
    after = pool.stats()
    assert (after.created_pages, after.free_pages) == (before.created_pages, before.free_pages)
    assert _owned(pool, "b") == 0 and vmm.live_pages == 15
    assert pool.acquire("b", 4) is not None
    pool.check_integrity()


def test_tenant_limit_raises_whatever_the_pool_holds(pool: PagePool) -> None:
    """Asking past a tenant's own limit raises TenantLimitExceeded, even in an empty pool."""
    pool.register("a", max_pages=4)
    with pytest.raises(TenantLimitExceeded, match="limit of 4"):
        pool.acquire("a", 5)
    assert pool.acquire("a", 3) is not None
    with pytest.raises(TenantLimitExceeded):
        pool.acquire("a", 2)
    assert pool.available("a") == 1 and _owned(pool, "a") == 3
    pool.check_integrity()


def test_double_free_and_foreign_pages_raise_page_not_owned(pool: PagePool) -> None:
    """Pages not owned by the releasing tenant are refused, and nothing is released."""
    pool.register("a")
    pool.register("b")
    a_pages = pool.acquire("a", 3)
    b_pages = pool.acquire("b", 2)
    assert a_pages is not None and b_pages is not None
    with pytest.raises(PageNotOwned):
        pool.release("a", [a_pages[0], b_pages[0]])  # one foreign page
    with pytest.raises(PageNotOwned):
        pool.release("a", [a_pages[0], a_pages[0]])  # the same page twice in one call
    with pytest.raises(PageNotOwned):
        pool.release("a", [10_000])  # never created
    assert pool.tenant("a").owned == set(a_pages) and pool.stats().free_pages == 0
    pool.release("a", a_pages[:1])
    with pytest.raises(PageNotOwned, match="double free"):
        pool.release("a", a_pages[:1])
    assert _owned(pool, "a") == 2
    pool.release("a", a_pages[1:])
    pool.release("b", b_pages)
    pool.check_integrity()


def test_unknown_tenant_raises(pool: PagePool) -> None:
    """Every call naming an unregistered tenant raises UnknownTenant, listing the known ones."""
    pool.register("a")
    calls: list[Callable[[], object]] = [
        lambda: pool.acquire("x", 1),
        lambda: pool.release("x", []),
        lambda: pool.available("x"),
        lambda: pool.tenant("x"),
        lambda: pool.set_limit("x", 3),
        lambda: pool.reclaim_from("x", 1, RESERVE),
        lambda: pool.unregister("x"),
    ]
    for call in calls:
        with pytest.raises(UnknownTenant, match=r"'x'.*\['a'\]"):
            call()
    pool.check_integrity()


def test_register_and_unregister_rules(pool: PagePool) -> None:
    """Names are unique, limits ordered, and a tenant leaves only with nothing owned."""
    pool.register("a", min_pages=2, max_pages=5)
    with pytest.raises(PoolError, match="already registered"):
        pool.register("a")
    with pytest.raises(PoolError, match="min_pages <= max_pages"):
        pool.register("b", min_pages=4, max_pages=3)
    with pytest.raises(PoolError):
        pool.register("b", min_pages=-1)
    assert pool.tenant("a").max_pages == 5
    assert pool.register("c").max_pages == pool.budget_pages  # default limit: the budget
    pages = pool.acquire("a", 2)
    assert pages is not None
    with pytest.raises(PoolError, match="still owns 2"):
        pool.unregister("a")
    pool.release("a", pages)
    pool.unregister("a")
    pool.register("a")  # the name is free again
    pool.check_integrity()


def test_min_pages_admission(pool: PagePool) -> None:
    """Tenants are admitted while their guaranteed minimums fit in the budget."""
    pool.register("a", min_pages=10)
    pool.register("b", min_pages=6)
    with pytest.raises(PoolError, match="does not fit"):
        pool.register("c", min_pages=1)
    pool.register("c")  # no guarantee: always admitted
    with pytest.raises(PoolError, match="below the guaranteed 16"):
        pool.set_budget(15 * PAGE)
    with pytest.raises(PoolError, match="below its minimum"):
        pool.set_limit("a", 9)
    pool.check_integrity()


def test_budget_is_memory_minus_headroom(vmm: HostVMM) -> None:
    """budget_pages counts whole pages of budget − headroom; less than a page is refused."""
    with pytest.raises(PoolError, match="less than one page"):
        PagePool(vmm, 2 * PAGE, headroom_bytes=PAGE + 1)
    pool = PagePool(vmm, 10 * PAGE + 100, headroom_bytes=3 * PAGE)
    assert pool.budget_pages == 7
    pool.check_integrity()


def test_out_of_physical_memory_is_none_not_an_exception() -> None:
    """When the backend cannot create pages, acquire answers None and the ledger rolls back."""
    vmm = CappedHostVMM(PAGE, cap=5)
    pool = PagePool(vmm, 16 * PAGE)
    pool.register("a")
    assert pool.acquire("a", 8) is None
    stats = pool.stats()
    # The 5 pages that were created before the failure stay, free, in the pool.
    assert (stats.created_pages, stats.free_pages, vmm.live_pages) == (5, 5, 5)
    assert pool.acquire("a", 5) is not None
    vmm.close()
    pool.check_integrity()


def test_prewarm_keeps_the_ledger_when_the_backend_is_full() -> None:
    """prewarm passes OutOfPhysicalMemory on, keeping the pages it did create."""
    vmm = CappedHostVMM(PAGE, cap=3)
    pool = PagePool(vmm, 16 * PAGE)
    with pytest.raises(OutOfPhysicalMemory):
        pool.prewarm(8)
    stats = pool.stats()
    assert (stats.created_pages, stats.free_pages, vmm.live_pages) == (3, 3, 3)
    vmm.close()
    pool.check_integrity()


# ---- limits, budget, trim, prewarm ---------------------------------------------------------


def test_set_limit_shrinks_through_the_consumer(pool: PagePool) -> None:
    """Lowering a limit takes pages back level by level: reserve, then free, then live."""
    log: list[tuple[str, ReclaimLevel, int]] = []
    a = FakeConsumer(pool, "a", log=log)
    a.take(2, RESERVE)
    a.take(2, FREE)
    a.take(4, PRESSURE)
    assert pool.set_limit("a", 3) == 0
    assert log == [("a", RESERVE, 2), ("a", FREE, 2), ("a", PRESSURE, 1)]
    assert _owned(pool, "a") == 3 == len(a.held) and pool.tenant("a").max_pages == 3
    assert [(e.kind, e.pages) for e in list(pool.events)[-4:]] == [
        ("limit", 3),
        ("reclaim", 2),
        ("reclaim", 2),
        ("reclaim", 1),
    ]
    assert pool.tenant("a").reclaimed_total == 5
    pool.check_integrity()


def test_set_limit_reports_pages_it_could_not_take(pool: PagePool) -> None:
    """A consumer that keeps its live pages leaves the tenant over its new limit."""
    a = FakeConsumer(pool, "a", yields_live=False)
    a.take(1, FREE)
    a.take(5, PRESSURE)
    assert pool.set_limit("a", 2) == 3
    assert _owned(pool, "a") == 5
    with pytest.raises(TenantLimitExceeded):
        pool.acquire("a", 1)
    a.give(3)  # the owner preempts and gives back what it held over
    assert pool.set_limit("a", 2) == 0
    pool.check_integrity()


def test_lowering_the_budget_destroys_surplus_pages(pool: PagePool, vmm: HostVMM) -> None:
    """set_budget destroys free pages beyond it at once, and owned ones as they come back."""
    pool.register("a")
    pool.register("b")
    pages = pool.acquire("a", 12)
    assert pages is not None
    pool.release("a", pages[6:])  # created 12: owned 6, free 6
    assert pool.set_budget(8 * PAGE) == 0
    assert vmm.live_pages == 8 and pool.stats().free_pages == 2
    assert pool.set_budget(4 * PAGE) == 2  # owned 6 > budget 4: two pages still over
    assert vmm.live_pages == 6 and pool.stats().free_pages == 0
    pool.release("a", pages[:3])  # two of these are destroyed, one stays free
    stats = pool.stats()
    assert (stats.created_pages, stats.free_pages, vmm.live_pages) == (4, 1, 4)
    assert pool.acquire("b", 2) is None  # 1 free, no room to create
    assert pool.events[-1].kind == "no_memory"
    pool.set_budget(16 * PAGE)
    assert pool.acquire("b", 2) is not None and vmm.live_pages == 5
    pool.check_integrity()


def test_trim_destroys_free_pages(pool: PagePool, vmm: HostVMM) -> None:
    """trim keeps `keep_free` free pages and destroys the rest."""
    pool.register("a")
    pages = pool.acquire("a", 10)
    assert pages is not None
    pool.release("a", pages[:7])
    assert pool.trim(keep_free=2) == 5
    assert vmm.live_pages == 5 and pool.stats().free_pages == 2
    assert pool.trim() == 2 and pool.trim() == 0
    assert vmm.live_pages == 3 == pool.stats().created_pages
    pool.check_integrity()


def test_prewarm_creates_ahead_within_the_budget(pool: PagePool, vmm: HostVMM) -> None:
    """prewarm creates free pages (up to the budget) that later acquires draw from."""
    pool.register("a")
    assert pool.prewarm(6) == 6 and vmm.live_pages == 6
    pages = pool.acquire("a", 6)
    assert pages is not None and vmm.live_pages == 6  # nothing created on the request path
    assert pool.prewarm(100) == 10 and vmm.live_pages == 16
    assert pool.prewarm(1) == 0
    pool.release("a", pages)
    pool.check_integrity()


def test_unpooled_mode_destroys_on_release(vmm: HostVMM) -> None:
    """The unpooled baseline keeps no free pages: release destroys, acquire creates."""
    pool = PagePool(vmm, 16 * PAGE, pooled=False)
    pool.register("a")
    pages = pool.acquire("a", 5)
    assert pages is not None
    pool.release("a", pages[:3])
    stats = pool.stats()
    assert (stats.created_pages, stats.free_pages, vmm.live_pages) == (2, 0, 2)
    pool.release("a", pages[3:])
    assert vmm.live_pages == 0
    pool.check_integrity()


def test_events_and_stats(vmm: HostVMM) -> None:
    """Every ledger change is an event; stats show each tenant's counters."""
    pool = PagePool(vmm, 8 * PAGE, max_events=5)
    pool.register("a", min_pages=1, max_pages=6, priority=2)
    b = FakeConsumer(pool, "b")
    b.take(4, FREE)
    pages = pool.acquire("a", 6)  # 4 unclaimed, 2 reclaimed from b
    assert pages is not None
    pool.release("a", pages[:1])
    assert [(e.kind, e.tenant, e.pages) for e in pool.events] == [
        ("acquire", "b", 4),
        ("reclaim", "b", 2),
        ("acquire", "a", 6),
        ("release", "a", 1),
    ]
    pool.acquire("b", 5)  # a outranks b: no pressure on it, so no memory
    pool.set_budget(8 * PAGE)
    assert len(pool.events) == 5  # bounded
    assert [e.kind for e in pool.events][-2:] == ["no_memory", "budget"]
    times = [e.time for e in pool.events]
    assert times == sorted(times)
    stats = pool.stats()
    assert (stats.page_size, stats.budget_pages, stats.created_pages) == (PAGE, 8, 8)
    assert (stats.free_pages, stats.owned_pages) == (1, 7)
    a_stats, b_stats = stats.tenants
    assert (a_stats.name, a_stats.owned_pages, a_stats.min_pages) == ("a", 5, 1)
    assert (a_stats.max_pages, a_stats.priority, a_stats.reclaimed_total) == (6, 2, 0)
    assert (b_stats.owned_pages, b_stats.reclaimed_total, b_stats.failed_acquires) == (2, 2, 1)
    account = pool.tenant("a")
    assert (account.acquired_total, account.released_total) == (6, 1)
    pool.check_integrity()


# ---- reclaim policy -------------------------------------------------------------------------


def _full_pool(vmm: HostVMM) -> tuple[PagePool, list[tuple[str, ReclaimLevel, int]]]:
    """A 12-page pool shared by b and c, each with 2 reserve, 2 free and 2 live pages."""
    pool = PagePool(vmm, 12 * PAGE)
    log: list[tuple[str, ReclaimLevel, int]] = []
    pool.register("a")
    for name in ("b", "c"):
        tenant = FakeConsumer(pool, name, log=log)
        for level in (RESERVE, FREE, PRESSURE):
            tenant.take(2, level)
    return pool, log


def test_reclaim_takes_reserves_then_free_then_pressure(vmm: HostVMM) -> None:
    """Warm reserves go first, then free pages, then live ones; larger holders first."""
    pool, log = _full_pool(vmm)
    assert pool.acquire("a", 5) is not None
    assert log == [("b", RESERVE, 2), ("c", RESERVE, 2), ("b", FREE, 1)]
    log.clear()
    # b now holds 3, c 4: the larger holder gives first within a level.
    assert pool.acquire("a", 5) is not None
    assert log == [("c", FREE, 2), ("b", FREE, 1), ("c", PRESSURE, 2)]
    assert pool.stats().free_pages == 0 and _owned(pool, "a") == 10
    pool.check_integrity()


def test_cached_prefixes_go_after_free_pages_and_before_live_ones(vmm: HostVMM) -> None:
    """CACHED sits between FREE and PRESSURE; a grower that stops at CACHED never reaches
    live memory, and gets nothing when only live memory could give."""
    pool = PagePool(vmm, 8 * PAGE)
    log: list[tuple[str, ReclaimLevel, int]] = []
    pool.register("a")
    b = FakeConsumer(pool, "b", log=log)
    for level in (FREE, CACHED, PRESSURE):
        b.take(2, level)
    c = FakeConsumer(pool, "c", log=log)
    c.take(2, PRESSURE)
    assert pool.acquire("a", 3, reclaim=CACHED) is not None
    assert log == [("b", FREE, 2), ("b", CACHED, 1)]
    log.clear()
    assert pool.acquire("a", 2, reclaim=CACHED) is None and log == [("b", CACHED, 1)]
    log.clear()  # b's last cached page is free now: only one more must come from live data
    assert pool.acquire("a", 2) is not None and log == [("b", PRESSURE, 1)]
    pool.check_integrity()


def test_reclaim_asks_for_no_more_than_needed(vmm: HostVMM) -> None:
    """Free and uncreated pages are used before anyone is asked; then only the shortfall."""
    pool, log = _full_pool(vmm)
    pool.set_budget(14 * PAGE)
    assert pool.acquire("a", 2) is not None and log == []
    assert pool.acquire("a", 3) is not None
    assert log == [("b", RESERVE, 2), ("c", RESERVE, 1)]
    pool.check_integrity()


def test_lower_priority_gives_first(vmm: HostVMM) -> None:
    """Within a level the lowest priority tenant is asked first, whatever it holds."""
    pool = PagePool(vmm, 8 * PAGE)
    log: list[tuple[str, ReclaimLevel, int]] = []
    pool.register("a", priority=5)
    high = FakeConsumer(pool, "high", priority=3, log=log)
    low = FakeConsumer(pool, "low", priority=1, log=log)
    high.take(6, FREE)
    low.take(2, FREE)
    assert pool.acquire("a", 3) is not None
    assert log == [("low", FREE, 2), ("high", FREE, 1)]
    pool.check_integrity()


def test_pressure_spares_higher_priority_tenants(vmm: HostVMM) -> None:
    """Live memory of a tenant that outranks the requester is not taken."""
    pool = PagePool(vmm, 8 * PAGE)
    log: list[tuple[str, ReclaimLevel, int]] = []
    pool.register("a", priority=0)
    high = FakeConsumer(pool, "high", priority=1, log=log)
    high.take(1, RESERVE)
    high.take(7, PRESSURE)
    assert pool.acquire("a", 2) is None
    assert log == [("high", RESERVE, 1)]  # its reserve went; its live pages did not
    assert high.count(PRESSURE) == 7 and pool.stats().free_pages == 1
    pool.check_integrity()


def test_pressure_on_anyone_when_requester_is_below_its_minimum(vmm: HostVMM) -> None:
    """A requester short of its guarantee may take live pages even from higher priority."""
    pool = PagePool(vmm, 8 * PAGE)
    log: list[tuple[str, ReclaimLevel, int]] = []
    pool.register("a", min_pages=2, priority=0)
    high = FakeConsumer(pool, "high", priority=1, log=log)
    high.take(8, PRESSURE)
    assert pool.acquire("a", 2) is not None
    assert log == [("high", PRESSURE, 2)]
    # Now at its minimum, a no longer outranks anyone's live memory.
    assert pool.acquire("a", 1) is None
    pool.check_integrity()


def test_reclaim_never_goes_below_a_minimum(vmm: HostVMM) -> None:
    """A tenant gives at most what it holds above its minimum, summed over all levels."""
    pool = PagePool(vmm, 8 * PAGE)
    pool.register("a")
    b = FakeConsumer(pool, "b", min_pages=4)
    for level in ReclaimLevel:
        b.take(2, level)  # owns 6: only 2 above its minimum
    assert pool.acquire("a", 6) is None
    assert _owned(pool, "b") == 4
    assert pool.acquire("a", 4) is not None
    assert _owned(pool, "b") == 4
    pool.check_integrity()


def test_policy_plan_respects_minimums_across_levels() -> None:
    """The plan never lists more pages from a tenant than it holds above its minimum."""

    class Counts:
        def reclaimable(self, level: ReclaimLevel) -> int:
            return 4

        def shrink(self, pages: int, level: ReclaimLevel) -> int:
            return 0

        def refill_reserve(self) -> None:
            return None

    requester = TenantAccount("r", 0, 100, 0, None)
    other = TenantAccount("t", 6, 100, 0, Counts())
    other.owned = set(range(10))
    steps = DefaultReclaimPolicy().plan(requester, 100, [requester, other])
    assert all(step.tenant is other for step in steps)
    assert [s.level for s in steps] == sorted(s.level for s in steps)
    assert sum(s.pages for s in steps) == 4


def test_busy_consumer_declines_and_pool_moves_on(vmm: HostVMM) -> None:
    """A consumer that is busy gives nothing; the pool takes from the next one instead."""
    pool = PagePool(vmm, 8 * PAGE)
    log: list[tuple[str, ReclaimLevel, int]] = []
    pool.register("a")
    big = FakeConsumer(pool, "big", log=log)
    small = FakeConsumer(pool, "small", log=log)
    big.take(5, FREE)
    small.take(3, FREE)
    big.busy = True
    assert pool.acquire("a", 2) is not None
    assert log == [("small", FREE, 2)] and _owned(pool, "big") == 5
    assert pool.acquire("a", 2) is None  # big still busy, small has 1
    big.busy = False
    pool.check_integrity()


def test_tenants_without_a_consumer_are_never_asked(vmm: HostVMM) -> None:
    """A tenant registered without a consumer keeps its pages under any pressure."""
    pool = PagePool(vmm, 4 * PAGE)
    pool.register("plain", priority=-5)
    pool.register("a", min_pages=2, priority=9)
    assert pool.acquire("plain", 4) is not None
    assert pool.acquire("a", 2) is None
    assert pool.reclaim_from("plain", 4, PRESSURE) == 0
    pool.check_integrity()


# ---- warm-reserve refill --------------------------------------------------------------------


def test_refill_reserves_tops_up_from_free_pages_only(pool: PagePool) -> None:
    """refill_reserves asks every consumer to refill, without reclaiming from anyone."""
    a = FakeConsumer(pool, "a", reserve_target=3)
    b = FakeConsumer(pool, "b", reserve_target=2)
    pool.refill_reserves()
    assert (a.count(RESERVE), b.count(RESERVE)) == (3, 2)
    log: list[tuple[str, ReclaimLevel, int]] = []
    a.log = b.log = log
    b.take(11, PRESSURE)  # the pool is now full
    a.move(3, RESERVE, PRESSURE)
    pool.refill_reserves()
    assert a.count(RESERVE) == 0 and log == []
    pool.check_integrity()


def test_refill_thread_calls_refill_reserve(pool: PagePool) -> None:
    """The background refiller keeps reserves topped up, on its interval or when woken."""
    a = FakeConsumer(pool, "a", reserve_target=3)
    pool.start_refiller(interval_s=10.0)  # long interval: only wake-ups drive it below
    thread = pool._refiller
    pool.start_refiller()  # a second start is a no-op
    assert pool._refiller is thread
    pool.wake_refiller()
    assert _wait_for(lambda: a.count(RESERVE) == 3)
    a.move(2, RESERVE, PRESSURE)  # the reserve gets used...
    pool.wake_refiller()  # ...and the cache asks for a refill
    assert _wait_for(lambda: a.count(RESERVE) == 3)
    assert _owned(pool, "a") == 5
    pool.stop_refiller()
    assert thread is not None and not thread.is_alive()
    pool.check_integrity()


def test_refill_thread_runs_on_its_interval(pool: PagePool) -> None:
    """Without a wake-up the refiller still runs every interval."""
    a = FakeConsumer(pool, "a", reserve_target=2)
    pool.start_refiller(interval_s=0.005)
    assert _wait_for(lambda: a.count(RESERVE) == 2)
    a.move(2, RESERVE, PRESSURE)
    assert _wait_for(lambda: a.count(RESERVE) == 2)
    pool.close()
    assert pool._refiller is None
    pool.check_integrity()


def test_close_stops_the_refiller_and_destroys_free_pages(pool: PagePool, vmm: HostVMM) -> None:
    """close stops the thread and gives every free page back to the system."""
    a = FakeConsumer(pool, "a", reserve_target=4)
    pool.start_refiller()
    assert _wait_for(lambda: a.count(RESERVE) == 4)
    a.give(4, RESERVE)
    a.reserve_target = 0
    pool.close()
    assert vmm.live_pages == 0 and pool.stats().created_pages == 0
    pool.check_integrity()


# ---- a model-checked random walk ---------------------------------------------------------

BUDGET = 8
levels = st.sampled_from(list(ReclaimLevel))


class PoolMachine(RuleBasedStateMachine):
    """Random acquire/release/limit/budget/reclaim over fake consumers on a real pool.

    The model is the expected owned count per tenant, plus the created and free page
    counts; reclaim outcomes are checked against what the policy promises.
    """

    def __init__(self) -> None:
        super().__init__()
        self.vmm = HostVMM(PAGE)
        self.pool = PagePool(self.vmm, BUDGET * PAGE)
        self.tenants: list[FakeConsumer] = []
        self.owned: dict[str, int] = {}
        self.log: list[tuple[str, ReclaimLevel, int]] = []

    @initialize(
        specs=st.lists(
            st.tuples(st.integers(0, 2), st.integers(0, 2), st.booleans()),
            min_size=3,
            max_size=3,
        )
    )
    def register(self, specs: list[tuple[int, int, bool]]) -> None:
        for i, (min_pages, priority, yields_live) in enumerate(specs):
            tenant = FakeConsumer(
                self.pool,
                f"t{i}",
                min_pages=min_pages,
                priority=priority,
                reserve_target=2,
                yields_live=yields_live,
                log=self.log,
            )
            self.tenants.append(tenant)
            self.owned[tenant.name] = 0

    def teardown(self) -> None:
        self.pool.close()
        self.vmm.close()

    # ---- model helpers -------------------------------------------------------------

    def _apply_log(self, start: int) -> dict[str, dict[ReclaimLevel, int]]:
        """Book what consumers gave since log entry `start`; returns it per tenant and level."""
        given: dict[str, dict[ReclaimLevel, int]] = {t.name: {} for t in self.tenants}
        for name, level, pages in self.log[start:]:
            given[name][level] = given[name].get(level, 0) + pages
            self.owned[name] -= pages
        return given

    def _unclaimed(self) -> int:
        stats = self.pool.stats()
        return stats.free_pages + max(0, stats.budget_pages - stats.created_pages)

    def _takeable(self, tenant: FakeConsumer, requester: FakeConsumer) -> int:
        """What the policy may take from `tenant` for `requester`, over all levels."""
        account, asking = tenant.account, requester.account
        guaranteed = asking.num_owned < asking.min_pages
        pages = tenant.count(RESERVE) + tenant.count(FREE) + tenant.count(CACHED)
        if tenant.yields_live and (account.priority <= asking.priority or guaranteed):
            pages += tenant.count(PRESSURE)
        return max(0, min(pages, account.num_owned - account.min_pages))

    # ---- rules ------------------------------------------------------------------------

    @rule(i=st.integers(0, 2), n=st.integers(1, 7), into=levels, reclaim=st.booleans())
    def acquire(self, i: int, n: int, into: ReclaimLevel, reclaim: bool) -> None:
        tenant = self.tenants[i]
        others = [t for t in self.tenants if t is not tenant]
        if n > tenant.account.headroom:
            with pytest.raises(TenantLimitExceeded):
                tenant.take(n, into, reclaim=reclaim)
            return
        stats = self.pool.stats()
        within_budget = stats.created_pages <= stats.budget_pages
        need = n - self._unclaimed()
        takeable = sum(self._takeable(t, tenant) for t in others)
        guaranteed = tenant.account.num_owned < tenant.account.min_pages
        before = {t.name: t.account.num_owned for t in others}
        failed = tenant.account.failed_acquires
        start = len(self.log)

        ok = tenant.take(n, into, reclaim=reclaim)

        given = self._apply_log(start)
        total = sum(sum(g.values()) for g in given.values())
        if need <= 0 or not reclaim:
            assert total == 0, "reclaimed although nothing was needed or allowed"
            assert ok == (need <= 0)
        else:
            assert total == min(need, takeable), (total, need, takeable)
            if within_budget:
                assert ok == (takeable >= need)
        deepest = max((level for g in given.values() for level in g), default=RESERVE)
        for t in others:
            account = t.account
            assert account.num_owned >= min(before[t.name], account.min_pages), "below min"
            at_min = account.num_owned <= account.min_pages
            # Levels are reached in order: a deeper one only once cheaper ones are spent.
            if deepest > RESERVE:
                assert at_min or t.count(RESERVE) == 0
            if deepest is PRESSURE:
                assert at_min or t.count(FREE) == 0
            if given[t.name].get(PRESSURE):
                assert account.priority <= tenant.account.priority or guaranteed
        if ok:
            self.owned[tenant.name] += n
        else:
            assert tenant.account.failed_acquires == failed + 1

    @rule(i=st.integers(0, 2), level=levels, data=st.data())
    def release(self, i: int, level: ReclaimLevel, data: st.DataObject) -> None:
        tenant = self.tenants[i]
        count = data.draw(st.integers(0, tenant.count(level)))
        tenant.give(count, level)
        self.owned[tenant.name] -= count

    @rule(i=st.integers(0, 2), src=levels, dst=levels, data=st.data())
    def move(self, i: int, src: ReclaimLevel, dst: ReclaimLevel, data: st.DataObject) -> None:
        tenant = self.tenants[i]
        tenant.move(data.draw(st.integers(0, tenant.count(src))), src, dst)

    @rule(i=st.integers(0, 2), data=st.data())
    def set_limit(self, i: int, data: st.DataObject) -> None:
        tenant = self.tenants[i]
        account = tenant.account
        floor = account.min_pages
        if not tenant.yields_live:  # it would stay over a limit below its live pages
            floor = max(floor, tenant.count(PRESSURE))
        limit = data.draw(st.integers(floor, BUDGET + 2))
        owned = self.owned[tenant.name]
        start = len(self.log)
        assert self.pool.set_limit(tenant.name, limit) == 0
        given = self._apply_log(start)
        assert all(not g for name, g in given.items() if name != tenant.name)
        assert account.num_owned == min(owned, limit) and account.max_pages == limit

    @rule(i=st.integers(0, 2), n=st.integers(0, 6), level=levels)
    def reclaim_from(self, i: int, n: int, level: ReclaimLevel) -> None:
        tenant = self.tenants[i]
        expected = min(n, tenant.reclaimable(level))
        start = len(self.log)
        assert self.pool.reclaim_from(tenant.name, n, level) == expected
        self._apply_log(start)

    @rule(data=st.data())
    def set_budget(self, data: st.DataObject) -> None:
        guaranteed = sum(t.account.min_pages for t in self.tenants)
        pages = data.draw(st.integers(max(1, guaranteed), BUDGET + 4))
        before = self.pool.stats()
        surplus = min(before.free_pages, max(0, before.created_pages - pages))
        over = self.pool.set_budget(pages * PAGE)
        after = self.pool.stats()
        assert after.created_pages == before.created_pages - surplus
        assert over == max(0, after.created_pages - pages)

    @rule(keep=st.integers(0, 4))
    def trim(self, keep: int) -> None:
        free = self.pool.stats().free_pages
        assert self.pool.trim(keep) == max(0, free - keep)

    @rule(n=st.integers(0, 6))
    def prewarm(self, n: int) -> None:
        stats = self.pool.stats()
        room = max(0, stats.budget_pages - stats.created_pages)
        assert self.pool.prewarm(n) == min(n, room)

    @rule()
    def refill_reserves(self) -> None:
        unclaimed = self._unclaimed()
        start = len(self.log)
        expected: dict[str, int] = {}
        for t in self.tenants:  # in registration order, each from what is left
            fill = min(t.reserve_target - t.count(RESERVE), t.account.headroom, unclaimed)
            expected[t.name] = max(0, fill)
            unclaimed -= expected[t.name]
        before = {t.name: t.count(RESERVE) for t in self.tenants}
        self.pool.refill_reserves()
        assert len(self.log) == start, "a refill reclaimed from someone"
        for t in self.tenants:
            assert t.count(RESERVE) == before[t.name] + expected[t.name]
            self.owned[t.name] += expected[t.name]

    @precondition(lambda self: bool(self.tenants))
    @invariant()
    def ledger_agrees(self) -> None:
        self.pool.check_integrity()
        stats = self.pool.stats()
        assert self.vmm.live_pages == stats.created_pages
        assert stats.free_pages == 0 or stats.created_pages <= stats.budget_pages
        for tenant, t_stats in zip(self.tenants, stats.tenants, strict=True):
            assert t_stats.owned_pages == self.owned[tenant.name]
            assert tenant.held == self.pool.tenant(tenant.name).owned


PoolMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPoolMachine = PoolMachine.TestCase
