"""Eight models on one GPU: `prism` against `static` and `swap` at 99% SLO attainment.

Eight random-weight models of mixed shapes (2 × Llama-3.1-8B, 3 × Llama-3.2-3B,
3 × Llama-3.2-1B: 55 GiB of bf16 weights) on one GPU whose device budget is capped at
80 GiB (an H100's memory), all under one `DeviceWorker`:

- `prism`: one elastic pool; idle models sleep, KV caches grow into free memory;
- `static`: a static partition of the GPU: every model resident with a fixed share of
  the KV memory (even) and of the SMs (in proportion to its expected compute: its
  requests' tokens × its parameters over the run, `SmPartitions`), free running;
- `spatial`: every model resident, the KV memory split in eight fixed shares, the SMs
  shared (MuxServe-style space sharing: the `static` of the runs before 29 Nov);
- `swap`: one model resident at a time, swapped in on demand.

Workload: the ServeGen `language/m-large` client rates (600 s windows, gamma arrivals
with each window's CV) folded onto the eight models (busiest client group → model 0),
replayed `--time-scale` times faster so the hot set moves within a run, and scaled to
each target total rate; prompt/output lengths drawn from the Azure LLM 2023 code trace
(capped). SLOs per model: scale × its shape's p95 TTFT and TPOT alone on the GPU at light
load (measured first, in the same run). For each mode the rate rises until attainment at
the loosest SLO scale falls under `--stop-below`; the result per SLO scale is the highest
rate whose TTFT and TPOT attainment both reached 99%. Requests unfinished at the cutoff
count as misses.

Usage: python benchmarks/bench_multimodel.py --traces PATH/traces [--modes prism,static,...]
       python benchmarks/bench_multimodel.py --smoke   (CPU, tiny models: checks the script)
A mode written with `:free` (e.g. `prism:free`) runs its worker free running
(`WorkerConfig.free_running`), so rounds and free running compare in one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_worker import Record, replay

from prism.engine import EngineConfig, SamplingParams
from prism.models.config import ModelConfig
from prism.models.presets import PRESETS
from prism.serving.model_slot import ModelSpec
from prism.serving.policies.slo import SLO
from prism.serving.worker import DeviceWorker, WorkerConfig, WorkerMode
from prism.sim.workloads import (
    Lengths,
    SyntheticLengths,
    Workload,
    azure_lengths,
    mooncake_lengths,
    servegen,
)

GiB = 1 << 30
MODES = {"prism": WorkerMode.PRISM, "static": WorkerMode.STATIC,
         "spatial": WorkerMode.STATIC, "swap": WorkerMode.SWAP}  # fmt: skip
SHAPES = "llama-3.1-8b:2,llama-3.2-3b:3,llama-3.2-1b:3"  # preset:count, busiest load first
TINY = ModelConfig(
    architecture="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=4096,
)  # fmt: skip
Arrival = tuple[float, str, list[int], SamplingParams]


def shape_list(spec: str) -> list[str]:
    """ "llama-3.1-8b:2,llama-3.2-1b" → ["llama-3.1-8b", "llama-3.1-8b", "llama-3.2-1b"]."""
    shapes = []
    for item in spec.split(","):
        name, _, count = item.partition(":")
        if name not in PRESETS:
            raise SystemExit(f"unknown shape {name!r}; known: {', '.join(sorted(PRESETS))}")
        shapes += [name] * int(count or 1)
    return shapes


def model_configs(args: argparse.Namespace) -> dict[str, ModelConfig]:
    return {
        f"m{i}": TINY if args.smoke else PRESETS[shape]
        for i, shape in enumerate(shape_list(args.shapes))
    }


def trace_lengths(args: argparse.Namespace) -> Lengths:
    """--lengths: "azure", "mooncake", or "lognormal:PROMPT:OUTPUT" (means, CV 1)."""
    kind, *means = args.lengths.split(":")
    if kind == "mooncake":
        return mooncake_lengths(args.traces, max_tokens=args.max_tokens)
    if kind == "lognormal" and len(means) == 2:
        prompt, output = (float(m) for m in means)
        return SyntheticLengths(prompt, output, max_tokens=args.max_tokens)
    if kind == "azure" and not means:
        return azure_lengths(args.traces, max_tokens=args.max_tokens)
    raise SystemExit(f"--lengths {args.lengths!r}: azure, mooncake or lognormal:PROMPT:OUTPUT")


def even_kv_share(budget: int, weight_bytes: list[int], page: int) -> int:
    """Each model's KV share when the budget left beside the weights (each rounded up to
    whole pages, and a few pages each for the KV padding group) is split evenly."""
    weights = sum(-(-w // page) * page for w in weight_bytes)
    padding = 8 * len(weight_bytes) * page
    return (budget - weights - padding) // len(weight_bytes)


def build_worker(
    mode: WorkerMode, configs: dict[str, ModelConfig], args: argparse.Namespace,
    free_running: bool = False, slos: dict[str, Any] | None = None,
    sms: dict[str, int] | None = None,
) -> DeviceWorker:  # fmt: skip
    """All eight models on one worker; engines built (and CUDA graphs captured) before
    any measurement: each model is woken once. With `slos` (solo p95s), `prism` orders
    each round by its requests' slack (`WorkerConfig`, `ModelSpec.slo`: SLO = the first
    `--slo-scales` value × the solo p95); the baselines go first come, first served.
    `sms`: each model's SM share (static partition)."""
    engine = EngineConfig(
        max_model_len=args.max_tokens + 64, max_num_seqs=args.max_seqs,
        max_num_batched_tokens=args.step_tokens,
        cuda_graph_sizes=tuple(s for s in (1, 2, 4, 8, 16, 32, 64, 128) if s <= args.max_seqs),
    )  # fmt: skip
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    page = 2 << 20 if args.device != "cpu" else 64 << 10
    share = even_kv_share(args.budget, [c.weight_bytes(dtype) for c in configs.values()], page)
    if share <= 0:
        raise SystemExit(f"budget {args.budget / GiB:.1f} GiB does not hold the weights")
    worker = DeviceWorker(
        WorkerConfig(
            device=args.device, budget_bytes=args.budget, mode=mode, free_running=free_running
        )
    )
    for name, config in configs.items():
        kv = share if mode is WorkerMode.STATIC else None
        slo = None
        if slos is not None and mode is WorkerMode.PRISM and not args.fifo:
            scale = args.slo_scales[0]
            solo = slos[name]
            slo = SLO(scale * solo["ttft_p95_s"], scale * solo["tpot_p95_s"])
        worker.add_model(
            ModelSpec(name, config, load_format="dummy", engine=engine, max_kv_bytes=kv, slo=slo,
                      sms=None if sms is None else sms[name])
        )  # fmt: skip
        if mode is not WorkerMode.STATIC:  # static mode woke it on adding
            assert worker.wake(name), f"{name} does not fit"
            if mode is WorkerMode.SWAP or args.device == "cpu":
                worker.sleep(name)
    return worker


def static_demand(args: argparse.Namespace, params: dict[str, int]) -> dict[str, float]:
    """Each model's expected compute over the run: its requests' prompt and output tokens ×
    its parameters, from the workload at 100 req/s (every rate has the same shares, and
    this many requests estimate them well)."""
    demand = dict.fromkeys(params, 0.0)
    for r in sim_workload(args, 100.0, seed=1).requests:
        name = f"m{r.model}"
        demand[name] += (r.prompt_tokens + r.output_tokens) * params[name]
    return demand


def static_sms(args: argparse.Namespace, configs: dict[str, ModelConfig]) -> dict[str, int]:
    """The static partition's SM shares: in proportion to each model's expected compute
    (`static_demand`), as a provider provisioning from last period's traffic would."""
    from prism.serving.sm_partition import SmPartitions, proportional_sms

    if args.device == "cpu":
        raise SystemExit("mode static partitions the GPU's SMs: it needs CUDA (not --smoke)")
    demand = static_demand(args, {n: c.num_parameters for n, c in configs.items()})
    device = SmPartitions("cuda")
    shares = proportional_sms(demand, device.usable, device.granularity)
    print(f"static partition, SMs ({device.usable} of {device.total} usable):", shares, flush=True)
    return shares


def sim_workload(args: argparse.Namespace, rate: float, seed: int) -> Workload:
    """ServeGen-shaped requests for the models at `rate` requests/s in all."""
    num_models = len(shape_list(args.shapes))
    kw = dict(traces=args.traces, category=args.category, mapping="fold",
              time_scale=args.time_scale, lengths=trace_lengths(args), seed=seed)  # fmt: skip
    base = servegen(num_models, args.seconds, **kw)  # type: ignore[arg-type]
    return servegen(
        num_models,
        args.seconds,
        rate_scale=rate / base.total_rate,
        **kw,  # type: ignore[arg-type]
    )


def workload(args: argparse.Namespace, rate: float, seed: int) -> list[Arrival]:
    """`sim_workload` as timed arrivals with random prompt tokens, for the live worker."""
    rng = random.Random(seed)
    vocab = 500 if args.smoke else 30000
    return [
        (r.arrival, f"m{r.model}", [rng.randrange(1, vocab) for _ in range(r.prompt_tokens)],
         SamplingParams(max_tokens=r.output_tokens, temperature=0.0, ignore_eos=True))
        for r in sorted(sim_workload(args, rate, seed).requests, key=lambda r: r.arrival)
    ]  # fmt: skip


def solo_slos(args: argparse.Namespace, configs: dict[str, ModelConfig]) -> dict[str, Any]:
    """p95 TTFT and TPOT alone on the GPU (prism mode, nothing else busy) at light load,
    one measurement per model shape (models of a shape share it): Poisson arrivals at
    `--solo-rate` for `--solo-seconds`, at least `--solo-requests`. A warm-up round over
    every model first, so one-off costs (kernel compiles) do not set anyone's SLO."""
    worker = build_worker(WorkerMode.PRISM, configs, args, free_running=args.free_running)
    replay(worker, workload(args, args.rates[0], seed=99)[: 4 * len(configs)])
    lengths = trace_lengths(args)
    by_shape: dict[ModelConfig, dict[str, Any]] = {}
    out = {}
    for i, (name, config) in enumerate(configs.items()):
        if config not in by_shape:
            rng = random.Random(100 + i)
            n = max(args.solo_requests, int(args.solo_rate * args.solo_seconds))
            prompts, outputs = lengths.sample(np.random.default_rng(100 + i), n)
            t, arrivals = 0.0, []
            for p, o in zip(prompts, outputs, strict=True):
                t += rng.expovariate(args.solo_rate)
                params = SamplingParams(max_tokens=int(o), temperature=0.0, ignore_eos=True)
                arrivals.append((t, name, [rng.randrange(1, 500) for _ in range(int(p))], params))
            for other in configs:  # alone: the others asleep, this one awake
                if other != name:
                    worker.sleep(other)
            assert worker.wake(name)
            _, records = replay(worker, arrivals)
            ttft = sorted(r.ttft for r in records if r.ttft is not None)
            tpot = sorted(r.tpot for r in records if r.tpot is not None)
            by_shape[config] = {"ttft_p95_s": _p95(ttft), "tpot_p95_s": _p95(tpot),
                                "requests": n, "measured_on": name}  # fmt: skip
        out[name] = by_shape[config]
    worker.check_integrity()
    worker.close()
    return out


def _p95(values: list[float]) -> float:
    return values[min(len(values) - 1, int(0.95 * len(values)))] if values else 0.0


def attainment(records: list[Record], slos: dict[str, Any], scale: float) -> dict[str, float]:
    """Share of requests that met their model's TTFT (and TPOT) SLO; unfinished ones miss."""
    ttft_ok = tpot_ok = 0
    for r in records:
        slo = slos[r.model]
        if r.ttft is not None and r.ttft <= scale * slo["ttft_p95_s"]:
            ttft_ok += 1
        if r.finished is not None and (r.tpot is None or r.tpot <= scale * slo["tpot_p95_s"]):
            tpot_ok += 1
    n = max(1, len(records))
    return {"ttft": ttft_ok / n, "tpot": tpot_ok / n}


def sweep(
    name: str, configs: dict[str, ModelConfig], slos: dict[str, Any],
    args: argparse.Namespace, save: Any,
) -> list[dict[str, Any]]:  # fmt: skip
    """One mode's rising rates; `name` is a mode, `:free` added for free running."""
    base, _, stepping = name.partition(":")
    if stepping not in ("", "free"):
        raise SystemExit(f"mode {name!r}: the only suffix is ':free'")
    if base not in MODES:
        raise SystemExit(f"mode {name!r}: one of {', '.join(MODES)} (':free' added or not)")
    mode = MODES[base]
    free = args.free_running or stepping == "free" or base == "static"
    sms = static_sms(args, configs) if base == "static" else None
    worker = build_worker(mode, configs, args, free_running=free, slos=slos, sms=sms)
    replay(worker, workload(args, args.rates[0], seed=99)[: 4 * len(configs)])  # warm-up
    rows: list[dict[str, Any]] = []
    for rate in args.rates:
        started = time.perf_counter()
        before = worker.stats()
        summary, records = replay(
            worker, workload(args, rate, seed=1), cutoff_s=args.seconds + args.grace
        )
        worker.run_until_idle()  # aborted requests leave nothing behind
        worker.check_integrity()
        stats = worker.stats()
        row = {
            "mode": name, "free_running": free, "rate": rate, **summary,
            "attainment": {str(s): attainment(records, slos, s) for s in args.slo_scales},
            # this run's, not the warm-up's or an earlier rate's
            "wakes": sum(m.wakes for m in stats.models) - sum(m.wakes for m in before.models),
            "sleeps": sum(m.sleeps for m in stats.models) - sum(m.sleeps for m in before.models),
            "preemptions": sum(m.preemptions for m in stats.models)
            - sum(m.preemptions for m in before.models),
            "wall_s": time.perf_counter() - started,
            # the worker's rounds in this run: how many, the host's work and the wait
            "rounds": (rounds := stats.rounds - before.rounds),
            "round_host_ms": 1e3 * (stats.round_host_s - before.round_host_s) / max(1, rounds),
            "round_wait_ms": 1e3 * (stats.round_wait_s - before.round_wait_s) / max(1, rounds),
            # per request, in arrival order: model, arrival, TTFT and TPOT (None: none)
            "requests_detail": {
                "model": [r.model for r in records],
                "arrival": [round(r.arrival, 4) for r in records],
                "ttft": [r.ttft for r in records], "tpot": [r.tpot for r in records],
            },
        }  # fmt: skip
        rows.append(row)
        save()
        main_scale = str(args.slo_scales[0])
        att = row["attainment"][main_scale]
        print(f"{name:<11} {rate:6.2f} req/s: TTFT {att['ttft']:.3f} TPOT {att['tpot']:.3f} "
              f"(SLO x{main_scale}) finished {summary['finished']}/{summary['requests']} "
              f"wakes {row['wakes']}", flush=True)  # fmt: skip
        loosest = row["attainment"][str(max(args.slo_scales))]
        if min(loosest.values()) < args.stop_below:  # every scale's best rate is behind
            break
    worker.close()
    if args.device != "cpu":
        torch.cuda.empty_cache()
    return rows


def best_rates(rows: list[dict[str, Any]], scales: list[float]) -> dict[str, dict[str, float]]:
    """Per mode and SLO scale: the highest rate with TTFT and TPOT attainment ≥ 99%."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        for s in scales:
            att = row["attainment"][str(s)]
            if min(att.values()) >= 0.99:
                best = out.setdefault(row["mode"], {})
                best[str(s)] = max(best.get(str(s), 0.0), row["rate"])
    return out


def build_parser(description: str | None = __doc__) -> argparse.ArgumentParser:
    """The options of this benchmark (`sim_multimodel.py` shares them)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    floats = lambda t: [float(x) for x in t.split(",")]  # noqa: E731
    parser.add_argument("--traces", default=str(Path(__file__).parents[2] / "shared" / "traces"))
    parser.add_argument("--out", default="bench_multimodel.json")
    parser.add_argument(
        "--modes", default="prism,static,spatial,swap", help="e.g. prism,prism:free"
    )
    parser.add_argument("--rates", type=floats, default=[1, 1.5, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32])
    parser.add_argument("--slo-scales", type=floats, default=[5.0, 2.0, 10.0])
    parser.add_argument("--seconds", type=float, default=60.0, help="arrivals per run")
    parser.add_argument("--grace", type=float, default=30.0, help="cutoff after the last arrival")
    parser.add_argument("--time-scale", type=float, default=60.0, help="trace seconds per second")
    parser.add_argument("--category", default="language/m-large")
    parser.add_argument("--shapes", default=SHAPES, help="model presets as name:count, ...")
    parser.add_argument(
        "--lengths", default="azure",
        help="prompt/output lengths: 'azure' (Azure 2023 code trace: mean output 28 tokens), "
        "'mooncake' (Mooncake FAST'25 synthetic: long prompts, mean output 149), or "
        "'lognormal:PROMPT:OUTPUT' (log-normal with those means, CV 1)",
    )  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=2048, help="prompt + output cap")
    parser.add_argument("--max-seqs", type=int, default=128)
    parser.add_argument(
        "--step-tokens", type=int, default=512,
        help="tokens in one engine step (chunked-prefill budget): the worker steps its models "
        "in rounds, so the longest step of a round delays every co-located model",
    )  # fmt: skip
    parser.add_argument("--budget-gib", type=float, default=80.0)
    parser.add_argument("--solo-rate", type=float, default=1.0, help="requests/s, solo SLOs")
    parser.add_argument("--solo-seconds", type=float, default=30.0)
    parser.add_argument("--solo-requests", type=int, default=24, help="at least, per shape")
    parser.add_argument("--stop-below", type=float, default=0.9)
    parser.add_argument(
        "--free-running", action="store_true",
        help="every mode free running: each model steps again as soon as its own step ends "
        "(WorkerConfig), not in rounds; a mode written 'prism:free' is free running alone",
    )  # fmt: skip
    parser.add_argument("--slos", help="JSON file with solo SLOs from an earlier run (skips them)")
    parser.add_argument(
        "--fifo", action="store_true",
        help="prism schedules its models in turn each round, not by their requests' slack",
    )  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, short runs")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    args.budget = int(args.budget_gib * GiB)
    if args.smoke:
        if "static" in args.modes.split(","):  # an SM partition needs CUDA
            args.modes = ",".join(m for m in args.modes.split(",") if m != "static")
            print("--smoke: mode static left out (it partitions a GPU's SMs)", flush=True)
        args.budget, args.seconds, args.grace, args.max_tokens = 64 << 20, 4.0, 20.0, 256
        args.rates, args.solo_seconds, args.solo_rate, args.max_seqs = [2, 4], 4.0, 2.0, 16
        args.solo_requests = 8
        torch.set_num_threads(1)
    configs = model_configs(args)
    results: dict[str, Any] = {
        "benchmark": "bench_multimodel",
        "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("PRISM_COMMIT", "unknown"),
        "models": dict(zip(configs, shape_list(args.shapes), strict=True)),
        "budget_gib": args.budget / GiB,
        "weights_gib": sum(c.weight_bytes(torch.bfloat16) for c in configs.values()) / GiB,
        "args": {k: v for k, v in vars(args).items() if k not in ("budget",)},
    }

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    if args.slos:
        results["solo"] = json.loads(Path(args.slos).read_text())["solo"]
    else:
        results["solo"] = solo_slos(args, configs)
        save()
    rows: list[dict[str, Any]] = results.setdefault("runs", [])
    for mode in args.modes.split(","):
        rows += sweep(mode, configs, results["solo"], args, save)
        results["best_rate"] = best_rates(rows, args.slo_scales)
        save()
    best = results["best_rate"]
    print("\nhighest rate with ≥ 99% TTFT and TPOT attainment (req/s):")
    for s in args.slo_scales:
        cells = {m: best.get(m, {}).get(str(s), 0.0) for m in args.modes.split(",")}
        line = "  ".join(f"{m} {r:5.1f}" for m, r in cells.items())
        ratios = "  ".join(
            f"prism/{m} {cells['prism'] / r:.2f}x" for m, r in cells.items() if m != "prism" and r
        ) if "prism" in cells else ""  # fmt: skip
        print(f"SLO x{s:<4}: {line}   {ratios}")
    solo = statistics.fmean(v["ttft_p95_s"] for v in results["solo"].values())
    print(f"solo p95 TTFT, mean over models: {solo:.3f} s")


if __name__ == "__main__":
    sys.exit(main())
