"""Memory-layer benchmark: the CUDA driver's own floor against Prism's operations.

Measured in one run on one device:
  1. driver floor per 2 MiB page through cuda.bindings: create, map, set-access, unmap,
     release (one page per call), and map/unmap batched over contiguous runs;
  2. moving pages between two tenants: pooled (unmap + map + set-access, through the
     PagePool ledger) against unpooled (unmap + release + create + map + set-access);
  3. block alloc+free from already-mapped pages, per block;
  4. growing one KV cache by 1 GiB and shrinking it by 1 GiB (Llama-3.1-8B KV shape);
  5. read/write bandwidth over an elastic KV tensor against a plain torch.empty tensor;
  6. request-path block-alloc latency (p50/p99) while another tenant is being
     reclaimed, with and without the warm reserve.

Usage: python benchmarks/bench_memory.py [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import threading
import time
from typing import Any

import torch

from prism.kvcache import ElasticKVCache, KVCacheConfig
from prism.memory import ElasticTensor, PagePool, ReclaimLevel
from prism.memory.cuda_vmm import CudaVMM

GiB = 1 << 30


def llama8b_kv(name: str, max_tokens: int, *, layers: int = 32, reserve: int = 1) -> KVCacheConfig:
    return KVCacheConfig(name, layers, 8, 128, 16, torch.bfloat16, max_tokens, reserve)


def per_page_us(seconds: float, pages: int) -> float:
    return seconds / pages * 1e6


def driver_floor(vmm: CudaVMM, pages: int) -> dict[str, float]:
    """Raw driver calls, one page per call, and batched map/unmap over one run."""
    cu = vmm._cu
    ps = vmm.page_size
    base = vmm.reserve(pages * ps).base
    out: dict[str, float] = {}
    t = time.perf_counter()
    handles = [vmm._check("cuMemCreate", cu.cuMemCreate(ps, vmm._prop, 0)) for _ in range(pages)]
    out["create_us"] = per_page_us(time.perf_counter() - t, pages)
    t = time.perf_counter()
    for i, h in enumerate(handles):
        vmm._check("cuMemMap", cu.cuMemMap(base + i * ps, ps, 0, h, 0))
    out["map_us"] = per_page_us(time.perf_counter() - t, pages)
    t = time.perf_counter()
    for i in range(pages):
        vmm._check("cuMemSetAccess", cu.cuMemSetAccess(base + i * ps, ps, vmm._access, 1))
    out["set_access_us"] = per_page_us(time.perf_counter() - t, pages)
    t = time.perf_counter()
    for i in range(pages):
        vmm._check("cuMemUnmap", cu.cuMemUnmap(base + i * ps, ps))
    out["unmap_us"] = per_page_us(time.perf_counter() - t, pages)
    # Batched: every map, then one set-access and one unmap over the whole run.
    t = time.perf_counter()
    for i, h in enumerate(handles):
        vmm._check("cuMemMap", cu.cuMemMap(base + i * ps, ps, 0, h, 0))
    vmm._check("cuMemSetAccess", cu.cuMemSetAccess(base, pages * ps, vmm._access, 1))
    out["map_set_access_batched_us"] = per_page_us(time.perf_counter() - t, pages)
    t = time.perf_counter()
    vmm._check("cuMemUnmap", cu.cuMemUnmap(base, pages * ps))
    out["unmap_batched_us"] = per_page_us(time.perf_counter() - t, pages)
    t = time.perf_counter()
    for h in handles:
        vmm._check("cuMemRelease", cu.cuMemRelease(h))
    out["release_us"] = per_page_us(time.perf_counter() - t, pages)
    vmm._check("cuMemAddressFree", cu.cuMemAddressFree(base, pages * ps))
    return out


def page_moves(vmm: CudaVMM, pages: int) -> dict[str, float]:
    """Move `pages` pages, one at a time, from tenant A's range to tenant B's range."""
    pool = PagePool(vmm, 2 * pages * vmm.page_size)
    pool.register("A")
    pool.register("B")
    a = ElasticTensor(vmm, (pages * vmm.page_size,), torch.uint8)
    b = ElasticTensor(vmm, (pages * vmm.page_size,), torch.uint8)
    got = pool.acquire("A", pages)
    assert got is not None
    for i, h in enumerate(got):
        a.map(i, [h])
    t = time.perf_counter()
    for i in range(pages):
        pool.release("A", a.unmap(i))
        moved = pool.acquire("B", 1)
        assert moved is not None
        b.map(i, moved)
    pooled = time.perf_counter() - t
    pool.release("B", b.unmap_all())
    pool.check_integrity()
    pool.close()
    # Unpooled: the page is destroyed and a new one created for the receiver.
    for i in range(pages):
        a.map(i, [vmm.create()])
    t = time.perf_counter()
    for i in range(pages):
        for h in a.unmap(i):
            vmm.release(h)
        b.map(i, [vmm.create()])
    unpooled = time.perf_counter() - t
    for h in b.close():
        vmm.release(h)
    a.close()
    return {
        "pooled_move_us": per_page_us(pooled, pages),
        "unpooled_move_us": per_page_us(unpooled, pages),
        "pooled_over_unpooled": pooled / unpooled,
    }


def block_alloc(vmm: CudaVMM) -> dict[str, float]:
    """Alloc+free cost per block when the pages are already mapped (pure bookkeeping)."""
    pool = PagePool(vmm, 4 * GiB)
    cache = ElasticKVCache(llama8b_kv("m", 64 * 1024), pool)
    warm = cache.allocate(cache.blocks_per_group * 8)
    assert warm is not None
    cache.free(warm)
    out: dict[str, float] = {}
    for batch in (1, 16):
        rounds = 20000 // batch
        t = time.perf_counter()
        for _ in range(rounds):
            blocks = cache.allocate(batch)
            assert blocks is not None
            cache.free(blocks)
        out[f"alloc_free_batch{batch}_us_per_block"] = per_page_us(
            time.perf_counter() - t, rounds * batch
        )
    cache.check_integrity()
    cache.close()
    pool.close()
    return out


def grow_shrink(vmm: CudaVMM, repeats: int = 5) -> dict[str, float]:
    """Grow a Llama-3.1-8B-shaped KV cache by 1 GiB and shrink it back, pooled pages."""
    pool = PagePool(vmm, 4 * GiB)
    cache = ElasticKVCache(llama8b_kv("m", 256 * 1024, reserve=0), pool)
    groups = GiB // (cache.group_pages * vmm.page_size)
    t = time.perf_counter()
    first = cache.allocate(groups * cache.blocks_per_group)
    cold = time.perf_counter() - t  # includes cuMemCreate of every page
    assert first is not None
    cache.free(first)
    cache.trim(0)
    grows, shrinks = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        blocks = cache.allocate(groups * cache.blocks_per_group)
        grows.append(time.perf_counter() - t)
        assert blocks is not None
        t = time.perf_counter()
        cache.free(blocks)
        released = cache.trim(0)
        shrinks.append(time.perf_counter() - t)
        assert released * vmm.page_size >= GiB
    cache.check_integrity()
    cache.close()
    pool.close()
    return {
        "grow_1gib_cold_ms": cold * 1e3,
        "grow_1gib_ms": statistics.median(grows) * 1e3,
        "shrink_1gib_ms": statistics.median(shrinks) * 1e3,
    }


def _time_pass(t: torch.Tensor, iters: int = 20) -> float:
    """Median seconds of one in-place read+write pass over `t`."""
    for _ in range(3):
        t.mul_(1.0)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t.mul_(1.0)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def bandwidth(vmm: CudaVMM) -> dict[str, float]:
    """Read/write pass over a 4 GiB elastic KV tensor vs a plain tensor of the same size."""
    pool = PagePool(vmm, 6 * GiB)
    config = llama8b_kv("bw", 1 << 20, layers=1)  # one layer: K is 2 GiB, V is 2 GiB
    cache = ElasticKVCache(config, pool)
    blocks = cache.allocate(cache.free_blocks + cache.growth_blocks() - cache.blocks_per_group)
    assert blocks is not None
    k, _ = cache.kv_caches[0]
    mapped = k[: cache.mapped_groups * cache.blocks_per_group]
    mapped.normal_()
    plain = torch.randn(mapped.shape, dtype=mapped.dtype, device=mapped.device)
    nbytes = 2 * mapped.numel() * mapped.element_size()
    results = {}
    for label, tensor in (("plain", plain), ("elastic", mapped), ("plain_again", plain)):
        results[f"{label}_tb_s"] = nbytes / _time_pass(tensor) / 1e12
    del plain
    cache.free(blocks)
    cache.close()
    pool.close()
    results["tensor_gib"] = mapped.numel() * mapped.element_size() / GiB
    plain_bw = (results["plain_tb_s"] + results["plain_again_tb_s"]) / 2
    results["elastic_over_plain"] = results["elastic_tb_s"] / plain_bw
    return results


def alloc_latency_under_reclaim(
    vmm: CudaVMM, reserve: int, seconds: float = 3.0
) -> dict[str, float]:
    """Tenant A takes 4 blocks per request while tenant B's memory is reclaimed."""
    pool = PagePool(vmm, 12 * GiB)
    victim = ElasticKVCache(llama8b_kv("B", 512 * 1024, reserve=0), pool)
    hot = ElasticKVCache(llama8b_kv("A", 512 * 1024, reserve=reserve), pool)
    filler = victim.allocate(victim.free_blocks + victim.growth_blocks())
    assert filler is not None
    victim.free(filler)  # B's load left: its pages are mapped but empty
    group = victim.group_pages
    stop = threading.Event()

    def reclaimer() -> None:  # B is deflated a group at a time, as a policy would
        while not stop.is_set() and victim.mapped_groups > 1:
            pool.reclaim_from("B", group, ReclaimLevel.FREE)
            time.sleep(0.002)

    pool.start_refiller(0.001)
    thread = threading.Thread(target=reclaimer)
    thread.start()
    latencies = []
    held: list[int] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:  # a few blocks per request, as decodes grow
        t = time.perf_counter()
        blocks = hot.allocate(4, reclaim=True)
        elapsed = time.perf_counter() - t
        if blocks is None:  # everything B had is now A's
            break
        latencies.append(elapsed)
        held += blocks
        time.sleep(0.001)  # ~1 request per ms: a busy decode loop
    stop.set()
    thread.join()
    pool.stop_refiller()
    hot.free(held)
    for cache in (hot, victim):
        cache.check_integrity()
        cache.close()
    pool.check_integrity()
    pool.close()
    latencies.sort()
    return {
        "allocs": len(latencies),
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
        "max_us": latencies[-1] * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench_memory.json")
    parser.add_argument("--pages", type=int, default=512, help="pages per driver-floor run")
    args = parser.parse_args()
    torch.cuda.init()
    vmm = CudaVMM(0)
    results: dict[str, Any] = {
        "benchmark": "bench_memory",
        "device": torch.cuda.get_device_name(0),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("PRISM_COMMIT", "unknown"),
        "torch": torch.__version__,
        "page_size": vmm.page_size,
    }
    driver_floor(vmm, 64)  # warm-up: first calls pay one-off driver costs
    results["driver_floor"] = driver_floor(vmm, args.pages)
    results["page_move"] = page_moves(vmm, args.pages)
    results["block_alloc"] = block_alloc(vmm)
    results["grow_shrink"] = grow_shrink(vmm)
    results["bandwidth"] = bandwidth(vmm)
    results["alloc_under_reclaim_with_reserve"] = alloc_latency_under_reclaim(vmm, reserve=4)
    results["alloc_under_reclaim_no_reserve"] = alloc_latency_under_reclaim(vmm, reserve=0)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    d, m, g = results["driver_floor"], results["page_move"], results["grow_shrink"]
    b, r = results["bandwidth"], results["alloc_under_reclaim_with_reserve"]
    r0 = results["alloc_under_reclaim_no_reserve"]
    ba = results["block_alloc"]
    rows = [
        (
            "driver create / map / set-access / unmap / release, us per page",
            f"{d['create_us']:.1f} / {d['map_us']:.1f} / {d['set_access_us']:.1f} / "
            f"{d['unmap_us']:.1f} / {d['release_us']:.1f}",
            "",
        ),
        (
            "driver map+set-access / unmap batched, us per page",
            f"{d['map_set_access_batched_us']:.1f} / {d['unmap_batched_us']:.1f}",
            "",
        ),
        (
            "page move pooled vs unpooled, us",
            f"{m['pooled_move_us']:.1f} vs "
            f"{m['unpooled_move_us']:.1f} = {m['pooled_over_unpooled']:.2f}x",
            "<= 0.70x",
        ),
        (
            "block alloc+free, us per block (batch 1 / 16)",
            f"{ba['alloc_free_batch1_us_per_block']:.2f} / "
            f"{ba['alloc_free_batch16_us_per_block']:.2f}",
            "<= 2",
        ),
        (
            "grow 1 GiB (pooled / cold), ms",
            f"{g['grow_1gib_ms']:.1f} / {g['grow_1gib_cold_ms']:.1f}",
            "<= 20",
        ),
        ("shrink 1 GiB, ms", f"{g['shrink_1gib_ms']:.1f}", "<= 15"),
        (
            "elastic vs plain r/w bandwidth",
            f"{b['elastic_tb_s']:.2f} vs "
            f"{b['plain_tb_s']:.2f} TB/s = {b['elastic_over_plain']:.3f}",
            ">= 0.97",
        ),
        (
            "alloc p50/p99 under reclaim, warm reserve, us",
            f"{r['p50_us']:.1f} / {r['p99_us']:.1f}",
            "p99 <= 20",
        ),
        (
            "alloc p50/p99 under reclaim, no reserve, us",
            f"{r0['p50_us']:.1f} / {r0['p99_us']:.1f}",
            "(contrast)",
        ),
    ]
    print(f"\n{'measure':<62}{'result':<34}target")
    for name, value, target in rows:
        print(f"{name:<62}{value:<34}{target}")


if __name__ == "__main__":
    main()
