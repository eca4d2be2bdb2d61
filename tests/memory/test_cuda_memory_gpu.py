"""The balloon driver on a real CUDA device (run with `pytest -m gpu`)."""

from __future__ import annotations

import random

import pytest
import torch

from prism.kvcache import ElasticKVCache, KVCacheConfig
from prism.memory import ElasticTensor, PagePool, VMMError

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def vmm():  # type: ignore[no-untyped-def]
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.cuda.init()
    from prism.memory.cuda_vmm import CudaVMM

    return CudaVMM(0)


def test_page_size_is_the_allocation_granularity(vmm) -> None:  # type: ignore[no-untyped-def]
    """The H200 maps 2 MiB pages."""
    assert vmm.page_size == 2 << 20


def test_page_keeps_its_data_when_moved(vmm) -> None:  # type: ignore[no-untyped-def]
    """A page unmapped from one range and mapped into another carries its bytes along."""
    a = ElasticTensor(vmm, (vmm.page_size // 4,), torch.float32)
    b = ElasticTensor(vmm, (4, vmm.page_size // 4), torch.float32)
    handle = vmm.create()
    a.map(0, [handle])
    data = torch.randn(vmm.page_size // 4, device="cuda")
    a.tensor.copy_(data)
    torch.cuda.synchronize()
    moved = a.unmap(0)
    b.map(2, moved)
    assert torch.equal(b.tensor[2], data)
    b.unmap(2)
    vmm.release(handle)
    a.close()
    b.close()


def test_driver_errors_name_the_call(vmm) -> None:  # type: ignore[no-untyped-def]
    """A bad handle is an exception naming the driver call, not a crash."""
    with pytest.raises(VMMError, match="cuMemRelease"):
        vmm.release(123456789)
    t = ElasticTensor(vmm, (vmm.page_size,), torch.uint8)
    with pytest.raises(VMMError, match="unmap"):
        t.unmap(0)
    t.close()


def test_kv_data_survives_other_tenants_ballooning(vmm) -> None:  # type: ignore[no-untyped-def]
    """Blocks written by one model read back intact while two others grow and shrink."""
    pool = PagePool(vmm, 1 << 30)
    config = KVCacheConfig("a", 2, 8, 128, 16, torch.bfloat16, max_tokens=64 * 1024)
    caches = [
        ElasticKVCache(KVCacheConfig(n, 2, 8, 128, 16, torch.bfloat16, 64 * 1024), pool)
        for n in ("b", "c")
    ]
    mine = ElasticKVCache(config, pool)
    blocks = mine.allocate(300)
    assert blocks is not None
    written = [torch.randn(len(blocks), 16, 8, 128, device="cuda").bfloat16() for _ in range(4)]
    for layer in range(2):
        mine.kv_caches[layer][0][blocks] = written[2 * layer]
        mine.kv_caches[layer][1][blocks] = written[2 * layer + 1]
    rng = random.Random(0)
    held: dict[str, list[int]] = {"b": [], "c": []}
    for _ in range(40):
        cache = rng.choice(caches)
        name = cache.config.name
        if held[name] and rng.random() < 0.5:
            cache.free(held[name])
            held[name] = []
            cache.trim(0)
        else:
            got = cache.allocate(rng.randint(1, 400))
            if got is not None:
                cache.kv_caches[0][0][got] = 1.0
                held[name] += got
        for c in (*caches, mine):
            c.check_integrity()
        pool.check_integrity()
    torch.cuda.synchronize()
    for layer in range(2):
        assert torch.equal(mine.kv_caches[layer][0][blocks], written[2 * layer])
        assert torch.equal(mine.kv_caches[layer][1][blocks], written[2 * layer + 1])
    for c in (*caches, mine):
        c.close()
    pool.check_integrity()
    pool.close()


def test_cuda_graph_replays_over_remapped_pages(vmm) -> None:  # type: ignore[no-untyped-def]
    """A graph captured over an elastic tensor stays valid after its pages are swapped."""
    n = vmm.page_size // 4
    x = ElasticTensor(vmm, (2, n), torch.float32)
    y = ElasticTensor(vmm, (2, n), torch.float32)
    pages = [vmm.create() for _ in range(4)]
    x.map(0, pages[:2])
    y.map(0, pages[2:])
    x.tensor.normal_()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        torch.mul(x.tensor, 2.0, out=y.tensor)  # warm-up on the side stream
        stream.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            torch.mul(x.tensor, 2.0, out=y.tensor)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y.tensor, x.tensor * 2)
    # Unmap both inputs and map fresh pages in their place, holding new data.
    old = x.unmap(0, 2)
    fresh = [vmm.create() for _ in range(2)]
    x.map(0, fresh[::-1])
    x.tensor.uniform_()
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y.tensor, x.tensor * 2)
    del graph
    for handle in x.close() + y.close() + old:
        vmm.release(handle)


def test_deflate_returns_device_memory(vmm) -> None:  # type: ignore[no-untyped-def]
    """`cudaMemGetInfo` sees the memory come back once the pool trims freed pages."""
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info()
    pool = PagePool(vmm, 4 << 30)
    cache = ElasticKVCache(
        KVCacheConfig("m", 32, 8, 128, 16, torch.bfloat16, max_tokens=64 * 1024), pool
    )
    blocks = cache.allocate(cache.blocks_per_group * 8)  # 8 groups of 64 pages = 1 GiB
    assert blocks is not None
    free_full, _ = torch.cuda.mem_get_info()
    assert free_before - free_full >= (1 << 30)
    cache.free(blocks)
    cache.close()
    pool.trim(0)
    free_after, _ = torch.cuda.mem_get_info()
    assert free_after >= free_before - (64 << 20)
    pool.check_integrity()
