"""What the page pool knows of its tenants, and what tenants promise the pool."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol


class ReclaimLevel(IntEnum):
    """How deep the pool digs when it takes memory back, cheapest first."""

    RESERVE = 0  # a tenant's warm reserve: mapped ahead, holding nothing
    FREE = 1  # mapped pages beyond the reserve that hold nothing
    CACHED = 2  # pages holding only cached prefixes that no request uses: lose hits only
    PRESSURE = 3  # live data: the owner sleeps an idle model or preempts requests


class PoolConsumer(Protocol):
    """Implemented by whatever maps a tenant's pages (a KV cache, a weight arena).

    The pool calls these without holding its own lock. `shrink` gives pages back
    through `PagePool.release` and may decline (return 0) when the consumer is busy,
    so that two tenants reclaiming from each other never deadlock.
    """

    def reclaimable(self, level: ReclaimLevel) -> int:
        """Pages this consumer could give back at `level` now (O(1), no driver calls)."""
        ...

    def shrink(self, pages: int, level: ReclaimLevel) -> int:
        """Give back up to `pages` pages at `level`; returns how many were released."""
        ...

    def refill_reserve(self) -> None:
        """Top the warm reserve up to its target (called from the pool's refill thread)."""
        ...


class PoolError(RuntimeError):
    """Misuse of the page pool: unknown tenant, double free, a limit exceeded."""


class UnknownTenant(PoolError):
    pass


class TenantLimitExceeded(PoolError):
    pass


class PageNotOwned(PoolError):
    """A page was released by a tenant that does not own it (double free)."""


@dataclass(slots=True)
class TenantAccount:
    """The pool's ledger for one tenant (a model's KV cache or weights)."""

    name: str
    min_pages: int  # never reclaimed below this; the pool admits tenants while Σ min ≤ budget
    max_pages: int  # hard limit, changeable at run time
    priority: int  # higher keeps its memory longer under pressure
    consumer: PoolConsumer | None  # asked to shrink and refill; None: pool never reclaims
    owned: set[int] = field(default_factory=set)  # page handles held by this tenant
    acquired_total: int = 0  # pages handed to this tenant, over its life
    released_total: int = 0  # pages it gave back, over its life
    reclaimed_total: int = 0  # of those, pages taken back for another tenant
    failed_acquires: int = 0  # acquires answered "no memory"

    @property
    def num_owned(self) -> int:
        return len(self.owned)

    @property
    def headroom(self) -> int:
        """Pages this tenant may still acquire before reaching its limit."""
        return max(0, self.max_pages - len(self.owned))
