"""`bench_multimodel.py`'s sweep in the simulator: the same models, budget, engine limits,
requests and SLOs, on one simulated H200, in seconds on a CPU.

Two uses. Beside a live run it is a validation point for the simulator on the eight-model
workload (give the live JSON with `--live`; its solo SLOs are used and each mode's
attainment is printed next to the live one). Before a live run it shows which settings
(`--shapes`, `--lengths`, `--budget-gib`, …) make the modes differ, so the GPU's time
goes where the answer is not known.

Modes and the simulator policies that stand for them:

- `prism` → `prism-worker-slo`: one `DeviceWorker` on its own, every model resident at
  the start: elastic memory with its pressure hooks, admission by Moore–Hodgson on the
  SLOs (the live worker orders its rounds by it), a model sleeps only when memory is
  wanted; with `--fifo`, `prism-worker-resident` (first come, first served);
- `spatial` → `spatial-even`: every model resident, the KV memory split evenly;
- `swap` → `swap`: one model resident at a time, swapped whole on demand.

bench_multimodel's `static` (a fixed share of the SMs per model) has no policy here:
the simulator's GPUs are not divided by compute.

Solo SLOs: from `--slos` or `--live` (a bench_multimodel JSON), else simulated: each shape
alone at `--solo-rate`.

Usage: python benchmarks/sim_multimodel.py --traces PATH/traces --live \\
           benchmarks/results/bench_multimodel_h200.json --out f.json
       python benchmarks/sim_multimodel.py --shapes llama-3.1-8b:3,llama-3.2-3b:3 \\
           --lengths mooncake --max-tokens 8192
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from bench_multimodel import best_rates, build_parser, shape_list, sim_workload, trace_lengths
from validate_sim import commit

from prism.models.presets import PRESETS
from prism.sim.cost_model import CostModel, ModelShape
from prism.sim.gpu import GPUConfig
from prism.sim.metrics import SimResult
from prism.sim.policies import make_policy
from prism.sim.request import SimModel
from prism.sim.simulator import SimConfig, Simulator
from prism.sim.workloads import RequestSpec, Workload

POLICY = {"prism": "prism-worker-slo", "spatial": "spatial-even", "swap": "swap"}
GiB = 1 << 30


def simulate(
    args: Any, workload: Workload, shapes: list[ModelShape], slos: list[tuple[float, float]]
) -> SimResult:
    models = [
        SimModel(i, f"m{i}", shape, ttft, tpot)
        for i, (shape, (ttft, tpot)) in enumerate(zip(shapes, slos, strict=True))
    ]
    gpu = GPUConfig(
        memory_bytes=args.budget, headroom_bytes=0, page_size=2 << 20, block_size=16,
        model_overhead_bytes=0, max_num_seqs=args.max_seqs, max_batched_tokens=args.step_tokens,
    )  # fmt: skip
    config = SimConfig(1, gpu, drain_s=args.grace)
    return Simulator(workload, models, make_policy(args.policy), config, CostModel()).run()


def solo_slos(args: Any, shapes: list[ModelShape]) -> dict[str, Any]:
    """p95 TTFT and TPOT of each shape alone, simulated at `--solo-rate`."""
    out: dict[str, Any] = {}
    by_shape: dict[str, tuple[float, float]] = {}
    lengths = trace_lengths(args)
    for i, shape in enumerate(shapes):
        if shape.name not in by_shape:
            rng = np.random.default_rng(100 + i)
            n = max(args.solo_requests, int(args.solo_rate * args.solo_seconds))
            prompts, outputs = lengths.sample(rng, n)
            arrivals = np.cumsum(rng.exponential(1 / args.solo_rate, n))
            requests = [
                RequestSpec(j, 0, float(t), int(p), int(o))
                for j, (t, p, o) in enumerate(zip(arrivals, prompts, outputs, strict=True))
            ]
            workload = Workload("solo", 1, float(arrivals[-1]), requests)
            args.policy = "prism-worker-resident"
            result = simulate(args, workload, [shape], [(1.0, 1.0)])
            ttft = np.sort(result.ttft[~np.isnan(result.ttft)])
            tpot = np.sort(result.tpot[~np.isnan(result.tpot)])
            by_shape[shape.name] = (_p95(ttft), _p95(tpot))
        ttft_p95, tpot_p95 = by_shape[shape.name]
        out[f"m{i}"] = {"ttft_p95_s": ttft_p95, "tpot_p95_s": tpot_p95, "measured_on": "sim"}
    return out


def by_shape(given: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Solo SLOs for models m0.. of shapes `names`, from a bench_multimodel JSON's, matched
    by shape (its `models` map says each model's shape)."""
    per_shape = {given["models"][m]: slo for m, slo in given["solo"].items()}
    missing = sorted(set(names) - set(per_shape))
    if missing:
        raise SystemExit(f"no solo SLO for {', '.join(missing)} in the given file")
    return {f"m{i}": per_shape[name] for i, name in enumerate(names)}


def _p95(values: np.ndarray) -> float:
    return float(values[min(len(values) - 1, int(0.95 * len(values)))]) if len(values) else 0.0


def main() -> None:
    parser = build_parser(__doc__)
    parser.add_argument("--live", help="a bench_multimodel JSON: its SLOs, and its attainment "
                        "printed beside the simulated one")  # fmt: skip
    parser.set_defaults(modes=",".join(POLICY))
    args = parser.parse_args()
    args.smoke = False
    args.budget = int(args.budget_gib * GiB)
    names = shape_list(args.shapes)
    shapes = [ModelShape.from_config(name, PRESETS[name]) for name in names]
    live = json.loads(Path(args.live).read_text()) if args.live else None
    if args.slos or live:
        given = live or json.loads(Path(args.slos).read_text())
        solo = by_shape(given, names)
    else:
        solo = solo_slos(args, shapes)
    slos = [(solo[f"m{i}"]["ttft_p95_s"], solo[f"m{i}"]["tpot_p95_s"]) for i in range(len(names))]
    base_ttft = np.array([t for t, _ in slos])
    base_tpot = np.array([p for _, p in slos])
    weights = sum(s.weight_bytes for s in shapes)
    results: dict[str, Any] = {
        "benchmark": "sim_multimodel",
        "device": "CPU (simulated H200, cost model defaults)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "models": dict(zip([f"m{i}" for i in range(len(names))], names, strict=True)),
        "budget_gib": args.budget / GiB,
        "weights_gib": weights / GiB,
        "args": {k: v for k, v in vars(args).items() if k != "budget"},
        "solo": solo,
        "live": args.live,
        "runs": [],
    }
    live_att = {(r["mode"], r["rate"]): r["attainment"] for r in (live or {}).get("runs", [])}
    print(f"weights {weights / GiB:.1f} GiB of {args.budget / GiB:.0f} GiB")
    for mode in args.modes.split(","):
        base = mode.partition(":")[0]
        if base not in POLICY:
            raise SystemExit(f"mode {mode!r}: the simulator has {', '.join(POLICY)}")
        args.policy = POLICY[base]
        if args.fifo and args.policy == "prism-worker-slo":
            args.policy = "prism-worker-resident"
        for rate in args.rates:
            scale = args.slo_scales[0]  # what the live worker orders by (bench_multimodel)
            scaled = [(scale * ttft, scale * tpot) for ttft, tpot in slos]
            result = simulate(args, sim_workload(args, rate, seed=1), shapes, scaled)
            att = {
                str(s): _ttft_tpot(result.attainment(base_ttft * s, base_tpot * s))
                for s in args.slo_scales
            }
            row = {"mode": mode, "policy": args.policy, "rate": rate, "attainment": att,
                   "requests": len(result.model), "finished": int(result.finished.sum()),
                   "wakes": int(sum(result.wakes.values())),
                   "sleeps": int(sum(result.sleeps.values())),
                   "preemptions": int(result.preemptions.sum())}  # fmt: skip
            results["runs"].append(row)
            cells = "  ".join(
                f"x{s:g} {a['ttft']:.3f}/{a['tpot']:.3f}" for s, a in
                ((float(k), v) for k, v in att.items())
            )  # fmt: skip
            shown = live_att.get((mode, rate))
            beside = ""
            if shown:
                beside = "   live " + "  ".join(
                    f"x{float(k):g} {v['ttft']:.3f}/{v['tpot']:.3f}" for k, v in shown.items()
                )
            print(f"{mode:<7} {rate:6.2f} req/s sim {cells}  wakes {row['wakes']:>3} "
                  f"preempt {row['preemptions']:>3}{beside}", flush=True)  # fmt: skip
            if min(att[str(max(args.slo_scales))].values()) < args.stop_below:
                break
    results["best_rate"] = best_rates(results["runs"], args.slo_scales)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print("\nhighest rate with ≥ 99% TTFT and TPOT attainment (req/s), simulated:")
    for s in args.slo_scales:
        cells = "  ".join(
            f"{m} {results['best_rate'].get(m, {}).get(str(s), 0.0):5.1f}"
            for m in args.modes.split(",")
        )
        print(f"SLO x{s:<4}: {cells}")


def _ttft_tpot(att: dict[str, float]) -> dict[str, float]:
    return {"ttft": att["ttft"], "tpot": att["tpot"]}


if __name__ == "__main__":
    sys.exit(main())
