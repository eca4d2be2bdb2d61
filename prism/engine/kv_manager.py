"""`KVBlockManager`: requests' block tables over one elastic KV cache, with prefix caching.

A full block is keyed by its tokens and the key of the block before it, so equal keys
mean equal prefixes. Blocks are reference counted; a cached block that no request
holds stays in an LRU, reusable on a hit, and is the first thing evicted when the
cache needs room (the token tuple is kept with the key, so a hash collision can never
serve the wrong KV).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Protocol

from prism.engine.request import Request


class BlockSource(Protocol):
    """What the manager needs of a KV cache (`ElasticKVCache` provides it)."""

    @property
    def free_blocks(self) -> int: ...

    def growth_blocks(self) -> int:
        """Blocks the cache could add from free memory, taking none from other models."""
        ...

    def can_allocate(self, count: int) -> bool:
        """Could `count` blocks be had without taking memory from other models?"""
        ...

    def allocate(self, count: int) -> list[int] | None: ...

    def free(self, blocks: list[int]) -> None: ...


_Key = tuple[int, tuple[int, ...]]  # (key of the previous block or 0, this block's tokens)


class KVBlockManager:
    def __init__(self, cache: BlockSource, block_size: int, *, prefix_caching: bool = True) -> None:
        self.cache = cache
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._refs: dict[int, int] = {}  # block -> requests holding it (hashed blocks only)
        self._by_key: dict[_Key, int] = {}  # prefix key -> block holding that KV
        self._key_of: dict[int, _Key] = {}  # block -> its key
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unheld; LRU first
        self.hits = 0  # prompt tokens served from the prefix cache, over the manager's life
        self.queries = 0  # prompt tokens looked up

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_fit(self, extra_blocks: int) -> bool:
        """O(1): could `extra_blocks` be had from mapped free blocks and evictable ones?"""
        return extra_blocks <= self.cache.free_blocks + len(self._evictable)

    # ---- admission and growth ----------------------------------------------------------

    def admit(self, req: Request, budget: int, reserve: bool = False) -> int:
        """First allocation of a waiting request: attach its cached prefix, then blocks
        for up to `budget` of the remaining tokens (`reserve`: for all of them and the
        first output token, all or nothing, though only `budget` are computed now).
        Returns the tokens to compute, or 0 (and `req` untouched) when the cache cannot
        hold them."""
        if self.prefix_caching:
            self._take_prefix(req)
        remaining = req.num_tokens - req.num_computed_tokens
        count = min(remaining, budget)
        if self.allocate(req, remaining + 1 if reserve else count):
            return count
        self._drop_prefix(req)
        return 0

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Blocks for `num_new_tokens` more tokens of `req`; all or nothing."""
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.block_ids)
        if need <= 0:
            return True
        blocks = self._get_blocks(need)
        if blocks is None:
            return False
        req.block_ids += blocks
        return True

    def _take_prefix(self, req: Request) -> int:
        """Attach cached blocks matching req's prompt; returns tokens matched."""
        tokens, bs = req.token_ids, self.block_size
        limit = (req.num_tokens - 1) // bs  # always leave >= 1 token to compute
        self.queries += req.num_tokens
        prev = 0
        for i in range(limit):
            key = (prev, tuple(tokens[i * bs : (i + 1) * bs]))
            block = self._by_key.get(key)
            if block is None:
                break
            self._hold(block)
            req.block_ids.append(block)
            req.block_hashes.append(hash(key))
            prev = hash(key)
        matched = len(req.block_ids) * bs
        req.num_computed_tokens = req.num_cached_tokens = matched
        self.hits += matched
        return matched

    def _drop_prefix(self, req: Request) -> None:
        """Undo `_take_prefix` for a request that could not be admitted after all."""
        self.hits -= req.num_cached_tokens
        self.queries -= req.num_tokens
        self.free(req)
        req.num_computed_tokens = req.num_cached_tokens = 0

    def _hold(self, block: int) -> None:
        self._refs[block] = self._refs.get(block, 0) + 1
        self._evictable.pop(block, None)

    def _get_blocks(self, count: int) -> list[int] | None:
        """Blocks from, in order: mapped free blocks and free pool pages; this model's own
        cached prefixes, LRU first (bookkeeping only, where taking another model's group
        costs an unmap and a map on the request path); other models' spare groups and
        groups of cached prefixes (`ReclaimLevel.CACHED`); and only then other models'
        live memory (an idle model sleeps, requests are preempted). Stale prefixes never
        put another model to sleep."""
        if self._evictable and not self.cache.can_allocate(count):
            self.evict(count - self.cache.free_blocks - self.cache.growth_blocks())
        return self.cache.allocate(count)

    # ---- after a step ----------------------------------------------------------------

    def commit(self, req: Request) -> None:
        """Publish req's newly completed full blocks in the prefix cache."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        full = min(req.num_computed_tokens // bs, len(req.block_ids))
        for i in range(len(req.block_hashes), full):
            prev = req.block_hashes[i - 1] if i else 0
            key = (prev, tuple(req.token_ids[i * bs : (i + 1) * bs]))
            req.block_hashes.append(hash(key))
            block = req.block_ids[i]
            if key not in self._by_key and block not in self._key_of:
                self._by_key[key] = block
                self._key_of[block] = key
                self._refs[block] = 1

    # ---- release ---------------------------------------------------------------------

    def free(self, req: Request) -> None:
        """Drop req's hold on its blocks: cached ones stay reusable, the rest are freed."""
        plain: list[int] = []
        for block in req.block_ids:
            if block in self._key_of:
                self._refs[block] -= 1
                if self._refs[block] == 0:
                    self._evictable[block] = None  # most recently used last
            else:
                plain.append(block)
        if plain:
            self.cache.free(plain)
        req.block_ids = []
        req.block_hashes = []

    def evict(self, count: int) -> int:
        """Free up to `count` least-recently-used cached blocks; returns how many."""
        victims: list[int] = []
        while self._evictable and len(victims) < count:
            block, _ = self._evictable.popitem(last=False)
            del self._by_key[self._key_of.pop(block)]
            del self._refs[block]
            victims.append(block)
        if victims:
            self.cache.free(victims)
        return len(victims)

    def cached_blocks(self) -> Iterable[int]:
        """Cached blocks no request holds, least recently used first (`PrefixCache`)."""
        return self._evictable.keys()

    def evict_blocks(self, blocks: list[int]) -> None:
        """Drop these cached, unheld blocks from the prefix cache and free them."""
        for block in blocks:
            if block not in self._evictable:
                raise ValueError(f"block {block} is not an unheld cached block")
        for block in blocks:
            del self._evictable[block]
            del self._by_key[self._key_of.pop(block)]
            del self._refs[block]
        self.cache.free(blocks)

    def reset_prefix_cache(self) -> int:
        return self.evict(len(self._evictable))

    def check_integrity(self) -> None:
        assert set(self._key_of) == set(self._refs), "keyed blocks and refcounts drifted"
        for block in self._evictable:
            assert self._refs[block] == 0, f"evictable block {block} is held"
        for key, block in self._by_key.items():
            assert self._key_of[block] == key, f"block {block} keyed twice"
