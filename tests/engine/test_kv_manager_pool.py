"""`KVBlockManager` over real elastic caches in one pool: growth takes memory that holds
only cached prefixes — the model's own (no driver call), then another model's (an unmap
there, a map here) — before any live memory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from engine_helpers import fake_request

from prism.engine import SamplingParams
from prism.engine.kv_manager import KVBlockManager
from prism.engine.request import Request
from prism.kvcache import ElasticKVCache, KVCacheConfig
from prism.memory import HostVMM, PagePool, ReclaimLevel

PAGE = 64 << 10
BS = 16  # fp32, 4 KV heads, head_dim 64: a 16 KiB block; 4 blocks and 4 pool pages a group
PARAMS = SamplingParams(max_tokens=1)


class LiveTenant:
    """Pages holding live data (a model's weights, say): given only under PRESSURE,
    and every such request is recorded."""

    def __init__(self, pool: PagePool, pages: int) -> None:
        self.pool = pool
        self.account = pool.register("live", consumer=self)
        got = pool.acquire("live", pages, reclaim=False)
        assert got is not None
        self.pages = got
        self.asked: list[int] = []

    def reclaimable(self, level: ReclaimLevel) -> int:
        return len(self.pages) if level is ReclaimLevel.PRESSURE else 0

    def shrink(self, pages: int, level: ReclaimLevel) -> int:
        self.asked.append(pages)
        return 0

    def refill_reserve(self) -> None:
        return None


@pytest.fixture
def pool() -> Iterator[PagePool]:
    vmm = HostVMM(PAGE)
    yield PagePool(vmm, 16 * PAGE)  # four groups
    vmm.close()


def _engine_kv(pool: PagePool, name: str) -> KVBlockManager:
    config = KVCacheConfig(name, 2, 4, 64, BS, torch.float32, max_tokens=2048, reserve_groups=0)
    cache = ElasticKVCache(config, pool)
    kv = KVBlockManager(cache, BS)
    cache.prefix_cache = kv  # as the engine does
    return kv


def _prefill(kv: KVBlockManager, req: Request) -> None:
    assert kv.admit(req, 10_000) > 0
    req.num_computed_tokens = req.num_tokens
    kv.commit(req)


def _cached(kv: KVBlockManager, blocks: int, seed: int) -> None:
    """Leave `blocks` blocks of a finished request's prompt in `kv`'s prefix cache."""
    req = fake_request(range(seed, seed + blocks * BS), PARAMS)
    _prefill(kv, req)
    kv.free(req)


def _check(pool: PagePool, *kvs: KVBlockManager) -> None:
    for kv in kvs:
        kv.check_integrity()
        kv.cache.check_integrity()  # type: ignore[attr-defined]
    pool.check_integrity()


def test_another_models_cached_prefixes_go_before_live_memory(pool: PagePool) -> None:
    a, b = _engine_kv(pool, "a"), _engine_kv(pool, "b")  # a group each; block 0 is padding
    _cached(a, 7, seed=0)  # a: two groups, all cached
    live = LiveTenant(pool, 4)  # the last group's pages hold live data
    assert pool.available("b") == 0 and a.cache.mapped_groups == 2  # type: ignore[attr-defined]

    _prefill(b, fake_request(range(1000, 1000 + 6 * BS), PARAMS))  # b needs a second group

    assert live.asked == [], "live memory was asked for while cached prefixes could give"
    assert a.cache.mapped_groups == 1 and a.num_evictable == 3  # type: ignore[attr-defined]
    _check(pool, a, b)


def test_own_cached_prefixes_go_before_live_memory(pool: PagePool) -> None:
    a = _engine_kv(pool, "a")
    _cached(a, 7, seed=0)  # two groups, all cached
    live = LiveTenant(pool, 8)  # everything else is live
    assert pool.available("a") == 0

    _prefill(a, fake_request(range(1000, 1000 + 4 * BS), PARAMS))

    assert live.asked == []
    assert a.num_evictable == 3 and a.cache.mapped_groups == 2  # type: ignore[attr-defined]
    _check(pool, a)


def test_own_cached_prefixes_go_before_another_models(pool: PagePool) -> None:
    a, b = _engine_kv(pool, "a"), _engine_kv(pool, "b")
    _cached(a, 7, seed=0)  # a: two groups, all cached
    _cached(b, 7, seed=500)  # b: two groups, all cached; the pool is full
    assert pool.available("b") == 0

    _prefill(b, fake_request(range(1000, 1000 + 4 * BS), PARAMS))

    assert a.num_evictable == 7 and a.cache.mapped_groups == 2  # type: ignore[attr-defined]
    assert b.num_evictable == 3
    _check(pool, a, b)


def test_live_memory_is_asked_for_only_when_no_prefix_can_give(pool: PagePool) -> None:
    a = _engine_kv(pool, "a")
    live = LiveTenant(pool, 12)
    assert a.cache.allocate(4) is None  # type: ignore[attr-defined]
    assert live.asked, "a cache short of memory never reached the live level"
    _check(pool, a)
