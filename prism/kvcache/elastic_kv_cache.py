"""`ElasticKVCache`: one model's paged KV cache whose memory balloons.

Layout: per layer, K and V are each an `ElasticTensor` shaped
[num_blocks, block_size, num_kv_heads, head_dim] over a range sized for the model's
maximum context. A page group is the same page run in all 2·L tensors, holding
`blocks_per_group` blocks of every layer; mapping one maps 2·L·pages_per_group pages.
When a block does not divide the page size, a group spans lcm(block, page) bytes.

Capacity queries are O(1) and never call the driver. Growth takes pages from the
`PagePool` (and maps them) only when the mapped free blocks run out; a warm reserve of
empty mapped groups, topped up by the pool's refill thread, keeps that off the request
path. Freeing a block is pure bookkeeping; `trim()` returns empty groups to the pool.

Reclaim levels (see `ReclaimLevel`): the warm reserve, then any empty group, then groups
holding only cached prefixes (through `prefix_cache`, the engine's block manager: those
blocks are evicted and the groups unmapped), then live memory through `on_pressure`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from math import lcm
from typing import Protocol

import torch

from prism.kvcache.block_allocator import BlockAllocator, GroupState
from prism.memory.elastic_tensor import ElasticTensor
from prism.memory.page_pool import PagePool
from prism.memory.tenant import ReclaimLevel, TenantLimitExceeded


@dataclass(frozen=True, slots=True)
class KVCacheConfig:
    name: str  # tenant name in the page pool (the model's name)
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per block
    dtype: torch.dtype
    max_tokens: int  # address space is reserved for this many tokens
    reserve_groups: int = 1  # warm reserve: empty groups kept mapped ahead of need
    priority: int = 0
    max_pages: int | None = None  # pool limit for this cache; None: the pool's budget

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in one K (or V) tensor."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.block_size * self.num_kv_heads * self.head_dim * itemsize

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token takes across all layers."""
        return 2 * self.num_layers * self.block_bytes // self.block_size


class PrefixCache(Protocol):
    """What the cache needs of the prefix cache kept over its blocks (`KVBlockManager`)."""

    def cached_blocks(self) -> Iterable[int]:
        """Blocks held by the prefix cache alone (no request uses them), LRU first."""
        ...

    def evict_blocks(self, blocks: list[int]) -> None:
        """Drop these cached blocks and free them."""
        ...


class ElasticKVCache:
    """Blocks for one model's KV, backed by pool pages mapped on demand."""

    def __init__(self, config: KVCacheConfig, pool: PagePool) -> None:
        self.config = config
        self.pool = pool
        page = pool.page_size
        group_bytes = lcm(config.block_bytes, page)
        self.pages_per_group = group_bytes // page  # per tensor
        self.blocks_per_group = group_bytes // config.block_bytes
        num_groups = max(
            2, -(-(config.max_tokens // config.block_size + 1) // self.blocks_per_group)
        )
        self.num_blocks = num_groups * self.blocks_per_group
        self.group_pages = 2 * config.num_layers * self.pages_per_group  # pool pages per group
        shape = (self.num_blocks, config.block_size, config.num_kv_heads, config.head_dim)
        self._tensors = [
            ElasticTensor(pool.vmm, shape, config.dtype) for _ in range(2 * config.num_layers)
        ]
        # kv_caches[layer] = (K, V), each [num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_caches = [
            (self._tensors[2 * i].tensor, self._tensors[2 * i + 1].tensor)
            for i in range(config.num_layers)
        ]
        self.allocator = BlockAllocator(num_groups, self.blocks_per_group)
        self.asleep = False  # every page given back; address ranges (and graphs) kept
        self._lock = threading.Lock()
        # Asked for pages when the pool must take live memory (the engine preempts and
        # frees blocks, then calls trim); returns pages released.
        self.on_pressure: Callable[[int], int] | None = None
        # Set by the engine when it caches prefixes: reclaim at CACHED evicts whole groups.
        self.prefix_cache: PrefixCache | None = None
        self.account = pool.register(
            config.name,
            min_pages=self.group_pages,
            max_pages=config.max_pages,
            priority=config.priority,
            consumer=self,
        )
        if not self._grow(1, reclaim=True):
            self._close_tensors()
            pool.unregister(config.name)
            raise MemoryError(f"KV cache {config.name!r}: no memory for its first page group")
        self.allocator.reserve_padding()

    # ---- capacity (O(1), no driver calls) ----------------------------------------

    @property
    def max_tokens_held(self) -> int:
        """Tokens the cache can ever hold: its address space, or fewer when its page limit
        (or the pool's whole budget) runs out first, less the padding block."""
        pages = min(self.account.max_pages, self.pool.budget_pages)
        groups = min(self.allocator.num_groups, pages // self.group_pages)
        return max(0, groups * self.blocks_per_group - 1) * self.config.block_size

    @property
    def free_blocks(self) -> int:
        """Blocks allocatable right now without mapping anything."""
        return self.allocator.free_blocks

    @property
    def mapped_groups(self) -> int:
        return self.allocator.mapped_groups

    @property
    def mapped_bytes(self) -> int:
        return self.mapped_groups * self.group_pages * self.pool.page_size

    def growth_blocks(self) -> int:
        """Blocks that could be added from the pool's free pages, without reclaiming."""
        groups = self.pool.available(self.config.name) // self.group_pages
        unmapped = self.allocator.num_groups - self.allocator.mapped_groups
        return min(groups, unmapped) * self.blocks_per_group

    def can_allocate(self, count: int) -> bool:
        return count <= self.free_blocks or count <= self.free_blocks + self.growth_blocks()

    # ---- blocks --------------------------------------------------------------------

    def allocate(self, count: int, *, reclaim: bool = True) -> list[int] | None:
        """`count` blocks, growing the cache if needed; None if memory cannot be had."""
        if self.asleep:
            raise RuntimeError(f"KV cache {self.config.name!r} is asleep: wake it first")
        with self._lock:
            blocks = self.allocator.allocate(count)
        while blocks is None:
            short = count - self.allocator.free_blocks
            if short > 0 and not self._grow(-(-short // self.blocks_per_group), reclaim=reclaim):
                return None
            with self._lock:
                blocks = self.allocator.allocate(count)
        if self.allocator.empty_groups < self.config.reserve_groups:
            self.pool.wake_refiller()
        return blocks

    def free(self, blocks: list[int]) -> None:
        with self._lock:
            self.allocator.free(blocks)

    def trim(self, keep_groups: int | None = None) -> int:
        """Unmap empty groups beyond `keep_groups` (default: the warm reserve); returns
        pages given back to the pool."""
        keep = self.config.reserve_groups if keep_groups is None else keep_groups
        with self._lock:
            extra = self.allocator.empty_groups - keep
        return self._shrink_groups(extra) if extra > 0 else 0

    # ---- growing and shrinking ---------------------------------------------------------
    # The cache's lock guards bookkeeping only. Driver calls and pool calls run outside
    # it, on groups marked PENDING, so the request path never waits behind a mapping and
    # no lock is held while another tenant's memory is being reclaimed.

    def _grow(self, groups: int, *, reclaim: bool) -> bool:
        """Map `groups` more page groups (lowest unmapped first); False if no memory."""
        count = groups * self.group_pages
        if count > self.account.headroom:
            return False
        with self._lock:
            targets = self.allocator.claim_unmapped(groups)
        if len(targets) < groups:
            with self._lock:
                self.allocator.abandon(targets)
            return False
        try:
            pages = self.pool.acquire(self.config.name, count, reclaim=reclaim)
        except TenantLimitExceeded:  # the limit fell, or another grower took it, since the check
            pages = None
        if pages is None:
            with self._lock:
                self.allocator.abandon(targets)
            return False
        ppg = self.pages_per_group
        cursor = 0
        for first, run in _runs(targets):
            for tensor in self._tensors:
                take = run * ppg
                tensor.map(first * ppg, pages[cursor : cursor + take])
                cursor += take
        with self._lock:
            for group in targets:
                self.allocator.map_group(group)
        return True

    def _shrink_groups(self, groups: int, *, reclaimed: bool = False) -> int:
        """Unmap up to `groups` empty groups and release their pages; returns pages."""
        with self._lock:
            targets = sorted(self.allocator.claim_empty(groups))
        if not targets:
            return 0
        ppg = self.pages_per_group
        pages: list[int] = []
        for first, run in _runs(targets):
            for tensor in self._tensors:
                pages += tensor.unmap(first * ppg, run * ppg)
        with self._lock:
            self.allocator.abandon(targets)
        self.pool.release(self.config.name, pages, reclaimed=reclaimed)
        return len(pages)

    # ---- sleep and wake ------------------------------------------------------------------

    def sleep(self) -> int:
        """Give every page back, padding group included; returns pages released.

        Only the padding block may be allocated: the engine must hold no blocks. The
        address ranges stay reserved, so graphs captured over the cache stay valid.
        """
        with self._lock:
            if self.asleep:
                return 0
            in_use = self.allocator.mapped_groups * self.blocks_per_group - self.free_blocks
            if in_use > 1:
                raise RuntimeError(
                    f"KV cache {self.config.name!r} still holds {in_use - 1} blocks; "
                    "finish or preempt its requests before it sleeps"
                )
            pages: list[int] = []
            for tensor in self._tensors:
                pages += tensor.unmap_all()
            self.allocator = BlockAllocator(self.allocator.num_groups, self.blocks_per_group)
            self.asleep = True
        self.pool.release(self.config.name, pages)
        return len(pages)

    def wake(self, *, reclaim: bool = True) -> bool:
        """Map the padding group again; False if the pool cannot give it."""
        if not self.asleep:
            return True
        if not self._grow(1, reclaim=reclaim):
            return False
        with self._lock:
            self.allocator.reserve_padding()
            self.asleep = False
        return True

    # ---- PoolConsumer --------------------------------------------------------------

    def reclaimable(self, level: ReclaimLevel) -> int:
        if self.asleep:
            return 0
        empty = self.allocator.empty_groups
        reserve = self.config.reserve_groups
        if level is ReclaimLevel.RESERVE:
            return min(empty, reserve) * self.group_pages
        if level is ReclaimLevel.FREE:  # by now reserves went first: any empty group goes
            return empty * self.group_pages
        if level is ReclaimLevel.CACHED:
            return len(self._cached_groups()) * self.group_pages
        return self.account.num_owned - self.group_pages if self.on_pressure else 0

    def shrink(self, pages: int, level: ReclaimLevel) -> int:
        if level is ReclaimLevel.PRESSURE:
            return self.on_pressure(pages) if self.on_pressure and not self.asleep else 0
        if level is ReclaimLevel.CACHED:
            if self.asleep or self.prefix_cache is None:
                return 0
            for blocks in self._cached_groups()[: -(-pages // self.group_pages)]:
                self.prefix_cache.evict_blocks(blocks)
            level = ReclaimLevel.FREE  # the groups are empty now: unmap them
        with self._lock:
            groups = -(-pages // self.group_pages)
            groups = min(groups, self.reclaimable(level) // self.group_pages)
        return self._shrink_groups(groups, reclaimed=True) if groups > 0 else 0

    def _cached_groups(self) -> list[list[int]]:
        """The groups (never group 0) whose every block in use is a cached prefix, as
        their blocks, in the order of each group's least recently used block."""
        if self.prefix_cache is None or self.asleep:
            return []
        bpg = self.blocks_per_group
        by_group: dict[int, list[int]] = {}
        for block in self.prefix_cache.cached_blocks():
            by_group.setdefault(block // bpg, []).append(block)
        with self._lock:
            used = self.allocator.used_in_group
            return [blocks for g, blocks in by_group.items() if g and len(blocks) == used(g)]

    def refill_reserve(self) -> None:
        """Map empty groups up to the warm reserve, from free pool pages only."""
        with self._lock:
            if self.asleep:
                return
            missing = self.config.reserve_groups - self.allocator.empty_groups
        groups = min(missing, self.pool.available(self.config.name) // self.group_pages)
        if groups > 0:
            self._grow(groups, reclaim=False)

    # ---- lifetime and invariants -----------------------------------------------------

    def check_integrity(self) -> None:
        """Block bookkeeping, tensor mappings and the pool's ledger all agree."""
        with self._lock:
            self.allocator.check_integrity()
            ppg = self.pages_per_group
            held: set[int] = set()
            for group in range(self.allocator.num_groups):
                state = self.allocator.state(group)
                assert state != GroupState.PENDING, f"group {group} left pending"
                mapped = state != GroupState.UNMAPPED
                for tensor in self._tensors:
                    for page in range(group * ppg, (group + 1) * ppg):
                        handle = tensor.handle_at(page)
                        assert (handle is not None) == mapped, f"group {group}: page {page} drift"
                        if handle is not None:
                            assert handle not in held, f"page {handle} mapped twice"
                            held.add(handle)
            owned = self.pool.tenant(self.config.name).owned
            assert held == owned, f"cache maps {len(held)} pages, pool says it owns {len(owned)}"

    def close(self) -> None:
        """Unmap everything, give all pages back and leave the pool."""
        with self._lock:
            pages = self._close_tensors()
            self.pool.release(self.config.name, pages)
            self.pool.unregister(self.config.name)

    def _close_tensors(self) -> list[int]:
        pages: list[int] = []
        for tensor in self._tensors:
            pages += tensor.close()
        return pages


def _runs(groups: list[int]) -> list[tuple[int, int]]:
    """Sorted group indices as (first, length) runs of consecutive indices."""
    runs: list[tuple[int, int]] = []
    for group in groups:
        if runs and runs[-1][0] + runs[-1][1] == group:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((group, 1))
    return runs
