"""One model's paged KV cache on top of the balloon driver."""

from prism.kvcache.block_allocator import BlockAllocator, BlockError, GroupState
from prism.kvcache.elastic_kv_cache import ElasticKVCache, KVCacheConfig

__all__ = ["BlockAllocator", "BlockError", "ElasticKVCache", "GroupState", "KVCacheConfig"]
