"""Cluster experiments on the simulator: the shape of the Prism paper's results on our
workloads, and where prism+ differs from prism.

Parts (each writes `benchmarks/results/sim_<part>.json` and its PNGs):

- `fleet58`: 58 models (75% at 1–3B, the rest 8–14B) under bursty groups (gamma
  arrivals, CV 2; Zipf popularity; a hot group of 4 models taking half the load,
  rotating every 300 s). For each policy, the fewest GPUs whose TTFT attainment reaches
  99% (SLO = scale × each model's p95 TTFT alone on a GPU), by binary search up to
  `--max-gpus`. The paper reports 16 GPUs for prism vs 32 for MuxServe (our `spatial`).
- `rate8`: 8 models on 2 GPUs: attainment against load (rate scale) and against the SLO
  scale, every policy.
- `busy4`: four always-busy models (`always_busy_four`) where KV pressure alone puts two
  prefill-heavy models together: fewest GPUs per policy (whole run, and after a warm-up
  in which the placement has seen the rates), and attainment against load on 2 GPUs.

SLOs come from one `static` run with a GPU per model (solo), at the base rate; they stay
fixed across rate scales. Everything is computed here from simulator runs; nothing is
typed in. `--policies` and `--merge` let a long part run in pieces.

Usage: python benchmarks/sim_experiments.py --parts fleet58,rate8,busy4
           [--duration 3600] [--policies static,spatial,swap,prism,prism+] [--merge]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_sim import cpu_name, git_commit

from prism.sim import plots
from prism.sim.cost_model import CostModel
from prism.sim.experiments import (
    Scenario,
    SLOs,
    always_busy_four,
    fewest_gpus,
    make_models,
    model_mix,
    run_at,
    solo_slos,
)
from prism.sim.gpu import GPUConfig
from prism.sim.metrics import MemoryTrace, SimResult
from prism.sim.policies import POLICIES
from prism.sim.workloads import bursty_groups

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def header(args: argparse.Namespace, part: str, cost: CostModel) -> dict[str, Any]:
    return {
        "experiment": f"sim_experiments:{part}",
        "device": f"CPU: {cpu_name()} (simulated H200s)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "cost_model": cost.calibration.source,
        "seed": args.seed,
    }


def load(path: Path, merge: bool) -> dict[str, Any]:
    return json.loads(path.read_text()) if merge and path.is_file() else {}


def save(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=1, default=_plain))
    print(f"wrote {path}", flush=True)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value)} is not JSON")


def slo_block(slos: SLOs, solo: SimResult, scale: float) -> dict[str, Any]:
    ttft, tpot = slos.scaled(scale)
    return {
        "scale": scale,
        "solo_p95_ttft_s": slos.ttft_s.tolist(),
        "solo_p95_tpot_s": slos.tpot_s.tolist(),
        "ttft_slo_s_median": float(np.median(ttft)),
        "tpot_slo_s_median": float(np.median(tpot)),
        "solo_wall_s": solo.wall_s,
    }


def row(result: SimResult, att: dict[str, float], **extra: Any) -> dict[str, Any]:
    s = result.summary()
    keep = ("requests", "finished", "wakes", "sleeps", "migrations", "preemptions",
            "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "gpu_busy", "busy_throughput_tokens_s",
            "wall_s")  # fmt: skip
    return {**extra, "attainment": att, **{k: s[k] for k in keep}}


# ---- fleet58 ------------------------------------------------------------------------------


def fleet58(args: argparse.Namespace, cost: CostModel, gpu: GPUConfig) -> None:
    path = RESULTS / "sim_fleet58.json"
    report = load(path, args.merge) or {"policies": {}}
    report.update(header(args, "fleet58", cost))
    workload = bursty_groups(58, args.duration, args.rate, cv=2.0, alpha=1.0, seed=args.seed)
    models = tuple(make_models(model_mix(58, 0.75, args.seed)))
    scenario = Scenario(workload, models, gpu, cost)
    report["workload"] = {
        "name": "bursty_groups", "models": 58, "small_fraction": 0.75,
        "duration_s": args.duration, "total_rate": args.rate, "cv": 2.0, "alpha": 1.0,
        "group_size": 4, "hot_groups": 1, "hot_share": 0.5, "period_s": 300.0,
        "lengths": "log-normal, mean prompt 1024 / output 256, CV 1",
        "requests": len(workload.requests), "shapes": [m.shape.name for m in models],
    }  # fmt: skip
    slos, solo = solo_slos(scenario)
    report["slo"] = slo_block(slos, solo, args.slo_scale)
    memory: dict[str, tuple[int, MemoryTrace]] = {}
    for policy in args.policies:
        start = time.perf_counter()
        kept: dict[int, SimResult] = {}

        def keep(gpus: int, result: SimResult, att: dict[str, float], kept: Any = kept) -> None:
            kept[gpus] = result

        found, tried = fewest_gpus(
            scenario, policy, slos, args.slo_scale, max_gpus=args.max_gpus, on_run=keep
        )
        runs = [row(kept[g], tried[g], gpus=g) for g in sorted(tried)]
        report["policies"][policy] = {"fewest_gpus": found, "runs": runs,
                                      "search_wall_s": time.perf_counter() - start}  # fmt: skip
        if found is not None and kept[found].memory is not None:
            trace = kept[found].memory
            assert trace is not None
            memory[policy] = (found, trace)
        points = ", ".join(f"{g}:{tried[g]['ttft']:.4f}" for g in sorted(tried))
        print(f"fleet58 {policy}: fewest GPUs for 99% TTFT = {found}; tried {points}", flush=True)
        save(path, report)
    table = {p: v["fewest_gpus"] for p, v in report["policies"].items()}
    report["table"] = table
    save(path, report)
    title = f"GPUs for 99% TTFT attainment, 58 models, SLO x{args.slo_scale:g}"
    plots.gpus_needed(RESULTS / "sim_fleet58_gpus.png", table, title=title, ceiling=args.max_gpus)
    series = {
        p: ([r["gpus"] for r in v["runs"]], [r["attainment"]["ttft"] for r in v["runs"]])
        for p, v in report["policies"].items()
    }
    plots.attainment_points(
        RESULTS / "sim_fleet58_vs_gpus.png", series, xlabel="GPUs",
        title=f"TTFT attainment, 58 models, {args.rate:g} req/s", ylim=(0.8, 1.005),
    )  # fmt: skip
    names = [m.name for m in models]
    for policy, (gpus, trace) in memory.items():
        plots.memory_over_time(
            RESULTS / f"sim_fleet58_memory_{policy.replace('+', 'plus')}.png", trace, names,
            title=f"memory per model: {policy}, {gpus} GPUs",
        )  # fmt: skip


# ---- rate8 --------------------------------------------------------------------------------


def rate8(args: argparse.Namespace, cost: CostModel, gpu: GPUConfig) -> None:
    path = RESULTS / "sim_rate8.json"
    report = header(args, "rate8", cost)
    duration = min(args.duration, 1800.0)
    models = tuple(make_models(model_mix(8, 0.75, args.seed)))
    base = 4.0
    rate_scales = [0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0]
    slo_scales = [1.5, 2.0, 3.0, 5.0, 8.0, 12.0]
    slo_rate = 8.0

    def workload(scale: float) -> Any:
        return bursty_groups(8, duration, base, cv=2.0, group_size=2, rate_scale=scale,
                             seed=args.seed)  # fmt: skip

    slos, solo = solo_slos(Scenario(workload(1.0), models, gpu, cost))
    report["workload"] = {
        "name": "bursty_groups", "models": 8, "gpus": 2, "duration_s": duration,
        "base_rate": base, "cv": 2.0, "group_size": 2, "hot_share": 0.5, "period_s": 300.0,
        "shapes": [m.shape.name for m in models],
    }  # fmt: skip
    report["slo"] = slo_block(slos, solo, args.slo_scale)
    report["vs_rate"] = []
    report["vs_slo"] = []
    for scale in rate_scales:
        scenario = Scenario(workload(scale), models, gpu, cost)
        for policy in args.policies:
            result, att = run_at(scenario, policy, 2, slos, args.slo_scale)
            report["vs_rate"].append(row(result, att, policy=policy, rate=base * scale))
        last = report["vs_rate"][-len(args.policies) :]
        points = ", ".join(f"{r['policy']} {r['attainment']['ttft']:.3f}" for r in last)
        print(f"rate8 rate {base * scale:g}: {points}", flush=True)
    scenario = Scenario(workload(slo_rate), models, gpu, cost)
    for policy in args.policies:
        result = scenario.run(policy, 2, slos.models(models, args.slo_scale))
        for s in slo_scales:  # the local scheduler's deadlines use --slo-scale
            att = result.attainment(*slos.scaled(s))
            report["vs_slo"].append(row(result, att, policy=policy, slo_scale=s))
    save(path, report)
    for key, axis, values, label in (
        ("vs_rate", "rate", [base * s for s in rate_scales], "total request rate (req/s)"),
        ("vs_slo", "slo_scale", slo_scales, "SLO scale (x solo p95)"),
    ):
        for metric in ("ttft", "tpot"):
            series = {
                p: [next(r["attainment"][metric] for r in report[key]
                         if r["policy"] == p and r[axis] == v) for v in values]
                for p in args.policies
            }  # fmt: skip
            at = f"SLO x{args.slo_scale:g}" if key == "vs_rate" else f"{base * slo_rate:g} req/s"
            plots.attainment_curves(
                RESULTS / f"sim_rate8_{metric}_{key}.png", values, series, xlabel=label,
                title=f"{metric.upper()} attainment, 8 models on 2 GPUs, {at}",
                ylabel=f"{metric.upper()} SLO attainment",
            )  # fmt: skip


# ---- busy4 --------------------------------------------------------------------------------


def busy4(args: argparse.Namespace, cost: CostModel, gpu: GPUConfig) -> None:
    path = RESULTS / "sim_busy4.json"
    report = header(args, "busy4", cost)
    duration = min(args.duration, 1800.0)
    warmup = 300.0
    workload, model_list = always_busy_four(duration, seed=args.seed)
    models = tuple(model_list)
    scenario = Scenario(workload, models, gpu, cost)
    slos, solo = solo_slos(scenario)
    report["workload"] = {
        "name": "always_busy_four", "duration_s": duration, "warmup_s": warmup,
        "shapes": [m.shape.name for m in models], "rates": workload.rates(),
    }  # fmt: skip
    report["slo"] = slo_block(slos, solo, args.slo_scale)
    report["fewest_gpus"] = {}
    for policy in args.policies:
        entry = {}
        for label, after in (("whole_run", 0.0), ("after_warmup", warmup)):
            found, tried = fewest_gpus(
                scenario, policy, slos, args.slo_scale, max_gpus=4, after_s=after
            )
            entry[label] = {"gpus": found, "tried": tried}
        report["fewest_gpus"][policy] = entry
        print(f"busy4 {policy}: fewest GPUs whole run {entry['whole_run']['gpus']}, "
              f"after warm-up {entry['after_warmup']['gpus']}", flush=True)  # fmt: skip
    report["vs_rate"] = []
    scales = [0.6, 0.8, 0.9, 1.0, 1.1]
    compared = [p for p in ("spatial", "prism", "prism+") if p in args.policies]
    for scale in scales:
        w, _ = always_busy_four(duration, rate_scale=scale, seed=args.seed)
        for policy in compared:
            result, att = run_at(Scenario(w, models, gpu, cost), policy, 2, slos, args.slo_scale)
            warm = result.attainment(*slos.scaled(args.slo_scale), after_s=warmup)
            report["vs_rate"].append(
                row(result, att, policy=policy, rate_scale=scale, after_warmup=warm)
            )
    save(path, report)
    series = {
        f"{p}{suffix}": [
            next(r[key]["ttft"] for r in report["vs_rate"]
                 if r["policy"] == p and r["rate_scale"] == s) for s in scales
        ]
        for p in compared
        for suffix, key in (("", "attainment"), (" (after warm-up)", "after_warmup"))
    }  # fmt: skip
    plots.attainment_curves(
        RESULTS / "sim_busy4_vs_rate.png", scales, series, xlabel="load (x base rates)",
        title="TTFT attainment, four always-busy models on 2 GPUs",
        ylabel="TTFT SLO attainment",
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="fleet58,rate8,busy4")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--duration", type=float, default=3600.0, help="simulated seconds")
    parser.add_argument("--rate", type=float, default=60.0, help="fleet58: total req/s")
    parser.add_argument("--slo-scale", type=float, default=5.0)
    parser.add_argument("--max-gpus", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", action="store_true", help="fleet58: add to the JSON there")
    args = parser.parse_args()
    args.policies = [p for p in args.policies.split(",") if p]
    cost = CostModel.from_results(RESULTS)
    gpu = GPUConfig(cost.gpu.memory_bytes)
    RESULTS.mkdir(parents=True, exist_ok=True)
    parts = {"fleet58": fleet58, "rate8": rate8, "busy4": busy4}
    for part in args.parts.split(","):
        start = time.perf_counter()
        parts[part](args, cost, gpu)
        print(f"{part}: {time.perf_counter() - start:.0f} s wall", flush=True)


if __name__ == "__main__":
    main()
