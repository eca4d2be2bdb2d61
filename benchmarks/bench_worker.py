"""Device-worker benchmark on one GPU.

- wake: Llama-3.2-1B, 3B and Llama-3.1-8B shapes (random weights, bf16) woken and put to
  sleep several times on one worker; a wake maps its weight pages and KV padding group
  and copies the weights from pinned host memory. The floor is weight bytes / pinned
  host→device bandwidth, measured in the same run with one large copy. The mapping alone
  (no copy) is timed too, to show what the overlap hides.
- shift: two models on one GPU whose load moves from one to the other half-way (open-loop
  Poisson arrivals), under `prism` (one elastic pool) and `static` (a fixed half of the
  KV memory each): TTFT mean/p99, TPOT, throughput.
- steady: constant closed-loop load that fits either way; `prism` vs `static` wall time
  for the same work = the steady-state cost of elastic memory.
- overlap: three Llama-3.2-1B-shaped models decoding at a small batch, each alone and then
  all three on one worker (each model's step on its own CUDA stream, queued before any is
  waited for): output tokens/s together over the mean alone. 1.0 = no overlap (the steps
  ran one after another); 3.0 = three models for the price of one.

Usage: python benchmarks/bench_worker.py [--parts wake,shift,steady,overlap] [--out f.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from prism.engine import EngineConfig, SamplingParams
from prism.models.presets import PRESETS
from prism.serving.model_slot import ModelSpec
from prism.serving.worker import DeviceWorker, WorkerConfig, WorkerMode, WorkerStats

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


def wake(bw: float, repeats: int) -> list[dict[str, Any]]:
    worker = DeviceWorker(WorkerConfig(device="cuda", budget_bytes=40 * GiB))
    engine = EngineConfig(max_model_len=2048, max_num_seqs=8, cuda_graph_sizes=(1, 8))
    rows = []
    for name in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"):
        slot = worker.add_model(ModelSpec(name, PRESETS[name], load_format="dummy", engine=engine))
        assert worker.wake(name)  # the first wake builds the engine and captures graphs
        wakes, maps = [], []
        for _ in range(repeats):
            worker.sleep(name)
            torch.cuda.synchronize()
            t = time.perf_counter()
            assert worker.wake(name)
            torch.cuda.synchronize()
            wakes.append(time.perf_counter() - t)
        for _ in range(repeats):  # the mapping alone: what the copy overlaps with
            worker.sleep(name)
            assert slot.arena is not None
            t = time.perf_counter()
            assert slot.arena.materialize(None)
            maps.append(time.perf_counter() - t)
            slot.arena.evict()
            assert worker.wake(name)
        worker.sleep(name)
        floor = slot.weight_bytes / bw
        median = statistics.median(wakes)
        rows.append({"model": name, "weight_gib": slot.weight_bytes / GiB, "wake_s": median,
                     "wake_all_s": wakes, "map_only_s": statistics.median(maps),
                     "floor_s": floor, "over_floor": median / floor})  # fmt: skip
    worker.check_integrity()
    worker.close()
    return rows


# ---- load on two models ------------------------------------------------------------------


@dataclass
class Record:
    """What happened to one replayed request (times in seconds from the run's start)."""

    model: str
    arrival: float
    first_token: float | None = None
    finished: float | None = None
    output_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.finished is None or self.first_token is None or self.output_tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.output_tokens - 1)


def replay(
    worker: DeviceWorker,
    arrivals: list[tuple[float, str, list[int], SamplingParams]],
    cutoff_s: float | None = None,
    sample_s: float | None = None,
) -> tuple[dict[str, Any], list[Record]]:
    """Submit each request at its arrival time (seconds from now) while stepping the
    worker; TTFT counts from the scheduled arrival, so queueing behind a slow step counts.
    At `cutoff_s` whatever has not finished is aborted (and stays unfinished in the
    records). With `sample_s` the summary holds a timeline: `worker.stats()` between
    steps, at most one sample per `sample_s`. Returns a summary and one record per
    request."""
    start = time.perf_counter()
    records: dict[str, Record] = {}
    timeline: list[tuple[float, WorkerStats]] = []
    i = 0
    while i < len(arrivals) or worker.has_work():
        now = time.perf_counter() - start
        if sample_s is not None and (not timeline or now - timeline[-1][0] >= sample_s):
            timeline.append((now, worker.stats()))
        if cutoff_s is not None and now > cutoff_s:
            for rid, rec in records.items():
                if rec.finished is None:
                    worker.abort(rid)
            break
        while i < len(arrivals) and arrivals[i][0] <= now:
            at, model, prompt, params = arrivals[i]
            records[worker.submit(model, prompt, params)] = Record(model, at)
            i += 1
        if not worker.has_work():
            time.sleep(max(0.0, min(arrivals[i][0] - now, 0.01)))
            continue
        outs = worker.step()
        now = time.perf_counter() - start
        for _, out in outs:
            rec = records[out.request_id]
            if out.new_token_ids and rec.first_token is None:
                rec.first_token = now
            if out.finished:
                rec.finished, rec.output_tokens = now, out.num_output_tokens
    makespan = time.perf_counter() - start
    done = [r for r in records.values() if r.finished is not None]
    if cutoff_s is None:
        assert len(done) == len(records) == len(arrivals), "a request was lost"
    ttft = sorted(t for r in done if (t := r.ttft) is not None)
    tpot = [t for r in done if (t := r.tpot) is not None]
    tokens = sum(r.output_tokens for r in done)
    summary = {"requests": len(arrivals), "finished": len(done), "output_tokens": tokens,
               "makespan_s": makespan, "throughput_tok_s": tokens / makespan,
               "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
               "ttft_p50_s": ttft[len(ttft) // 2] if ttft else None,
               "ttft_p99_s": ttft[int(0.99 * (len(ttft) - 1))] if ttft else None,
               "tpot_mean_s": statistics.fmean(tpot) if tpot else None}  # fmt: skip
    if sample_s is not None:
        summary["timeline"] = timeline
    return summary, list(records.values())


def two_model_worker(
    mode: WorkerMode, preset: str, kv_bytes: int, engine: EngineConfig
) -> DeviceWorker:
    """Two models with the same shape; the budget holds both models' weights plus
    `kv_bytes` of KV, which `static` splits in two fixed halves."""
    weights = PRESETS[preset].weight_bytes(torch.bfloat16)
    pages = -(-weights // (2 << 20)) + 8  # rounding to pages + KV padding groups
    budget = 2 * pages * (2 << 20) + kv_bytes
    worker = DeviceWorker(WorkerConfig(device="cuda", budget_bytes=budget, mode=mode))
    share = kv_bytes // 2 if mode is WorkerMode.STATIC else None
    for name in ("A", "B"):
        worker.add_model(
            ModelSpec(name, PRESETS[preset], load_format="dummy", engine=engine, max_kv_bytes=share)
        )
        worker.wake(name)
    return worker


def shift_arrivals(
    rate: float, seconds: float, prompt: int, output: int, seed: int
) -> list[tuple[float, str, list[int], SamplingParams]]:
    """Poisson arrivals: 90% of the load on A for the first half, then 90% on B."""
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        hot = "A" if t < seconds / 2 else "B"
        model = hot if rng.random() < 0.9 else ("B" if hot == "A" else "A")
        n = max(16, int(rng.gauss(prompt, prompt / 4)))
        out.append((t, model, [rng.randrange(1, 30000) for _ in range(n)], params))


def shift(args: argparse.Namespace, rows: list[dict[str, Any]], save: Any) -> None:
    engine = EngineConfig(max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=8192)
    for rate in args.rates:
        arrivals = shift_arrivals(rate, args.seconds, args.prompt, args.output, seed=1)
        for mode in (WorkerMode.STATIC, WorkerMode.PRISM):
            worker = two_model_worker(mode, args.preset, int(args.kv_gib * GiB), engine)
            replay(worker, shift_arrivals(4.0, 3.0, args.prompt, 16, seed=2))  # warm-up
            result, _ = replay(worker, arrivals)
            worker.check_integrity()
            worker.close()
            torch.cuda.empty_cache()
            rows.append({"mode": mode.value, "preset": args.preset, "kv_gib": args.kv_gib,
                         "rate": rate, "seconds": args.seconds, **result})  # fmt: skip
            save()


def steady(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The same closed-loop work (`concurrency` requests in flight per model) under both
    modes, KV enough for either: any difference is the cost of elastic memory."""
    engine = EngineConfig(max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=8192)
    rng = random.Random(3)
    params = SamplingParams(max_tokens=args.output, temperature=0.0, ignore_eos=True)
    prompts = [[rng.randrange(1, 30000) for _ in range(args.prompt)] for _ in range(args.steady_n)]
    rows = []
    for repeat in range(2):
        for mode in (WorkerMode.STATIC, WorkerMode.PRISM):
            worker = two_model_worker(mode, args.preset, int(args.kv_gib * GiB), engine)
            todo = list(enumerate(prompts))
            live: dict[str, str] = {}  # request id -> model
            torch.cuda.synchronize()
            start = time.perf_counter()
            while todo or live:
                for model in ("A", "B"):
                    while (
                        todo
                        and sum(1 for m in live.values() if m == hash(model)) < args.concurrency
                    ):
                        _, prompt = todo.pop()
                        live[worker.submit(model, prompt, params)] = hash(model)
                for _, out in worker.step():
                    if out.finished:
                        live.pop(out.request_id)
            wall = time.perf_counter() - start
            worker.check_integrity()
            worker.close()
            torch.cuda.empty_cache()
            rows.append({"mode": mode.value, "repeat": repeat, "wall_s": wall,
                         "tokens": args.steady_n * args.output})  # fmt: skip
    return rows


def overlap(args: argparse.Namespace) -> list[dict[str, Any]]:
    engine = EngineConfig(
        max_model_len=2048, max_num_seqs=64, cuda_graph_sizes=(1, 2, 4, 8, 16, 32, 64)
    )
    rng = random.Random(4)
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    names = ("m0", "m1", "m2")

    def run(models: tuple[str, ...], batch: int) -> float:
        """Output tokens/s of `batch` requests on each of `models`, all submitted at once."""
        worker = DeviceWorker(WorkerConfig(device="cuda", budget_bytes=24 * GiB))
        for name in models:
            spec = ModelSpec(name, PRESETS["llama-3.2-1b"], load_format="dummy", engine=engine)
            worker.add_model(spec)
            worker.wake(name)
        for _ in range(2):  # the first round warms up kernels and allocator
            for name in models:
                for _ in range(batch):
                    worker.submit(name, [rng.randrange(1, 30000) for _ in range(256)], params)
            torch.cuda.synchronize()
            start = time.perf_counter()
            worker.run_until_idle()
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        worker.check_integrity()
        worker.close()
        torch.cuda.empty_cache()
        return len(models) * batch * params.max_tokens / wall

    rows = []
    for batch in (1, 8, 32):
        alone = statistics.fmean(run((name,), batch) for name in names)
        together = run(names, batch)
        rows.append({"batch_per_model": batch, "alone_tok_s": alone, "together_tok_s": together,
                     "speedup": together / alone})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench_worker.json")
    parser.add_argument("--parts", default="wake,shift,steady,overlap")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="llama-3.2-3b")
    parser.add_argument("--kv-gib", type=float, default=12.0, help="KV memory of both models")
    parser.add_argument(
        "--rates",
        type=lambda t: [float(x) for x in t.split(",")],
        default=[8.0, 11.0, 14.0],
        help="requests/s of both models together, comma list",
    )
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--output", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--steady-n", type=int, default=192)
    args = parser.parse_args()
    parts = args.parts.split(",")
    results: dict[str, Any] = {
        "benchmark": "bench_worker",
        "device": torch.cuda.get_device_name(0),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("PRISM_COMMIT", "unknown"),
    }
    bw = results["h2d_bytes_per_s"] = h2d_bandwidth()

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    print(f"\npinned host->device {bw / 1e9:.1f} GB/s")
    if "wake" in parts:
        results["wake"] = wake(bw, args.repeats)
        save()
        for r in results["wake"]:
            print(f"wake {r['model']:<14} {r['weight_gib']:5.2f} GiB: {r['wake_s'] * 1e3:7.1f} ms "
                  f"(map only {r['map_only_s'] * 1e3:6.1f}) vs floor {r['floor_s'] * 1e3:7.1f} ms "
                  f"= {r['over_floor']:.2f}x")  # fmt: skip
    if "shift" in parts:
        results["shift"] = []
        shift(args, results["shift"], save)
        for r in results["shift"]:
            print(f"shift {r['rate']:4.1f}/s {r['mode']:<7} ttft mean {r['ttft_mean_s']:6.3f}s "
                  f"p99 {r['ttft_p99_s']:6.3f}s tpot {r['tpot_mean_s'] * 1e3:5.1f}ms "
                  f"{r['throughput_tok_s']:7.0f} tok/s")  # fmt: skip
    if "overlap" in parts:
        results["overlap"] = overlap(args)
        save()
        for r in results["overlap"]:
            print(f"overlap batch {r['batch_per_model']:3d}/model: alone "
                  f"{r['alone_tok_s']:7.0f} tok/s, three together "
                  f"{r['together_tok_s']:7.0f} = {r['speedup']:.2f}x")  # fmt: skip
    if "steady" in parts:
        rows = results["steady"] = steady(args)
        wall = {m: min(r["wall_s"] for r in rows if r["mode"] == m) for m in ("static", "prism")}
        results["steady_overhead"] = wall["prism"] / wall["static"] - 1
        save()
        print(f"steady: static {wall['static']:.2f}s prism {wall['prism']:.2f}s "
              f"overhead {results['steady_overhead'] * 100:+.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
