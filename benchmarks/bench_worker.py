"""Device-worker benchmark: wake latency from pinned host memory against the floor.

For Llama-3.2-1B, 3B and Llama-3.1-8B shapes (random weights, bf16): each model is
woken and put to sleep several times on one worker; a wake maps its weight pages and
KV padding group and copies the weights from pinned host memory. The floor is weight
bytes / pinned host→device bandwidth, measured in the same run with one large copy.

Usage: python benchmarks/bench_worker.py [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from typing import Any

import torch

from prism.engine import EngineConfig
from prism.models.presets import PRESETS
from prism.serving.model_slot import ModelSpec
from prism.serving.worker import DeviceWorker, WorkerConfig

GiB = 1 << 30


def h2d_bandwidth() -> float:
    """Bytes per second of one 4 GiB pinned host → device copy (median of 5)."""
    host = torch.empty(4 * GiB, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(4 * GiB, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return host.numel() / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench_worker.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "benchmark": "bench_worker",
        "device": torch.cuda.get_device_name(0),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("PRISM_COMMIT", "unknown"),
    }
    bw = results["h2d_bytes_per_s"] = h2d_bandwidth()
    worker = DeviceWorker(WorkerConfig(device="cuda", budget_bytes=40 * GiB))
    engine = EngineConfig(max_model_len=2048, max_num_seqs=8, cuda_graph_sizes=(1, 8))
    rows = []
    for name in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"):
        slot = worker.add_model(ModelSpec(name, PRESETS[name], load_format="dummy", engine=engine))
        assert worker.wake(name)  # first wake builds the engine and captures graphs
        wakes = []
        for _ in range(args.repeats):
            worker.sleep(name)
            torch.cuda.synchronize()
            t = time.perf_counter()
            assert worker.wake(name)
            torch.cuda.synchronize()
            wakes.append(time.perf_counter() - t)
        worker.sleep(name)
        floor = slot.weight_bytes / bw
        wake = statistics.median(wakes)
        rows.append({"model": name, "weight_gib": slot.weight_bytes / GiB, "wake_s": wake,
                     "floor_s": floor, "over_floor": wake / floor})  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(results | {"wake": rows}, f, indent=2)
    worker.check_integrity()
    worker.close()
    print(f"\npinned host->device {bw / 1e9:.1f} GB/s")
    for r in rows:
        print(f"wake {r['model']:<14} {r['weight_gib']:5.2f} GiB: {r['wake_s'] * 1e3:7.1f} ms "
              f"vs floor {r['floor_s'] * 1e3:7.1f} ms = {r['over_floor']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
