"""`PagePool`: one device's physical pages, shared by every model placed there.

Pages are pooled handles: a page that leaves one tenant stays created and goes to the
next tenant by unmap + map, never release + create (creation is the expensive call).
The pool is a ledger over ints; the tenants' consumers do the mapping. Invariant:
every created page is either free in the pool or owned by exactly one tenant, and
created pages never exceed the budget except transiently after the budget is lowered.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from prism.memory.reclaim import DefaultReclaimPolicy, ReclaimPolicy
from prism.memory.tenant import (
    PageNotOwned,
    PoolConsumer,
    PoolError,
    ReclaimLevel,
    TenantAccount,
    TenantLimitExceeded,
    UnknownTenant,
)
from prism.memory.vmm import OutOfPhysicalMemory, VirtualMemory


@dataclass(frozen=True, slots=True)
class PoolEvent:
    time: float  # time.monotonic() when it happened
    kind: str  # "acquire" | "release" | "reclaim" | "no_memory" | "limit" | "budget"
    tenant: str
    pages: int


@dataclass(frozen=True, slots=True)
class TenantStats:
    name: str
    owned_pages: int
    min_pages: int
    max_pages: int
    priority: int
    reclaimed_total: int
    failed_acquires: int


@dataclass(frozen=True, slots=True)
class PoolStats:
    page_size: int
    budget_pages: int
    created_pages: int  # pages that exist (free + owned)
    free_pages: int  # created pages held by no tenant
    tenants: tuple[TenantStats, ...]

    @property
    def owned_pages(self) -> int:
        return self.created_pages - self.free_pages


class PagePool:
    """Owns a device's physical pages and hands them to tenants within a budget."""

    def __init__(
        self,
        vmm: VirtualMemory,
        budget_bytes: int,
        *,
        headroom_bytes: int = 0,
        policy: ReclaimPolicy | None = None,
        max_events: int = 4096,
        pooled: bool = True,
    ) -> None:
        if budget_bytes - headroom_bytes < vmm.page_size:
            raise PoolError(
                f"budget {budget_bytes} B minus headroom {headroom_bytes} B is less than "
                f"one page ({vmm.page_size} B)"
            )
        self.vmm = vmm
        self.page_size = vmm.page_size
        self.budget_pages = (budget_bytes - headroom_bytes) // vmm.page_size
        self.policy = policy or DefaultReclaimPolicy()
        # False destroys every released page at once (and creates anew on acquire): the
        # unpooled baseline that benchmarks compare against.
        self.pooled = pooled
        self.events: deque[PoolEvent] = deque(maxlen=max_events)
        self._lock = threading.Lock()
        self._free: list[int] = []  # created handles owned by no tenant
        self._created = 0  # handles that exist, or are being created right now
        self._tenants: dict[str, TenantAccount] = {}
        self._refiller: threading.Thread | None = None
        self._refill_wake = threading.Event()
        self._stop = threading.Event()

    # ---- tenants -------------------------------------------------------------------

    def register(
        self,
        name: str,
        *,
        min_pages: int = 0,
        max_pages: int | None = None,
        priority: int = 0,
        consumer: PoolConsumer | None = None,
    ) -> TenantAccount:
        """Add a tenant. Its `min_pages` is a guarantee, so Σ min must fit the budget."""
        max_pages = self.budget_pages if max_pages is None else max_pages
        if min_pages < 0 or max_pages < min_pages:
            raise PoolError(f"tenant {name!r}: need 0 <= min_pages <= max_pages")
        with self._lock:
            if name in self._tenants:
                raise PoolError(f"tenant {name!r} is already registered")
            guaranteed = sum(t.min_pages for t in self._tenants.values())
            if guaranteed + min_pages > self.budget_pages:
                raise PoolError(
                    f"tenant {name!r}: min_pages {min_pages} does not fit; "
                    f"{self.budget_pages - guaranteed} of {self.budget_pages} pages unpromised"
                )
            account = TenantAccount(name, min_pages, max_pages, priority, consumer)
            self._tenants[name] = account
            return account

    def unregister(self, name: str) -> None:
        with self._lock:
            account = self._account(name)
            if account.owned:
                raise PoolError(f"tenant {name!r} still owns {len(account.owned)} pages")
            del self._tenants[name]

    def tenant(self, name: str) -> TenantAccount:
        with self._lock:
            return self._account(name)

    def _account(self, name: str) -> TenantAccount:
        account = self._tenants.get(name)
        if account is None:
            raise UnknownTenant(f"unknown tenant {name!r}; registered: {sorted(self._tenants)}")
        return account

    # ---- acquire / release -----------------------------------------------------------

    def available(self, name: str) -> int:
        """Pages `name` could acquire now without reclaiming from anyone (O(1))."""
        with self._lock:
            account = self._account(name)
            unclaimed = len(self._free) + max(0, self.budget_pages - self._created)
            return min(account.headroom, unclaimed)

    def acquire(
        self, name: str, count: int, *, reclaim: bool | ReclaimLevel = True
    ) -> list[int] | None:
        """Give `count` pages to tenant `name`, all or none.

        `reclaim`: False takes free pages only; a `ReclaimLevel` lets the pool take back
        other tenants' memory down to that level; True, down to any level. Returns None
        when the budget is spent and reclaiming could not free enough: the caller waits
        or preempts. Raises `TenantLimitExceeded` when the tenant's own limit forbids it,
        whatever the pool holds.
        """
        if count <= 0:
            return []
        with self._lock:
            account = self._account(name)
            if count > account.headroom:
                raise TenantLimitExceeded(
                    f"tenant {name!r}: {count} more pages would exceed its limit of "
                    f"{account.max_pages} (owns {account.num_owned})"
                )
        pages = self._try_acquire(account, count)
        if pages is None and reclaim is not False:
            deepest = ReclaimLevel.PRESSURE if reclaim is True else ReclaimLevel(reclaim)
            self._reclaim(account, count, deepest)
            pages = self._try_acquire(account, count)
        if pages is None:
            with self._lock:
                account.failed_acquires += 1
                self._event("no_memory", name, count)
        return pages

    def _try_acquire(self, account: TenantAccount, count: int) -> list[int] | None:
        with self._lock:
            if account.name not in self._tenants:
                raise UnknownTenant(f"tenant {account.name!r} was unregistered")
            if count > account.headroom:
                return None
            take = min(count, len(self._free))
            to_create = count - take
            if to_create > self.budget_pages - self._created:
                return None
            pages = [self._free.pop() for _ in range(take)]
            self._created += to_create  # reserve creation slots; create outside the lock
        try:
            for _ in range(to_create):
                pages.append(self.vmm.create())
        except OutOfPhysicalMemory:
            with self._lock:
                self._created -= to_create - (len(pages) - take)
                self._free.extend(pages)
            return None
        with self._lock:
            account.owned.update(pages)
            account.acquired_total += count
            self._event("acquire", account.name, count)
        return pages

    def release(self, name: str, pages: Iterable[int], *, reclaimed: bool = False) -> None:
        """Tenant `name` gives pages back (already unmapped by its consumer)."""
        pages = list(pages)
        with self._lock:
            account = self._account(name)
            bad = [p for p in pages if p not in account.owned]
            if bad or len(set(pages)) != len(pages):
                raise PageNotOwned(
                    f"tenant {name!r} released pages it does not own (double free?): {bad[:8]}"
                )
            account.owned.difference_update(pages)
            account.released_total += len(pages)
            if reclaimed:
                account.reclaimed_total += len(pages)
            self._free.extend(pages)
            self._event("reclaim" if reclaimed else "release", name, len(pages))
            surplus = self._take_surplus()
        self._destroy(surplus)

    def _take_surplus(self) -> list[int]:
        """Free pages over the budget (after the budget was lowered), to be destroyed."""
        keep = self.budget_pages if self.pooled else self._created - len(self._free)
        over = min(len(self._free), self._created - keep)
        if over <= 0:
            return []
        surplus = self._free[-over:]
        del self._free[-over:]
        self._created -= over
        return surplus

    def _destroy(self, pages: list[int]) -> None:
        for page in pages:
            self.vmm.release(page)

    # ---- reclaim ---------------------------------------------------------------------

    def _reclaim(self, requester: TenantAccount, count: int, deepest: ReclaimLevel) -> int:
        """Ask other tenants for pages, at levels down to `deepest`, until `count` could be
        acquired; returns pages freed."""
        with self._lock:
            unclaimed = len(self._free) + max(0, self.budget_pages - self._created)
            need = count - unclaimed
            tenants = list(self._tenants.values())
        if need <= 0:
            return 0
        got = 0
        for step in self.policy.plan(requester, need, tenants):
            if got >= need:
                break
            if step.level > deepest:
                continue
            assert step.tenant.consumer is not None
            got += step.tenant.consumer.shrink(min(step.pages, need - got), step.level)
        return got

    def reclaim_from(self, name: str, pages: int, level: ReclaimLevel) -> int:
        """Ask tenant `name` itself to give back pages (used by limits and by the worker)."""
        with self._lock:
            account = self._account(name)
        if account.consumer is None:
            return 0
        return account.consumer.shrink(pages, level)

    # ---- limits and budget -------------------------------------------------------------

    def set_limit(self, name: str, max_pages: int) -> int:
        """Change a tenant's limit; shrinks it if it holds more. Returns pages still over."""
        with self._lock:
            account = self._account(name)
            if max_pages < account.min_pages:
                raise PoolError(
                    f"tenant {name!r}: limit {max_pages} is below its minimum {account.min_pages}"
                )
            account.max_pages = max_pages
            self._event("limit", name, max_pages)
        for level in ReclaimLevel:
            over = account.num_owned - max_pages
            if over <= 0:
                break
            self.reclaim_from(name, over, level)
        return max(0, account.num_owned - max_pages)

    def set_budget(self, budget_bytes: int) -> int:
        """Change the device budget; returns pages still owned beyond it."""
        pages = budget_bytes // self.page_size
        with self._lock:
            guaranteed = sum(t.min_pages for t in self._tenants.values())
            if pages < guaranteed:
                raise PoolError(f"budget of {pages} pages is below the guaranteed {guaranteed}")
            self.budget_pages = pages
            self._event("budget", "", pages)
            surplus = self._take_surplus()
        self._destroy(surplus)
        with self._lock:
            return max(0, self._created - self.budget_pages)

    def trim(self, keep_free: int = 0) -> int:
        """Destroy free pages beyond `keep_free`, returning memory to the device."""
        with self._lock:
            drop = max(0, len(self._free) - keep_free)
            pages = self._free[len(self._free) - drop :]
            del self._free[len(self._free) - drop :]
            self._created -= drop
        self._destroy(pages)
        return drop

    def prewarm(self, pages: int) -> int:
        """Create free pages ahead of need (so no request waits on creation)."""
        with self._lock:
            make = max(0, min(pages, self.budget_pages - self._created))
            self._created += make
        made: list[int] = []
        try:
            for _ in range(make):
                made.append(self.vmm.create())
        finally:
            with self._lock:
                self._created -= make - len(made)
                self._free.extend(made)
        return len(made)

    # ---- warm-reserve refill ---------------------------------------------------------

    def start_refiller(self, interval_s: float = 0.002) -> None:
        """Run consumers' `refill_reserve` in a background thread, every `interval_s` or
        whenever `wake_refiller` is called."""
        if self._refiller is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                self._refill_wake.wait(interval_s)
                self._refill_wake.clear()
                self.refill_reserves()

        self._refiller = threading.Thread(target=loop, name="prism-refill", daemon=True)
        self._refiller.start()

    def refill_reserves(self) -> None:
        """Top every tenant's warm reserve up now, in the calling thread.

        A serving loop calls this while the GPU runs a step: in Python, doing the
        driver work on the loop's own thread avoids GIL hand-offs on the request path
        that a background thread costs."""
        with self._lock:
            consumers = [t.consumer for t in self._tenants.values() if t.consumer]
        for consumer in consumers:
            consumer.refill_reserve()

    def wake_refiller(self) -> None:
        self._refill_wake.set()

    def stop_refiller(self) -> None:
        if self._refiller is None:
            return
        self._stop.set()
        self._refill_wake.set()
        self._refiller.join()
        self._refiller = None

    # ---- introspection -----------------------------------------------------------------

    def stats(self) -> PoolStats:
        with self._lock:
            tenants = tuple(
                TenantStats(
                    t.name,
                    t.num_owned,
                    t.min_pages,
                    t.max_pages,
                    t.priority,
                    t.reclaimed_total,
                    t.failed_acquires,
                )
                for t in self._tenants.values()
            )
            return PoolStats(
                self.page_size, self.budget_pages, self._created, len(self._free), tenants
            )

    def check_integrity(self) -> None:
        """Raise AssertionError unless free + owned == created and no page is held twice."""
        with self._lock:
            seen: set[int] = set(self._free)
            if len(seen) != len(self._free):
                raise AssertionError("a page is free twice")
            owned = 0
            for t in self._tenants.values():
                if seen & t.owned:
                    raise AssertionError(f"tenant {t.name!r} holds a page held elsewhere")
                seen |= t.owned
                owned += len(t.owned)
                if len(t.owned) > t.max_pages:
                    raise AssertionError(f"tenant {t.name!r} owns {len(t.owned)} > limit")
            if len(self._free) + owned != self._created:
                raise AssertionError(
                    f"free {len(self._free)} + owned {owned} != created {self._created}"
                )

    def close(self) -> None:
        """Stop the refiller and destroy free pages (tenants must have released theirs)."""
        self.stop_refiller()
        self.trim(0)

    def _event(self, kind: str, tenant: str, pages: int) -> None:
        self.events.append(PoolEvent(time.monotonic(), kind, tenant, pages))
