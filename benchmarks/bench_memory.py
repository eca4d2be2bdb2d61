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
import sys
import threading
import time
from typing import Any

import torch

from prism.kvcache import ElasticKVCache, KVCacheConfig
from prism.memory import ElasticTensor, PagePool, ReclaimLevel
from prism.memory.cuda_vmm import CudaVMM

GiB = 1 << 30
SPIN_SWITCH_INTERVAL_S = 1e-4
QUIET_REPEATS = 3


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


def page_moves(vmm: CudaVMM, pages: int, *, pooled: bool) -> float:
    """Move `pages` pages one at a time from tenant A's range to tenant B's, through the
    pool ledger; returns µs per page. Unpooled, A's page is destroyed and B's created."""
    pool = PagePool(vmm, 2 * pages * vmm.page_size, pooled=pooled)
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
    elapsed = time.perf_counter() - t
    pool.release("B", b.close())
    a.close()
    pool.check_integrity()
    pool.close()
    return per_page_us(elapsed, pages)


def group_moves(vmm: CudaVMM, groups: int, *, pooled: bool) -> float:
    """Model B's KV cache grows by `groups` page groups taken from model A's empty ones
    by the pool's reclaim (Llama-3.1-8B shape: 64 pages a group); µs per page."""
    probe = ElasticKVCache(llama8b_kv("probe", 64 * 1024, reserve=0), PagePool(vmm, GiB))
    group_pages = probe.group_pages
    probe.close()
    probe.pool.close()
    pool = PagePool(vmm, (groups + 2) * group_pages * vmm.page_size, pooled=pooled)
    a = ElasticKVCache(llama8b_kv("A", 256 * 1024, reserve=0), pool)
    b = ElasticKVCache(llama8b_kv("B", 256 * 1024, reserve=0), pool)
    held = a.allocate(a.free_blocks + groups * a.blocks_per_group)
    assert held is not None and pool.available("B") == 0
    a.free(held)  # A's load left: its groups are mapped and empty
    t = time.perf_counter()
    for _ in range(groups):
        assert b.allocate(b.blocks_per_group) is not None  # reclaims one group from A
    elapsed = time.perf_counter() - t
    for cache in (a, b):
        cache.check_integrity()
        cache.close()
    pool.check_integrity()
    pool.close()
    return per_page_us(elapsed, groups * group_pages)


def moves(vmm: CudaVMM, pages: int) -> dict[str, float]:
    out = {
        "page_pooled_us": page_moves(vmm, pages, pooled=True),
        "page_unpooled_us": page_moves(vmm, pages, pooled=False),
        "group_pooled_us": group_moves(vmm, 8, pooled=True),
        "group_unpooled_us": group_moves(vmm, 8, pooled=False),
    }
    out["page_pooled_over_unpooled"] = out["page_pooled_us"] / out["page_unpooled_us"]
    out["group_pooled_over_unpooled"] = out["group_pooled_us"] / out["group_unpooled_us"]
    return out


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


def gil_probe(vmm: CudaVMM, seconds: float = 0.3) -> dict[str, float]:
    """Does the main thread keep running while another thread is inside driver calls?
    Ratio of pure-Python loop iterations with and without a thread mapping pages."""

    def spin() -> int:
        count, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            count += 1
        return count

    idle = spin()
    stop = threading.Event()
    t = ElasticTensor(vmm, (vmm.page_size,), torch.uint8)
    handle = vmm.create()

    def churn() -> None:
        while not stop.is_set():
            t.map(0, [handle])
            t.unmap(0)

    thread = threading.Thread(target=churn)
    thread.start()
    busy = spin()
    stop.set()
    thread.join()
    t.close()
    vmm.release(handle)
    return {"main_thread_speed_with_driver_thread": busy / idle}


def _pause(spin: bool) -> None:
    """1 ms between requests: asleep (the CPU idles), or busy in Python, as an engine
    loop is between steps."""
    if not spin:
        time.sleep(0.001)
        return
    end = time.perf_counter() + 0.001
    while time.perf_counter() < end:
        pass


def alloc_latency_quiet(
    vmm: CudaVMM, allocs: int = 1500, *, spin: bool = False, pause: bool = True
) -> dict[str, float]:
    """The same request pacing with pages already mapped and nothing in the background
    (pause=False: back to back, the allocator's own cost with its data in cache)."""
    pool = PagePool(vmm, 12 * GiB)
    hot = ElasticKVCache(llama8b_kv("A", 512 * 1024, reserve=0), pool)
    warm = hot.allocate(allocs * 4)
    assert warm is not None
    hot.free(warm)
    latencies = []
    for _ in range(allocs):
        t = time.perf_counter()
        blocks = hot.allocate(4, reclaim=True)
        latencies.append(time.perf_counter() - t)
        assert blocks is not None
        if pause:
            _pause(spin)
    hot.check_integrity()
    hot.close()
    pool.close()
    return _percentiles(latencies)


def _percentiles(latencies: list[float]) -> dict[str, float]:
    latencies = sorted(latencies)
    return {
        "allocs": len(latencies),
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
        "max_us": latencies[-1] * 1e6,
    }


def alloc_latency_under_reclaim(
    vmm: CudaVMM, reserve: int, seconds: float = 3.0, *, spin: bool = False, loop: bool = False
) -> dict[str, float]:
    """Tenant A takes 4 blocks per request while tenant B's memory is reclaimed.

    Threads (loop=False): the pool's refill thread keeps A's warm reserve up and another
    thread deflates B. Loop (loop=True): the same maintenance runs in the serving loop
    itself, between requests, while the GPU would be computing a step — one thread, so
    no GIL hand-offs on the request path.
    """
    pool = PagePool(vmm, 12 * GiB)
    victim = ElasticKVCache(llama8b_kv("B", 512 * 1024, reserve=0), pool)
    hot = ElasticKVCache(llama8b_kv("A", 512 * 1024, reserve=reserve), pool)
    filler = victim.allocate(victim.free_blocks + victim.growth_blocks())
    assert filler is not None
    victim.free(filler)  # B's load left: its pages are mapped but empty
    group = victim.group_pages
    stop = threading.Event()

    def deflate_victim() -> None:  # B gives back a group at a time, as a policy would
        if victim.mapped_groups > 1:
            pool.reclaim_from("B", group, ReclaimLevel.FREE)

    def reclaimer() -> None:
        while not stop.is_set():
            deflate_victim()
            time.sleep(0.002)

    thread = threading.Thread(target=reclaimer)
    if not loop:
        pool.start_refiller(0.001)
        thread.start()
    latencies = []
    held: list[int] = []
    next_deflate = time.perf_counter()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:  # a few blocks per request, as decodes grow
        t = time.perf_counter()
        blocks = hot.allocate(4, reclaim=True)
        elapsed = time.perf_counter() - t
        if blocks is None:  # everything B had is now A's
            break
        latencies.append(elapsed)
        held += blocks
        if loop:  # maintenance while the step's kernels would run
            if time.perf_counter() >= next_deflate:
                deflate_victim()
                next_deflate = time.perf_counter() + 0.002
            pool.refill_reserves()
        _pause(spin)
    stop.set()
    if not loop:
        thread.join()
        pool.stop_refiller()
    hot.free(held)
    for cache in (hot, victim):
        cache.check_integrity()
        cache.close()
    pool.check_integrity()
    pool.close()
    return _percentiles(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench_memory.json")
    parser.add_argument("--pages", type=int, default=512, help="pages per driver-floor run")
    parser.add_argument(
        "--pin-cpu", type=int, help="run on this one CPU core (less scheduler jitter in the p99s)"
    )
    args = parser.parse_args()
    if args.pin_cpu is not None:
        os.sched_setaffinity(0, {args.pin_cpu})
    torch.cuda.init()
    vmm = CudaVMM(0)
    results: dict[str, Any] = {
        "benchmark": "bench_memory",
        "device": torch.cuda.get_device_name(0),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("PRISM_COMMIT", "unknown"),
        "torch": torch.__version__,
        "page_size": vmm.page_size,
        "pinned_cpu": args.pin_cpu,
    }
    driver_floor(vmm, 64)  # warm-up: first calls pay one-off driver costs
    results["driver_floor"] = driver_floor(vmm, args.pages)
    d = results["driver_floor"]
    pooled_floor = d["unmap_us"] + d["map_us"] + d["set_access_us"]
    results["floor_move_ratio"] = pooled_floor / (pooled_floor + d["release_us"] + d["create_us"])
    results["page_move"] = moves(vmm, args.pages)
    results["block_alloc"] = block_alloc(vmm)
    results["grow_shrink"] = grow_shrink(vmm)
    results["bandwidth"] = bandwidth(vmm)
    results["alloc_under_reclaim_with_reserve"] = alloc_latency_under_reclaim(vmm, reserve=4)
    results["alloc_under_reclaim_no_reserve"] = alloc_latency_under_reclaim(vmm, reserve=0)
    results["alloc_quiet"] = alloc_latency_quiet(vmm)
    # The engine's loop never sleeps: time the same with a busy main thread; a short
    # GIL switch interval lets the refill thread run between its driver calls.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SPIN_SWITCH_INTERVAL_S)
    results["spin_switch_interval_s"] = SPIN_SWITCH_INTERVAL_S
    results["alloc_quiet_spin"] = alloc_latency_quiet(vmm, spin=True)
    # The host's share of the tail: the same calls back to back, and the busy-loop quiet
    # run repeated (identical code, so its spread is the host's)
    results["alloc_back_to_back"] = alloc_latency_quiet(vmm, pause=False)
    results["alloc_quiet_spin_repeats"] = [
        alloc_latency_quiet(vmm, spin=True) for _ in range(QUIET_REPEATS)
    ]
    results["alloc_under_reclaim_spin"] = alloc_latency_under_reclaim(vmm, reserve=4, spin=True)
    results["alloc_under_reclaim_loop"] = alloc_latency_under_reclaim(
        vmm, reserve=4, spin=True, loop=True
    )
    sys.setswitchinterval(switch)
    results["gil"] = gil_probe(vmm)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    d, m, g = results["driver_floor"], results["page_move"], results["grow_shrink"]
    b, r = results["bandwidth"], results["alloc_under_reclaim_with_reserve"]
    r0 = results["alloc_under_reclaim_no_reserve"]
    q = results["alloc_quiet"]
    qs, rs = results["alloc_quiet_spin"], results["alloc_under_reclaim_spin"]
    rl = results["alloc_under_reclaim_loop"]
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
            f"{m['page_pooled_us']:.1f} vs {m['page_unpooled_us']:.1f}"
            f" = {m['page_pooled_over_unpooled']:.2f}x",
            "<= 0.70x",
        ),
        (
            "group move (reclaim) pooled vs unpooled, us/page",
            f"{m['group_pooled_us']:.1f} vs {m['group_unpooled_us']:.1f}"
            f" = {m['group_pooled_over_unpooled']:.2f}x",
            "<= 0.70x",
        ),
        (
            "driver floor ratio (unmap+map+set) / (+release+create)",
            f"{results['floor_move_ratio']:.2f}x",
            "",
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
        (
            "alloc p50/p99, quiet (pages mapped, no background), us",
            f"{q['p50_us']:.1f} / {q['p99_us']:.1f}",
            "(baseline)",
        ),
        (
            "alloc p50/p99, busy loop: under reclaim / quiet, us",
            f"{rs['p50_us']:.1f} / {rs['p99_us']:.1f} vs {qs['p50_us']:.1f} / {qs['p99_us']:.1f}",
            "p99 <= 20",
        ),
        (
            "alloc p50/p99, quiet busy loop repeated, us",
            ", ".join(
                f"{x['p50_us']:.1f} / {x['p99_us']:.1f}"
                for x in results["alloc_quiet_spin_repeats"]
            ),
            "(host spread)",
        ),
        (
            "alloc p50/p99, back to back (no pause), us",
            f"{results['alloc_back_to_back']['p50_us']:.1f} / "
            f"{results['alloc_back_to_back']['p99_us']:.1f}",
            "(allocator alone)",
        ),
        (
            "alloc p50/p99 under reclaim, maintenance in the loop, us",
            f"{rl['p50_us']:.1f} / {rl['p99_us']:.1f}",
            "p99 <= 20",
        ),
        (
            "main-thread speed while a thread maps pages",
            f"{results['gil']['main_thread_speed_with_driver_thread']:.2f}",
            "(1.0 = GIL free)",
        ),
    ]
    print(f"\n{'measure':<62}{'result':<34}target")
    for name, value, target in rows:
        print(f"{name:<62}{value:<34}{target}")


if __name__ == "__main__":
    main()
