"""`SimKVCache` and `SimWeights`: a simulated model's memory in its GPU's `PagePool`.

Both are `PoolConsumer`s of the real pool and keep the real geometry: a KV page group
is the same page run in all 2·L K/V tensors and holds `blocks_per_group` blocks of
every layer; blocks inside groups are handed out by the real `BlockAllocator` (best
fit, padding block 0, group 0 always mapped while awake). What `ElasticKVCache` does
with tensors and driver calls is left out; its ledger is kept. Reclaim levels as
there: RESERVE (warm reserve of empty groups), FREE (any empty group), PRESSURE (the
owner's `on_pressure` hook sleeps the model or preempts requests).
"""

from __future__ import annotations

from collections.abc import Callable
from math import lcm

from prism.kvcache.block_allocator import BlockAllocator
from prism.memory.page_pool import PagePool
from prism.memory.tenant import ReclaimLevel, TenantLimitExceeded
from prism.sim.cost_model import ModelShape

PressureHook = Callable[[int], int]  # pages wanted -> pages released


class SimKVCache:
    def __init__(
        self,
        name: str,
        shape: ModelShape,
        pool: PagePool,
        *,
        block_size: int = 16,
        max_pages: int | None = None,
        reserve_groups: int = 1,
        priority: int = 0,
    ) -> None:
        self.name = name
        self.pool = pool
        self.block_size = block_size
        self.reserve_groups = reserve_groups
        block_bytes = block_size * shape.kv_bytes_per_token // (2 * shape.layers)  # per tensor
        group_bytes = lcm(block_bytes, pool.page_size)
        self.blocks_per_group = group_bytes // block_bytes
        self.group_pages = 2 * shape.layers * (group_bytes // pool.page_size)
        limit = pool.budget_pages if max_pages is None else max_pages
        self.num_groups = max(2, limit // self.group_pages)
        self.allocator = BlockAllocator(self.num_groups, self.blocks_per_group)
        self.asleep = True  # no group mapped until `wake`
        self.on_pressure: PressureHook | None = None
        self.account = pool.register(
            name,
            min_pages=min(self.group_pages, limit),
            max_pages=limit,
            priority=priority,
            consumer=self,
        )
        self._pages: dict[int, list[int]] = {}  # group -> its pool pages
        # pages mapped as the cache grew and unmapped as it shrank (not at wake or sleep,
        # which are charged whole), cumulative: host work the GPU charges (`kv_moves_s`)
        self.pages_mapped = 0
        self.pages_unmapped = 0

    # ---- capacity ------------------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        return self.allocator.free_blocks

    @property
    def mapped_pages(self) -> int:
        return self.account.num_owned

    @property
    def used_blocks(self) -> int:
        """Blocks held by requests (the padding block not counted)."""
        if self.asleep:
            return 0
        return self.allocator.mapped_groups * self.blocks_per_group - self.free_blocks - 1

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- blocks --------------------------------------------------------------------

    def allocate(self, count: int, *, reclaim: bool = True) -> list[int] | None:
        """`count` blocks, mapping groups as needed; None if memory cannot be had."""
        if self.asleep:
            raise RuntimeError(f"KV cache {self.name!r} is asleep: wake it first")
        blocks = self.allocator.allocate(count)
        if blocks is None:
            short = count - self.allocator.free_blocks
            if not self._grow(-(-short // self.blocks_per_group), reclaim=reclaim):
                return None
            blocks = self.allocator.allocate(count)
        return blocks

    def free(self, blocks: list[int]) -> None:
        self.allocator.free(blocks)

    def trim(self, keep_groups: int | None = None) -> int:
        """Give back empty groups beyond `keep_groups` (default: the warm reserve)."""
        keep = self.reserve_groups if keep_groups is None else keep_groups
        extra = self.allocator.empty_groups - keep
        return self._shrink_groups(extra) if extra > 0 else 0

    def _grow(self, groups: int, *, reclaim: bool, waking: bool = False) -> bool:
        count = groups * self.group_pages
        if count > self.account.headroom:
            return False
        targets = self.allocator.claim_unmapped(groups)
        if len(targets) < groups:
            self.allocator.abandon(targets)
            return False
        try:
            pages = self.pool.acquire(self.name, count, reclaim=reclaim)
        except TenantLimitExceeded:
            pages = None
        if pages is None:
            self.allocator.abandon(targets)
            return False
        for i, group in enumerate(targets):
            self._pages[group] = pages[i * self.group_pages : (i + 1) * self.group_pages]
            self.allocator.map_group(group)
        if not waking:
            self.pages_mapped += count
        return True

    def _shrink_groups(self, groups: int, *, reclaimed: bool = False) -> int:
        targets = self.allocator.claim_empty(groups)
        if not targets:
            return 0
        pages: list[int] = []
        for group in targets:
            pages += self._pages.pop(group)
        self.allocator.abandon(targets)
        self.pool.release(self.name, pages, reclaimed=reclaimed)
        self.pages_unmapped += len(pages)
        return len(pages)

    # ---- sleep and wake ------------------------------------------------------------

    def wake(self, *, reclaim: bool = True) -> bool:
        """Map the padding group; False if the pool cannot give it."""
        if not self.asleep:
            return True
        self.asleep = False
        if not self._grow(1, reclaim=reclaim, waking=True):
            self.asleep = True
            return False
        self.allocator.reserve_padding()
        return True

    def sleep(self) -> int:
        """Give every page back; only the padding block may be allocated."""
        if self.asleep:
            return 0
        if self.used_blocks > 0:
            raise RuntimeError(f"KV cache {self.name!r} still holds {self.used_blocks} blocks")
        pages = [p for group in self._pages.values() for p in group]
        self._pages.clear()
        self.allocator = BlockAllocator(self.num_groups, self.blocks_per_group)
        self.asleep = True
        self.pool.release(self.name, pages)
        return len(pages)

    def close(self) -> None:
        if not self.asleep:
            self.sleep()
        self.pool.unregister(self.name)

    # ---- PoolConsumer ----------------------------------------------------------------

    def reclaimable(self, level: ReclaimLevel) -> int:
        if self.asleep:
            return 0
        empty = self.allocator.empty_groups
        if level is ReclaimLevel.RESERVE:
            return min(empty, self.reserve_groups) * self.group_pages
        if level is ReclaimLevel.FREE:
            return empty * self.group_pages
        if level is ReclaimLevel.CACHED:
            return 0  # the simulated engine caches no prefixes
        return self.account.num_owned - self.group_pages if self.on_pressure else 0

    def shrink(self, pages: int, level: ReclaimLevel) -> int:
        if level is ReclaimLevel.PRESSURE:
            return self.on_pressure(pages) if self.on_pressure and not self.asleep else 0
        groups = min(-(-pages // self.group_pages), self.reclaimable(level) // self.group_pages)
        return self._shrink_groups(groups, reclaimed=True) if groups > 0 else 0

    def refill_reserve(self) -> None:
        if self.asleep:
            return
        missing = self.reserve_groups - self.allocator.empty_groups
        groups = min(missing, self.pool.available(self.name) // self.group_pages)
        if groups > 0:
            self._grow(groups, reclaim=False)

    def check_integrity(self) -> None:
        self.allocator.check_integrity()
        held = {p for pages in self._pages.values() for p in pages}
        assert len(held) == sum(len(p) for p in self._pages.values()), "a page held twice"
        assert held == self.account.owned, f"{self.name}: cache and pool ledgers differ"
        assert len(self._pages) == self.allocator.mapped_groups, f"{self.name}: group drift"


class SimWeights:
    """A model's weights (plus its activation workspace) as one all-or-nothing tenant."""

    def __init__(self, name: str, num_pages: int, pool: PagePool, *, priority: int = 0) -> None:
        self.name = name
        self.pool = pool
        self.num_pages = num_pages
        self.on_pressure: PressureHook | None = None
        self.account = pool.register(name, max_pages=num_pages, priority=priority, consumer=self)
        self._pages: list[int] = []

    @property
    def resident(self) -> bool:
        return bool(self._pages)

    def materialize(self) -> bool:
        if self._pages:
            return True
        pages = self.pool.acquire(self.name, self.num_pages)
        if pages is None:
            return False
        self._pages = pages
        return True

    def evict(self) -> int:
        pages, self._pages = self._pages, []
        if pages:
            self.pool.release(self.name, pages)
        return len(pages)

    def close(self) -> None:
        self.evict()
        self.pool.unregister(self.name)

    def reclaimable(self, level: ReclaimLevel) -> int:
        if level is ReclaimLevel.PRESSURE and self.on_pressure is not None:
            return self.account.num_owned
        return 0

    def shrink(self, pages: int, level: ReclaimLevel) -> int:
        if level is ReclaimLevel.PRESSURE and self.on_pressure is not None:
            return self.on_pressure(pages)
        return 0

    def refill_reserve(self) -> None:
        return None
