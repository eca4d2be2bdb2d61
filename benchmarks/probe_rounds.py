"""Where a live worker's rounds go, over time: a window of `validate_sim.py`'s shared
workload replayed on the live worker alone (no solo runs, no calibration, no simulation),
with the worker's timeline sampled every 50 ms, then a table of rounds per interval —
their length, host and wait time, and each model's engine seconds per second.

    python benchmarks/probe_rounds.py --rate 14 --window 55,90 --out probe_rounds.json

validate_sim at 14 req/s found the live rounds about twice the simulated ones while the
8B model is hot (60–90 s; TPOT p50 47–55 ms live against 20–28 ms simulated) with the
same tokens produced; this replays that stretch to see whether the time is host work,
device waits, or one model's steps. Models start asleep, as in validate_sim.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from validate_sim import (
    SETUPS,
    build_worker,
    live_timeline,
    run_live,
    shared_workload,
    trace_lengths,
)

from prism.sim.workloads import Workload


def window(workload: Workload, start: float, end: float) -> Workload:
    """The requests arriving in [start, end), their arrivals shifted to start at 0."""
    requests = [replace(r, arrival=r.arrival - start) for r in workload.requests
                if start <= r.arrival < end]  # fmt: skip
    return Workload(f"{workload.name}, {start:g}-{end:g} s", workload.num_models, end - start,
                    requests)  # fmt: skip


def intervals(timeline: dict[str, Any], step_s: float) -> list[dict[str, Any]]:
    """Rounds, their mean length, host and wait time, and engine seconds per second of
    each model, per `step_s` of the run."""
    t = np.array(timeline["t"])
    rounds = np.array(timeline["rounds"])
    busy = np.array(timeline["busy_s"])
    rows = []
    for a in np.arange(0.0, t[-1], step_s):
        i, j = int(np.searchsorted(t, a)), min(int(np.searchsorted(t, a + step_s)), len(t) - 1)
        n = int(rounds[j, 0] - rounds[i, 0])
        if j <= i or n == 0:
            continue
        dt = t[j] - t[i]
        rows.append({
            "t": float(a), "rounds": n, "round_ms": 1e3 * dt / n,
            "host_ms": 1e3 * (rounds[j, 1] - rounds[i, 1]) / n,
            "wait_ms": 1e3 * (rounds[j, 2] - rounds[i, 2]) / n,
            "busy_per_s": ((busy[j] - busy[i]) / dt).round(3).tolist(),
            "running": timeline["running"][i], "waiting": timeline["waiting"][i],
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--setup", default="cuda", choices=sorted(SETUPS))
    parser.add_argument("--traces", type=Path, default=Path("../shared/traces"))
    parser.add_argument("--rate", type=float, default=14.0)
    parser.add_argument("--window", default="55,90", help="seconds of the workload: START,END")
    parser.add_argument("--grace", type=float, default=15.0)
    parser.add_argument("--step", type=float, default=3.0, help="seconds per table row")
    parser.add_argument("--out", type=Path, default=Path("probe_rounds.json"))
    args = parser.parse_args()
    start, end = (float(x) for x in args.window.split(","))
    setup = replace(SETUPS[args.setup], grace_s=args.grace)
    full = shared_workload(setup, trace_lengths(setup, args.traces), args.rate)
    workload = window(full, start, end)
    worker = build_worker(setup)
    names = list(setup.models)
    latencies, summary = run_live(worker, setup, workload, names, seed=int(args.rate * 1000))
    timeline = live_timeline(summary.pop("timeline"), names)
    rows = intervals(timeline, args.step)
    args.out.write_text(json.dumps({
        "rate": args.rate, "window": [start, end], "models": names, "summary": summary,
        "intervals": rows, "timeline": timeline, "latencies": latencies.to_json(),
    }))  # fmt: skip
    keys = ("requests", "finished", "rounds", "round_host_ms", "round_wait_ms", "preemptions")
    print(json.dumps({k: summary[k] for k in keys}))
    print(f"{'t':>6} {'rounds':>6} {'ms each':>8} {'host':>6} {'wait':>6}  engine s/s per model")
    for r in rows:
        print(f"{r['t'] + start:6.0f} {r['rounds']:6d} {r['round_ms']:8.1f} {r['host_ms']:6.2f} "
              f"{r['wait_ms']:6.2f}  {r['busy_per_s']}  running {r['running']} "
              f"waiting {r['waiting']}")  # fmt: skip


if __name__ == "__main__":
    main()
