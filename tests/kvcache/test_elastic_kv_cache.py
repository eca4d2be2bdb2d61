"""ElasticKVCache over a real HostVMM and PagePool: blocks in pages that come and go."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from prism.kvcache import ElasticKVCache, KVCacheConfig
from prism.kvcache.block_allocator import GroupState
from prism.memory import HostVMM, PagePool, ReclaimLevel

PAGE = 64 << 10
# fp32, 4 KV heads, head_dim 64, 16 tokens: a 16 KiB block, 4 to a page; a group is
# one page per tensor, 2 layers × (K, V) = 4 pool pages holding 4 blocks.
DIVIDES = {"num_kv_heads": 4}
# 3 KV heads: a 12 KiB block does not divide 64 KiB, so a group spans lcm = 192 KiB,
# 3 pages per tensor (12 pool pages) holding 16 blocks.
STRADDLES = {"num_kv_heads": 3}


def _config(name: str, *, num_kv_heads: int = 4, **kw: object) -> KVCacheConfig:
    fields: dict[str, object] = {
        "num_layers": 2,
        "num_kv_heads": num_kv_heads,
        "head_dim": 64,
        "block_size": 16,
        "dtype": torch.float32,
        "max_tokens": 2048,
    }
    fields.update(kw)
    return KVCacheConfig(name, **fields)  # type: ignore[arg-type]


def _group_pages(num_kv_heads: int) -> int:
    return 4 if num_kv_heads == 4 else 12


@pytest.fixture
def vmm() -> Iterator[HostVMM]:
    backend = HostVMM(PAGE)
    yield backend
    backend.close()


def _pool(vmm: HostVMM, pages: int) -> PagePool:
    return PagePool(vmm, pages * PAGE)


def _check_all(pool: PagePool, *caches: ElasticKVCache) -> None:
    for cache in caches:
        cache.check_integrity()
    pool.check_integrity()


def _owned(pool: PagePool, name: str) -> int:
    return next(t.owned_pages for t in pool.stats().tenants if t.name == name)


def _write(cache: ElasticKVCache, blocks: list[int], seed: int) -> list[torch.Tensor]:
    """Fill `blocks` in every K and V tensor with random data; returns what was written."""
    gen = torch.Generator().manual_seed(seed)
    written = []
    for k, v in cache.kv_caches:
        for tensor in (k, v):
            data = torch.randn((len(blocks), *tensor.shape[1:]), generator=gen)
            tensor[blocks] = data
            written.append(data)
    return written


def _in_groups(blocks: list[int], bpg: int, groups: range) -> list[int]:
    """The blocks of `blocks` that lie in `groups`."""
    return [b for b in blocks if b // bpg in groups]


def _read(cache: ElasticKVCache, blocks: list[int]) -> list[torch.Tensor]:
    return [tensor[blocks].clone() for kv in cache.kv_caches for tensor in kv]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return condition()


# ---- layout --------------------------------------------------------------------------------


@pytest.mark.parametrize(("heads", "pages_per_group", "blocks_per_group"), [(4, 1, 4), (3, 3, 16)])
def test_group_geometry(
    vmm: HostVMM, heads: int, pages_per_group: int, blocks_per_group: int
) -> None:
    """A group spans lcm(block, page) bytes per tensor; the first group holds the padding."""
    pool = _pool(vmm, 64)
    cache = ElasticKVCache(_config("m", num_kv_heads=heads), pool)
    config = cache.config
    assert (cache.pages_per_group, cache.blocks_per_group) == (pages_per_group, blocks_per_group)
    assert config.block_bytes * blocks_per_group == pages_per_group * PAGE
    assert cache.group_pages == 4 * pages_per_group == _group_pages(heads)
    assert cache.num_blocks % blocks_per_group == 0
    assert cache.num_blocks >= config.max_tokens // config.block_size + 1
    for k, v in cache.kv_caches:
        assert k.shape == v.shape == (cache.num_blocks, 16, heads, 64)
        assert k.dtype == torch.float32
    assert config.bytes_per_token == 2 * 2 * heads * 64 * 4
    # Only group 0 is mapped (reserve_groups=1 is filled by the refiller, not here).
    assert cache.mapped_groups == 1 and cache.free_blocks == blocks_per_group - 1
    assert cache.mapped_bytes == cache.group_pages * PAGE == _owned(pool, "m") * PAGE
    assert cache.allocator.is_allocated(0)
    assert bool(torch.isfinite(cache.kv_caches[0][0][0]).all())  # padding reads are mapped
    _check_all(pool, cache)
    cache.close()
    assert vmm.live_pages == pool.stats().free_pages
    _check_all(pool)


def test_close_returns_every_page_and_leaves_the_pool(vmm: HostVMM) -> None:
    """close unmaps everything and unregisters; the tenant name is free again."""
    pool = _pool(vmm, 32)
    cache = ElasticKVCache(_config("m"), pool)
    assert cache.allocate(10) is not None
    cache.close()
    stats = pool.stats()
    assert stats.owned_pages == 0 and stats.tenants == ()
    again = ElasticKVCache(_config("m"), pool)
    _check_all(pool, again)
    again.close()
    _check_all(pool)


def test_first_group_needs_memory(vmm: HostVMM) -> None:
    """A cache that cannot get its first group raises MemoryError and leaves no trace."""
    pool = _pool(vmm, 8)
    a = ElasticKVCache(_config("a", reserve_groups=0), pool)
    blocks = a.allocate(7)  # both groups full of live blocks
    assert blocks is not None and _owned(pool, "a") == 8
    with pytest.raises(MemoryError, match="first page group"):
        ElasticKVCache(_config("b"), pool)
    assert [t.name for t in pool.stats().tenants] == ["a"]
    a.free(blocks)
    a.trim(0)
    b = ElasticKVCache(_config("b"), pool)
    _check_all(pool, a, b)


# ---- data survives ballooning ---------------------------------------------------------------


@pytest.mark.parametrize("geometry", [DIVIDES, STRADDLES], ids=["divides", "straddles"])
def test_data_survives_others_ballooning(vmm: HostVMM, geometry: dict[str, int]) -> None:
    """Blocks written through kv_caches read back intact while other caches grow and shrink
    (taking this cache's empty groups) and this cache trims its other groups."""
    gp = _group_pages(geometry["num_kv_heads"])
    pool = _pool(vmm, 10 * gp)
    mine = ElasticKVCache(_config("mine", **geometry), pool)
    others = [ElasticKVCache(_config(n, **geometry), pool) for n in ("b", "c")]
    blocks = mine.allocate(mine.blocks_per_group * 2)  # group 0 (partly) and two more
    assert blocks is not None
    written = _write(mine, blocks, seed=1)
    extra = mine.allocate(mine.blocks_per_group * 3)  # three more groups, left empty
    assert extra is not None
    mine.free(extra)
    rng = random.Random(0)
    held: dict[str, list[int]] = {"b": [], "c": [], "mine": []}
    for step in range(40):
        cache = rng.choice([*others, mine])
        name = cache.config.name
        if held[name] and rng.random() < 0.5:
            cache.free(held[name])
            held[name] = []
            cache.trim(rng.choice([0, None]))
        else:
            got = cache.allocate(rng.randint(1, 3 * cache.blocks_per_group))
            if got is not None:
                _write(cache, got, seed=100 + step)
                held[name] += got
        _check_all(pool, mine, *others)
    assert pool.stats().tenants[0].reclaimed_total > 0  # others took mine's empty groups
    assert _same(_read(mine, blocks), written)
    for cache in (mine, *others):
        cache.close()
    _check_all(pool)


def test_data_survives_own_trim_and_regrowth(vmm: HostVMM) -> None:
    """Trimming and re-mapping other groups of the same cache leaves held blocks alone."""
    pool = _pool(vmm, 48)
    cache = ElasticKVCache(_config("m", **STRADDLES), pool)
    bpg = cache.blocks_per_group
    keep = cache.allocate(bpg)  # fills group 0 and opens group 1
    assert keep is not None
    written = _write(cache, keep, seed=7)
    for round_ in range(3):
        extra = cache.allocate(2 * bpg)
        assert extra is not None and not set(extra) & set(keep)
        _write(cache, extra, seed=round_)
        cache.free(extra)
        assert cache.trim(0) > 0
        cache.check_integrity()
    assert _same(_read(cache, keep), written)
    _check_all(pool, cache)


# ---- memory flows between caches ------------------------------------------------------------


def test_load_flows_between_three_caches(vmm: HostVMM) -> None:
    """Load on one cache grows it by reclaiming the others' empty groups; when the load
    moves, the memory flows back."""
    gp = _group_pages(4)
    pool = _pool(vmm, 12 * gp)
    caches = {n: ElasticKVCache(_config(n), pool) for n in "abc"}
    a, b, c = caches["a"], caches["b"], caches["c"]
    for cache in (b, c):  # b and c once had load: 4 mapped groups each, now empty
        blocks = cache.allocate(4 * cache.blocks_per_group - 1)
        assert blocks is not None
        cache.free(blocks)
    assert _owned(pool, "b") == _owned(pool, "c") == 4 * gp

    a_blocks: list[int] = []
    while (got := a.allocate(a.blocks_per_group)) is not None:
        a_blocks += got
    stats = {t.name: t for t in pool.stats().tenants}
    assert stats["b"].owned_pages == stats["c"].owned_pages == gp  # down to their minimum
    assert stats["b"].reclaimed_total == stats["c"].reclaimed_total == 3 * gp
    assert stats["a"].owned_pages == 10 * gp and stats["a"].failed_acquires == 1
    assert pool.stats().free_pages == 0
    _check_all(pool, a, b, c)

    a.free(a_blocks)  # the load moves from a to b
    b_blocks: list[int] = []
    while (got := b.allocate(b.blocks_per_group)) is not None:
        b_blocks += got
    stats = {t.name: t for t in pool.stats().tenants}
    assert stats["a"].owned_pages == gp and stats["a"].reclaimed_total == 9 * gp
    assert stats["b"].owned_pages == 10 * gp
    assert len(b_blocks) == 9 * b.blocks_per_group and b.free_blocks == b.blocks_per_group - 1
    _check_all(pool, a, b, c)


def test_allocate_returns_none_when_nobody_can_give(vmm: HostVMM) -> None:
    """With every page holding live blocks, allocate answers None, not an exception."""
    gp = _group_pages(4)
    pool = _pool(vmm, 4 * gp)
    a = ElasticKVCache(_config("a"), pool)
    b = ElasticKVCache(_config("b"), pool)
    a_blocks = a.allocate(3 * a.blocks_per_group - 1)
    assert a_blocks is not None and _owned(pool, "a") == 3 * gp
    b_blocks = b.allocate(b.free_blocks)
    assert b_blocks is not None
    assert b.allocate(1) is None
    assert b.allocate(1, reclaim=False) is None
    assert b.allocate(b.num_blocks) is None  # beyond its whole range, too
    stats = {t.name: t for t in pool.stats().tenants}
    assert stats["b"].failed_acquires == 2 and stats["a"].reclaimed_total == 0
    assert pool.events[-1].kind == "no_memory"
    _check_all(pool, a, b)  # no group left pending

    # Under pressure a's owner preempts: frees blocks and trims, so b gets its page group.
    def preempt(pages: int) -> int:
        a.free(a_blocks[-a.blocks_per_group :])
        del a_blocks[-a.blocks_per_group :]
        return a.trim(0)

    a.on_pressure = preempt
    assert a.reclaimable(ReclaimLevel.PRESSURE) == 2 * gp
    assert b.allocate(1) is not None
    assert _owned(pool, "a") == 2 * gp
    _check_all(pool, a, b)


def test_reclaim_skips_higher_priority_live_memory(vmm: HostVMM) -> None:
    """A cache of higher priority keeps its live blocks even with a pressure hook."""
    gp = _group_pages(4)
    pool = _pool(vmm, 3 * gp)
    high = ElasticKVCache(_config("high", priority=1), pool)
    low = ElasticKVCache(_config("low", priority=0), pool)
    held = high.allocate(2 * high.blocks_per_group - 1)
    assert held is not None
    calls: list[int] = []

    def preempt(pages: int) -> int:
        calls.append(pages)
        return 0

    high.on_pressure = preempt
    assert low.allocate(low.free_blocks + 1) is None and calls == []
    _check_all(pool, high, low)


def test_reclaimable_by_level(vmm: HostVMM) -> None:
    """Empty groups up to the reserve are RESERVE; FREE (asked after RESERVE) takes any empty
    group; live pages need a hook."""
    gp = _group_pages(4)
    pool = _pool(vmm, 32)
    cache = ElasticKVCache(_config("m", reserve_groups=2), pool)
    blocks = cache.allocate(5 * cache.blocks_per_group - 1)  # 5 groups
    assert blocks is not None
    cache.free(_in_groups(blocks, cache.blocks_per_group, range(1, 4)))  # 3 empty again
    assert cache.allocator.empty_groups == 3
    assert cache.reclaimable(ReclaimLevel.RESERVE) == 2 * gp
    assert cache.reclaimable(ReclaimLevel.FREE) == 3 * gp
    assert cache.reclaimable(ReclaimLevel.PRESSURE) == 0
    cache.on_pressure = lambda pages: 0
    assert cache.reclaimable(ReclaimLevel.PRESSURE) == 4 * gp
    assert cache.shrink(1, ReclaimLevel.FREE) == gp  # whole groups, rounded up
    assert cache.shrink(3 * gp, ReclaimLevel.RESERVE) == 2 * gp
    assert cache.shrink(gp, ReclaimLevel.FREE) == 0  # nothing empty is left
    _check_all(pool, cache)


def test_set_limit_shrinks_a_cache(vmm: HostVMM) -> None:
    """Lowering a cache's pool limit unmaps its empty groups, reserve first."""
    gp = _group_pages(4)
    pool = _pool(vmm, 64)
    cache = ElasticKVCache(_config("m", reserve_groups=1), pool)
    blocks = cache.allocate(6 * cache.blocks_per_group - 1)
    assert blocks is not None
    cache.free(_in_groups(blocks, cache.blocks_per_group, range(2, 6)))  # 4 empty groups
    assert pool.set_limit("m", 3 * gp) == 0
    assert cache.mapped_groups == 3 and _owned(pool, "m") == 3 * gp
    assert cache.growth_blocks() == 0 and not cache.can_allocate(cache.free_blocks + 1)
    assert cache.allocate(cache.free_blocks + 1) is None  # the limit: no exception either
    _check_all(pool, cache)


# Regression guard: one pass RESERVE → FREE (set_limit, policy reclaim) must reach every
# empty group, even though the warm reserve is recomputed after each shrink.


def test_set_limit_to_its_minimum_empties_an_idle_cache(vmm: HostVMM) -> None:
    """An idle cache limited to its minimum gives back every empty group."""
    pool = _pool(vmm, 64)
    cache = ElasticKVCache(_config("m", reserve_groups=1), pool)
    blocks = cache.allocate(5 * cache.blocks_per_group - 1)
    assert blocks is not None
    cache.free(blocks)  # 5 groups: group 0 (padding) and 4 empty
    assert pool.set_limit("m", cache.group_pages) == 0
    _check_all(pool, cache)


def test_reclaim_takes_every_empty_group_in_one_pass(vmm: HostVMM) -> None:
    """A tenant short of 3 groups gets them from another cache holding 3 empty groups."""
    pool = _pool(vmm, 8 * _group_pages(4))
    a = ElasticKVCache(_config("a", reserve_groups=0), pool)
    b = ElasticKVCache(_config("b", reserve_groups=1), pool)
    b_blocks = b.allocate(4 * b.blocks_per_group - 1)
    assert b_blocks is not None
    b.free(b_blocks)  # b: group 0 and 3 empty groups
    assert a.allocate(a.free_blocks + 3 * a.blocks_per_group) is not None  # the pool is full
    assert a.allocate(3 * a.blocks_per_group) is not None
    _check_all(pool, a, b)


def test_limit_lowered_while_growing_is_no_memory(
    vmm: HostVMM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A limit that drops between the cache's headroom check and its pool acquire (another
    thread's set_limit, or the refiller growing the same cache) makes allocate answer None;
    no group is left pending."""
    gp = _group_pages(4)
    pool = _pool(vmm, 64)
    cache = ElasticKVCache(_config("m", reserve_groups=0), pool)
    claim = cache.allocator.claim_unmapped

    def claim_while_limit_drops(count: int) -> list[int]:
        pool.set_limit("m", cache.account.num_owned)  # nothing to shrink: no consumer call
        return claim(count)

    monkeypatch.setattr(cache.allocator, "claim_unmapped", claim_while_limit_drops)
    assert cache.allocate(cache.free_blocks + 1) is None
    monkeypatch.undo()
    _check_all(pool, cache)
    pool.set_limit("m", 4 * gp)
    assert cache.allocate(cache.free_blocks + 1) is not None
    _check_all(pool, cache)


# ---- trim and capacity queries --------------------------------------------------------------


def test_trim_returns_pages(vmm: HostVMM) -> None:
    """trim unmaps empty groups beyond the reserve and gives their pages to the pool."""
    gp = _group_pages(3)
    pool = _pool(vmm, 8 * gp)
    cache = ElasticKVCache(_config("m", reserve_groups=1, **STRADDLES), pool)
    blocks = cache.allocate(4 * cache.blocks_per_group - 1)  # groups 0..3
    assert blocks is not None and cache.mapped_groups == 4
    assert cache.trim() == 0  # nothing is empty
    cache.free(_in_groups(blocks, cache.blocks_per_group, range(1, 4)))  # group 0 in use
    assert cache.trim() == 2 * gp  # one empty group stays as the warm reserve
    assert cache.trim() == 0
    assert cache.trim(0) == gp
    assert cache.mapped_groups == 1 and _owned(pool, "m") == gp
    stats = pool.stats()
    assert stats.free_pages == 3 * gp and vmm.live_pages == 4 * gp
    assert pool.trim(0) == 3 * gp and vmm.live_pages == gp
    assert cache.allocator.state(0) is GroupState.IN_USE
    _check_all(pool, cache)


@pytest.mark.parametrize("other_pages", [0, 4, 12])
@pytest.mark.parametrize("limit_groups", [None, 3])
def test_capacity_queries_match_allocate(
    vmm: HostVMM, other_pages: int, limit_groups: int | None
) -> None:
    """free_blocks, growth_blocks and can_allocate predict what allocate then does."""
    gp = _group_pages(4)
    pool = _pool(vmm, 24)
    pool.register("other")
    if other_pages:
        assert pool.acquire("other", other_pages) is not None
    max_pages = None if limit_groups is None else limit_groups * gp
    cache = ElasticKVCache(_config("m", max_pages=max_pages, max_tokens=200), pool)
    bpg = cache.blocks_per_group
    base = cache.allocate(2)  # group 0 partly used
    assert base is not None
    unmapped = cache.allocator.num_groups - cache.mapped_groups
    groups = min(pool.available("m") // gp, unmapped)
    assert cache.growth_blocks() == groups * bpg
    for count in range(cache.num_blocks + 2):
        expected = count <= cache.free_blocks + cache.growth_blocks()
        assert cache.can_allocate(count) == expected
        blocks = cache.allocate(count, reclaim=False)
        assert (blocks is not None) == expected, count
        if blocks is not None:
            assert len(set(blocks)) == count and not set(blocks) & set(base)
            cache.free(blocks)
        cache.trim(0)
        _check_all(pool, cache)
    assert cache.free_blocks == bpg - 3
    _check_all(pool, cache)


# ---- warm reserve ---------------------------------------------------------------------------


def test_refiller_maps_the_warm_reserve_in_the_background(vmm: HostVMM) -> None:
    """The pool's refill thread maps reserve groups ahead of need, woken by allocate."""
    gp = _group_pages(4)
    pool = _pool(vmm, 12 * gp)
    cache = ElasticKVCache(_config("m", reserve_groups=2), pool)
    assert cache.allocator.empty_groups == 0
    pool.start_refiller(interval_s=10.0)  # only wake-ups drive it
    try:
        pool.wake_refiller()
        assert _wait_for(lambda: cache.allocator.empty_groups == 2)
        assert cache.mapped_groups == 3
        # Using the reserve wakes the refiller, which maps the next groups behind it.
        blocks = cache.allocate(cache.free_blocks)
        assert blocks is not None and cache.allocator.empty_groups == 0
        assert _wait_for(lambda: cache.allocator.empty_groups == 2)
        assert cache.mapped_groups == 5
        # A full pool is not refilled by reclaiming from others.
        other = ElasticKVCache(_config("other", reserve_groups=0), pool)
        taken = other.allocate(other.free_blocks + 6 * other.blocks_per_group)
        assert taken is not None
        assert pool.stats().free_pages == 0
        more = cache.allocate(cache.free_blocks)
        assert more is not None
        time.sleep(0.05)
        assert cache.allocator.empty_groups == 0 and _owned(pool, "other") == 7 * gp
    finally:
        pool.stop_refiller()
    _check_all(pool, cache, other)


# ---- threads ---------------------------------------------------------------------------------


def _churn(cache: ElasticKVCache, seed: int, until: float, errors: list[BaseException]) -> None:
    """Random allocate/free/trim on one cache; every block carries a marker it is checked by."""
    rng = random.Random(seed)
    k = cache.kv_caches[0][0]
    held: list[int] = []
    try:
        while time.monotonic() < until:
            roll = rng.random()
            if roll < 0.5:
                got = cache.allocate(rng.randint(1, 2 * cache.blocks_per_group))
                if got is not None:
                    k[got] = torch.tensor(got, dtype=torch.float32)[:, None, None, None]
                    held += got
            elif roll < 0.85 and held:
                rng.shuffle(held)
                cut = rng.randint(1, len(held))
                gone, held = held[:cut], held[cut:]
                marks = k[gone][:, 0, 0, 0]
                assert torch.equal(marks, torch.tensor(gone, dtype=torch.float32)), "data lost"
                cache.free(gone)
            else:
                cache.trim(rng.choice([0, None]))
        marks = k[held][:, 0, 0, 0]
        assert torch.equal(marks, torch.tensor(held, dtype=torch.float32)), "data lost"
        cache.free(held)
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


def test_four_threads_share_one_pool(vmm: HostVMM) -> None:
    """Four caches churn on one tight pool, reclaiming from each other while the refiller
    runs: no deadlock, no lost data, and every ledger agrees afterwards."""
    gp = _group_pages(4)
    pool = _pool(vmm, 16 * gp)
    caches = [
        ElasticKVCache(_config(f"m{i}", reserve_groups=1, max_pages=8 * gp), pool) for i in range(4)
    ]
    pool.start_refiller()
    errors: list[BaseException] = []
    until = time.monotonic() + 2.0
    threads = [
        threading.Thread(target=_churn, args=(cache, i, until, errors), daemon=True)
        for i, cache in enumerate(caches)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "deadlock"
    refiller = pool._refiller
    assert refiller is not None and refiller.is_alive(), "the refill thread died"
    pool.stop_refiller()
    assert errors == []
    assert sum(t.reclaimed_total for t in pool.stats().tenants) > 0
    _check_all(pool, *caches)
    for cache in caches:
        assert cache.free_blocks == cache.mapped_groups * cache.blocks_per_group - 1
        cache.close()
    pool.close()
    assert vmm.live_pages == 0
    pool.check_integrity()


# ---- a model-checked random walk ------------------------------------------------------------


class CacheMachine(RuleBasedStateMachine):
    """Random allocate/free/trim/set_limit over 2-3 caches sharing one small pool."""

    def __init__(self) -> None:
        super().__init__()
        self.vmm = HostVMM(PAGE)
        self.pool = PagePool(self.vmm, 12 * _group_pages(4) * PAGE)
        self.caches: list[ElasticKVCache] = []
        self.held: list[set[int]] = []

    @initialize(
        specs=st.lists(
            st.tuples(st.sampled_from([4, 3]), st.integers(0, 2), st.integers(0, 1)),
            min_size=2,
            max_size=3,
        )
    )
    def build(self, specs: list[tuple[int, int, int]]) -> None:
        for i, (heads, reserve, priority) in enumerate(specs):
            config = _config(f"m{i}", num_kv_heads=heads, reserve_groups=reserve, priority=priority)
            self.caches.append(ElasticKVCache(config, self.pool))
            self.held.append(set())

    def teardown(self) -> None:
        for cache in self.caches:
            cache.close()
        self.pool.close()
        self.vmm.close()

    def _marker(self, i: int, blocks: list[int]) -> torch.Tensor:
        return torch.tensor([1000 * i + b for b in blocks], dtype=torch.float32)

    @rule(data=st.data(), n=st.integers(1, 40), reclaim=st.booleans())
    def allocate(self, data: st.DataObject, n: int, reclaim: bool) -> None:
        i = data.draw(st.integers(0, len(self.caches) - 1))
        cache = self.caches[i]
        predicted = cache.can_allocate(n)
        blocks = cache.allocate(n, reclaim=reclaim)
        if not reclaim:
            assert (blocks is not None) == predicted
        elif predicted:
            assert blocks is not None
        if blocks is None:
            return
        assert len(blocks) == n == len(set(blocks))
        assert not set(blocks) & self.held[i], "a block handed out twice"
        assert 0 not in blocks
        self.held[i] |= set(blocks)
        cache.kv_caches[1][1][blocks] = self._marker(i, blocks)[:, None, None, None]

    @precondition(lambda self: any(self.held))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from([j for j, h in enumerate(self.held) if h]))
        blocks = data.draw(st.lists(st.sampled_from(sorted(self.held[i])), unique=True))
        cache = self.caches[i]
        marks = cache.kv_caches[1][1][blocks][:, 0, 0, 0]
        assert torch.equal(marks, self._marker(i, blocks)), "data lost"
        cache.free(blocks)
        self.held[i] -= set(blocks)

    @rule(data=st.data(), keep=st.sampled_from([None, 0, 1]))
    def trim(self, data: st.DataObject, keep: int | None) -> None:
        cache = self.caches[data.draw(st.integers(0, len(self.caches) - 1))]
        empty = cache.allocator.empty_groups
        kept = cache.config.reserve_groups if keep is None else keep
        assert cache.trim(keep) == max(0, empty - kept) * cache.group_pages
        assert cache.allocator.empty_groups == min(empty, kept)

    @rule(data=st.data())
    def set_limit(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.caches) - 1))
        cache = self.caches[i]
        empty = cache.allocator.empty_groups
        in_use = cache.mapped_groups - empty
        budget_groups = self.pool.budget_pages // cache.group_pages
        # At least what live blocks hold (below that is the owner's to enforce).
        floor = in_use
        groups = data.draw(st.integers(max(1, floor), max(floor, budget_groups)))
        limit = groups * cache.group_pages + data.draw(st.integers(0, cache.group_pages - 1))
        assert self.pool.set_limit(cache.config.name, limit) == 0
        assert cache.mapped_groups * cache.group_pages <= limit

    @rule()
    def refill(self) -> None:
        stats = self.pool.stats()
        unclaimed = stats.free_pages + max(0, stats.budget_pages - stats.created_pages)
        expected = []
        for cache in self.caches:  # in registration order, each from what is left
            missing = cache.config.reserve_groups - cache.allocator.empty_groups
            available = min(cache.account.headroom, unclaimed)
            groups = max(0, min(missing, available // cache.group_pages))
            if groups > cache.allocator.num_groups - cache.mapped_groups:
                groups = 0  # a grow is all or nothing
            unclaimed -= groups * cache.group_pages
            expected.append(cache.mapped_groups + groups)
        reclaimed = [t.reclaimed_total for t in stats.tenants]
        self.pool.refill_reserves()
        assert [cache.mapped_groups for cache in self.caches] == expected
        assert [t.reclaimed_total for t in self.pool.stats().tenants] == reclaimed

    @invariant()
    def ledgers_agree(self) -> None:
        _check_all(self.pool, *self.caches)
        for cache, held in zip(self.caches, self.held, strict=True):
            account = self.pool.tenant(cache.config.name)
            assert account.num_owned == cache.mapped_groups * cache.group_pages
            mapped_blocks = cache.mapped_groups * cache.blocks_per_group
            assert cache.free_blocks == mapped_blocks - len(held) - 1
        assert self.vmm.live_pages == self.pool.stats().created_pages


CacheMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCacheMachine = CacheMachine.TestCase
