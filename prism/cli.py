"""`prism` command line.

`prism serve` arrives with the server; until then `prism balloon` shows the memory
layer at work: several models' KV caches growing into and out of one page pool.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from prism.kvcache import ElasticKVCache, KVCacheConfig
from prism.memory import PagePool, make_vmm


def _balloon(args: argparse.Namespace) -> int:
    """Three caches share one pool; load moves from one model to the next."""
    vmm = make_vmm(args.device)
    pool = PagePool(vmm, args.budget_mib << 20)
    caches = [
        ElasticKVCache(
            KVCacheConfig(f"model-{i}", 16, 8, 128, 16, torch.float16, max_tokens=1 << 20),
            pool,
        )
        for i in range(3)
    ]
    mib = vmm.page_size / (1 << 20)
    print(f"pool: {pool.budget_pages} pages of {mib:g} MiB on {vmm.device}")
    print(f"{'phase':<22}" + "".join(f"{c.config.name:>12}" for c in caches) + f"{'free':>10}")
    held: list[list[int]] = [[] for _ in caches]
    for phase, hot in enumerate([0, 1, 2, 0]):
        for i, cache in enumerate(caches):  # the cold models finish their requests
            if i != hot and held[i]:
                cache.free(held[i])
                held[i] = []
                cache.trim()
        start = time.perf_counter()
        while (blocks := caches[hot].allocate(64)) is not None:
            held[hot] += blocks
        ms = (time.perf_counter() - start) * 1e3
        stats = {t.name: t.owned_pages for t in pool.stats().tenants}
        row = "".join(f"{stats[c.config.name] * mib:>9.0f}MiB" for c in caches)
        print(f"{phase}: model-{hot} hot {ms:6.1f}ms {row}{pool.stats().free_pages * mib:>7.0f}MiB")
    for cache in caches:
        cache.check_integrity()
        cache.close()
    pool.check_integrity()
    pool.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prism", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    balloon = sub.add_parser("balloon", help="show KV caches ballooning in one page pool")
    balloon.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    balloon.add_argument("--budget-mib", type=int, default=512)
    balloon.set_defaults(func=_balloon)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
