"""Simulator speed: simulated seconds per wall-clock second at cluster scale.

The acceptance targets of the simulator (issue 7), on one core of the CI machine:

- 58 models on 32 GPUs, one simulated hour: ≤ 60 s of wall time;
- 1,000 models on 256 GPUs, one simulated hour: ≤ 600 s.

Workload: bursty groups (gamma arrivals, CV 2; Zipf popularity; a rotating hot group)
in blocks of 58 models (`bursty_fleet`), with the same load per GPU in both cases:
`--rate-per-gpu` requests/s (default 1.875: 60 req/s on 32 GPUs, the load of the
58-model experiment in `sim_experiments.py`). Models: 75% at 1–3B, the rest 8–14B.
Each case runs every policy asked for; the times cover `Simulator.run` only (building
the workload is reported apart). The simulator is single-threaded, so its process CPU
time is what one core spent; on a shared machine (load average reported) the wall time
is longer by what others took, and the targets are judged on both.

Usage: python benchmarks/bench_sim.py [--cases 58x32,1000x256] [--policies prism,prism+]
           [--duration 3600] [--out benchmarks/results/sim_bench.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prism.sim.cost_model import CostModel
from prism.sim.experiments import Scenario, make_models, model_mix
from prism.sim.gpu import GPUConfig
from prism.sim.policies import KNOWN
from prism.sim.progress import ProgressBar
from prism.sim.workloads import bursty_fleet

REPO = Path(__file__).resolve().parents[1]
TARGET_WALL_S = {(58, 32): 60.0, (1000, 256): 600.0}  # per simulated hour


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "prism/sim"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}+dirty(prism/sim)" if dirty else head or "unknown"


def run_case(
    models: int, gpus: int, policy: str, args: argparse.Namespace, cost: CostModel
) -> dict[str, Any]:
    rate = args.rate_per_gpu * gpus
    t = time.perf_counter()
    workload = bursty_fleet(models, args.duration, rate, seed=args.seed)
    build_s = time.perf_counter() - t
    scenario = Scenario(
        workload,
        tuple(make_models(model_mix(models, seed=args.seed))),
        GPUConfig(cost.gpu.memory_bytes),
        cost,
    )
    label = f"{models} models / {gpus} GPUs, {policy}"
    bar = ProgressBar(label, args.duration) if not args.no_progress else None
    cpu = time.process_time()
    result = scenario.run(policy, gpus, progress=bar)
    cpu_s = time.process_time() - cpu
    if bar is not None:
        bar.close()
    summary = result.summary()
    hours = args.duration / 3600.0
    target = TARGET_WALL_S.get((models, gpus))
    wall_per_hour = result.wall_s / hours
    cpu_per_hour = cpu_s / hours  # what one core spent: the measure on a shared machine
    row = {
        "models": models,
        "gpus": gpus,
        "policy": policy,
        "total_rate": rate,
        "requests": len(workload.requests),
        "simulated_s": result.end_s,
        "workload_build_s": build_s,
        "wall_s": result.wall_s,
        "sim_to_wall": result.end_s / result.wall_s,
        "requests_per_wall_s": len(workload.requests) / result.wall_s,
        "wall_s_per_simulated_hour": wall_per_hour,
        "cpu_s": cpu_s,
        "sim_to_cpu": result.end_s / cpu_s,
        "cpu_s_per_simulated_hour": cpu_per_hour,
        "load_average_1m_after": os.getloadavg()[0],
        "target_s_per_simulated_hour": target,
        "met_wall": None if target is None else wall_per_hour <= target,
        "met_cpu": None if target is None else cpu_per_hour <= target,
        "summary": summary,
    }
    verdict = ""
    if target is not None:
        verdict = (
            f" (target {target:.0f} s: wall {'met' if row['met_wall'] else 'NOT met'}, "
            f"CPU {'met' if row['met_cpu'] else 'NOT met'})"
        )
    print(
        f"{label}: {len(workload.requests):,} requests, {result.end_s:,.0f} sim-s in "
        f"{result.wall_s:.1f} s wall / {cpu_s:.1f} s CPU = {row['sim_to_wall']:.0f}x real "
        f"time; per simulated hour {wall_per_hour:.1f} s wall, {cpu_per_hour:.1f} s CPU"
        f"{verdict}; load average {row['load_average_1m_after']:.1f}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="58x32,1000x256", help="MODELSxGPUS, comma list")
    parser.add_argument("--policies", default="prism,prism+", help="comma list")
    parser.add_argument("--duration", type=float, default=3600.0, help="simulated seconds")
    parser.add_argument("--rate-per-gpu", type=float, default=60.0 / 32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/sim_bench.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in KNOWN]
    if unknown:
        parser.error(f"unknown policies {unknown}; known: {list(KNOWN)}")
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",") if c]
    cost = CostModel.from_results(REPO / "benchmarks/results")
    report: dict[str, Any] = {
        "benchmark": "bench_sim",
        "device": f"CPU: {cpu_name()} (one core; the simulator is single-threaded)",
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "workload": (
            "bursty_fleet: blocks of 58 models, each bursty_groups (gamma CV 2, Zipf 1.0, "
            "a hot group of 4 taking half the load, rotating every 300 s); lengths "
            "log-normal, prompt 1024 / output 256 mean"
        ),
        "rate_per_gpu": args.rate_per_gpu,
        "duration_s": args.duration,
        "cost_model": cost.calibration.source,
        "runs": [],
    }
    for models, gpus in cases:
        for policy in policies:
            report["runs"].append(run_case(models, gpus, policy, args, cost))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["peak_rss_mib"] = peak
    args.out.write_text(json.dumps(report, indent=1))
    print(f"peak RSS {peak:.0f} MiB; wrote {args.out}")


if __name__ == "__main__":
    main()
