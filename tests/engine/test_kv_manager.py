"""`KVBlockManager` over a fake block pool: block tables, prefix caching, reference
counts, LRU eviction. Every test ends with `check_integrity()`."""

from __future__ import annotations

from engine_helpers import FakeBlockSource, fake_request

from prism.engine import SamplingParams
from prism.engine.kv_manager import KVBlockManager
from prism.engine.request import Request

BS = 4
PARAMS = SamplingParams(max_tokens=4)


def manager(
    num_blocks: int = 17, prefix_caching: bool = True
) -> tuple[KVBlockManager, FakeBlockSource]:
    source = FakeBlockSource(num_blocks)
    return KVBlockManager(source, BS, prefix_caching=prefix_caching), source


def prefill(kv: KVBlockManager, req: Request) -> None:
    """Admit `req` whole and mark its prompt computed, as an engine step would."""
    count = kv.admit(req, 1000)
    assert count > 0
    req.num_computed_tokens += count
    kv.commit(req)


def test_allocate_is_all_or_nothing() -> None:
    """Blocks cover exactly the tokens asked for; a request the pool cannot cover gets
    nothing and the pool is unchanged."""
    kv, source = manager(num_blocks=5)  # 4 usable blocks
    req = fake_request(range(10), PARAMS)
    assert kv.allocate(req, 10) and len(req.block_ids) == 3
    assert kv.allocate(req, 2) and len(req.block_ids) == 3  # 12 tokens still fit
    big = fake_request(range(8), PARAMS)
    assert not kv.allocate(big, 8) and big.block_ids == [] and source.free_blocks == 1
    kv.free(req)
    assert req.block_ids == [] and source.free_blocks == 4
    kv.check_integrity()


def test_commit_publishes_only_full_computed_blocks() -> None:
    """Only blocks whose every token is computed enter the prefix cache."""
    kv, _ = manager()
    req = fake_request(range(10), PARAMS)
    assert kv.admit(req, 6) == 6  # a chunk: 1 full block computed
    req.num_computed_tokens += 6
    kv.commit(req)
    assert len(req.block_hashes) == 1
    other = fake_request(range(10), PARAMS)
    assert kv.admit(other, 100) == 6 and other.num_cached_tokens == 4
    kv.check_integrity()


def test_shared_prefix_is_reference_counted() -> None:
    """A second request with the same prefix holds the same blocks; they become
    evictable only when the last holder lets go, and are then reused on a hit."""
    kv, source = manager()
    first = fake_request([*range(12), 99], PARAMS)
    prefill(kv, first)
    second = fake_request([*range(12), 50, 51], PARAMS)
    assert kv.admit(second, 100) == 2
    assert second.num_cached_tokens == 12 and second.block_ids[:3] == first.block_ids[:3]
    kv.free(first)
    assert kv.num_evictable == 0  # still held by `second`
    kv.free(second)
    assert kv.num_evictable == 3
    third = fake_request([*range(8), 77], PARAMS)
    assert kv.admit(third, 100) == 1 and third.num_cached_tokens == 8
    assert kv.num_evictable == 1
    assert kv.hits == 20 and kv.queries == 13 + 14 + 9
    kv.free(third)
    assert kv.reset_prefix_cache() == 3 and source.free_blocks == 16
    kv.check_integrity()


def test_prefix_match_needs_the_whole_chain() -> None:
    """Equal tokens in a later block do not match after a different first block."""
    kv, _ = manager()
    prefill(kv, fake_request([1, 2, 3, 4, 5, 6, 7, 8, 0], PARAMS))
    other = fake_request([9, 9, 9, 9, 5, 6, 7, 8, 0], PARAMS)
    assert kv.admit(other, 100) == 9 and other.num_cached_tokens == 0
    kv.check_integrity()


def test_full_prompt_hit_still_computes_its_last_token() -> None:
    """A prompt of whole blocks, all cached, recomputes its last block for logits."""
    kv, _ = manager()
    prefill(kv, fake_request(range(8), PARAMS))
    again = fake_request(range(8), PARAMS)
    assert kv.admit(again, 100) == 4 and again.num_computed_tokens == 4
    kv.check_integrity()


def test_failed_admission_leaves_request_and_cache_untouched() -> None:
    """When the rest of a prompt does not fit, admit returns 0, the request holds
    nothing, the prefix blocks stay cached, and the hit counters are unchanged."""
    kv, source = manager(num_blocks=6)  # 5 usable blocks
    done = fake_request(range(9), PARAMS)
    prefill(kv, done)
    kv.free(done)
    holder = fake_request(range(100, 108), PARAMS)
    assert kv.allocate(holder, 8)  # leaves 0 free + 2 evictable (+1 plain freed)
    hits, queries, evictable = kv.hits, kv.queries, kv.num_evictable
    big = fake_request([*range(8), *range(200, 220)], PARAMS)
    assert kv.admit(big, 100) == 0
    assert big.block_ids == [] and big.num_computed_tokens == big.num_cached_tokens == 0
    assert (kv.hits, kv.queries) == (hits, queries)
    assert kv.num_evictable <= evictable  # evicted to try, never leaked
    assert len(source.allocated) == len(holder.block_ids) + kv.num_evictable
    kv.check_integrity()


def test_eviction_is_least_recently_used_first() -> None:
    """Under pressure the cached blocks freed longest ago go first; the others still hit."""
    kv, source = manager(num_blocks=7)  # 6 usable blocks
    old = fake_request([*range(8), 0], PARAMS)
    new = fake_request([*range(50, 58), 0], PARAMS)
    for req in (old, new):
        prefill(kv, req)
        kv.free(req)
    assert kv.num_evictable == 4 and source.free_blocks == 2
    filler = fake_request(range(100, 116), PARAMS)
    assert kv.allocate(filler, 16)  # 4 blocks: 2 free + the 2 least recently used
    assert kv.num_evictable == 2
    kv.free(filler)
    assert kv.admit(fake_request([*range(8), 1], PARAMS), 100) == 9  # `old` was evicted
    hit = fake_request([*range(50, 58), 1], PARAMS)
    assert kv.admit(hit, 100) == 1 and hit.num_cached_tokens == 8
    kv.check_integrity()


def test_explicit_evict_and_reset() -> None:
    """evict(n) frees at most n unheld cached blocks; reset frees the rest."""
    kv, source = manager()
    for start in (0, 100):
        req = fake_request([*range(start, start + 12), 0], PARAMS)
        prefill(kv, req)
        kv.free(req)
    assert kv.num_evictable == 6
    assert kv.evict(2) == 2 and kv.num_evictable == 4
    assert kv.reset_prefix_cache() == 4 and kv.evict(5) == 0
    assert source.free_blocks == 16 and not source.allocated
    kv.check_integrity()


def test_prefix_caching_off_caches_nothing() -> None:
    """With prefix caching off nothing is published and every block is freed at once."""
    kv, source = manager(prefix_caching=False)
    first = fake_request([*range(12), 0], PARAMS)
    prefill(kv, first)
    assert first.block_hashes == []
    kv.free(first)
    second = fake_request([*range(12), 0], PARAMS)
    assert kv.admit(second, 100) == 13 and second.num_cached_tokens == 0
    kv.free(second)
    assert kv.num_evictable == 0 and source.free_blocks == 16 and kv.hits == 0
    kv.check_integrity()


def test_same_prefix_computed_twice_is_cached_once() -> None:
    """Two requests that compute the same prefix side by side: one block is published,
    the duplicate stays private and goes straight back to the pool on free."""
    kv, source = manager()
    a, b = fake_request([*range(8), 1], PARAMS), fake_request([*range(8), 2], PARAMS)
    for req in (a, b):
        assert kv.admit(req, 100) == 9
    for req in (a, b):
        req.num_computed_tokens = 9
        kv.commit(req)
    kv.free(a)
    kv.free(b)
    assert kv.num_evictable == 2 and source.free_blocks == 14
    kv.check_integrity()
