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

- `static` → each model alone on its partition of the GPU (`static_partition`): a
  simulated GPU with the model's even KV share and its SM share's compute — matmul rate
  and copy bandwidth scaled by what a share of that many SMs measured on the H200
  (`results/sm_partition_h200.json`), shares sized as bench_multimodel sizes them.

Solo SLOs: from `--slos` or `--live` (a bench_multimodel JSON), else simulated: each shape
alone at `--solo-rate`.

Usage: python benchmarks/sim_multimodel.py --traces PATH/traces --live \\
           benchmarks/results/bench_multimodel_h200.json --out f.json
       python benchmarks/sim_multimodel.py --shapes llama-3.1-8b:3,llama-3.2-3b:3 \\
           --lengths mooncake --max-tokens 8192
"""

from __future__ import annotations

import datetime
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from bench_multimodel import (
    best_rates,
    build_parser,
    even_kv_share,
    shape_list,
    sim_workload,
    static_demand,
    trace_lengths,
)
from validate_sim import commit

from prism.models.presets import PRESETS
from prism.serving.sm_partition import proportional_sms
from prism.sim.cost_model import H200, CostModel, ModelShape
from prism.sim.gpu import GPUConfig
from prism.sim.metrics import SimResult, attainment
from prism.sim.policies import make_policy
from prism.sim.request import SimModel
from prism.sim.simulator import SimConfig, Simulator
from prism.sim.workloads import RequestSpec, Workload

POLICY = {
    "prism": "prism-worker-slo",
    "spatial": "spatial-even",
    "swap": "swap",
    "static": "spatial-even",
}  # static: one simulation per model on its partition
PROBE = Path(__file__).parent / "results" / "sm_partition_h200.json"
PAGE = 2 << 20
GiB = 1 << 30


def simulate(
    args: Any, workload: Workload, shapes: list[ModelShape], slos: list[tuple[float, float]],
    memory_bytes: int | None = None, cost: CostModel | None = None,
) -> SimResult:  # fmt: skip
    """`workload` on one simulated GPU of `memory_bytes` (default the budget) under
    `args.policy`, with `cost` (default: the H200 defaults)."""
    models = [
        SimModel(i, f"m{i}", shape, ttft, tpot)
        for i, (shape, (ttft, tpot)) in enumerate(zip(shapes, slos, strict=True))
    ]
    gpu = GPUConfig(
        memory_bytes=memory_bytes or args.budget, headroom_bytes=0, page_size=PAGE,
        block_size=16, model_overhead_bytes=0, max_num_seqs=args.max_seqs,
        max_batched_tokens=args.step_tokens,
    )  # fmt: skip
    config = SimConfig(1, gpu, drain_s=args.grace)
    policy = make_policy(args.policy)
    return Simulator(workload, models, policy, config, cost or CostModel()).run()


def share_fractions(sms: int, probe: dict[str, Any]) -> tuple[float, float]:
    """(matmul rate, copy bandwidth) of a share of `sms` SMs as fractions of the whole
    device's: linear between the probe's measured shares (and the whole device)."""
    points = [(0, 0.0, 0.0)] + [
        (r["sms"], r["matmul_fraction"], r["copy_fraction"]) for r in probe["shares"]
    ] + [(probe["device_sms"], 1.0, 1.0)]  # fmt: skip
    for (s0, m0, c0), (s1, m1, c1) in itertools.pairwise(points):
        if s0 <= sms <= s1:
            t = (sms - s0) / (s1 - s0)
            return m0 + t * (m1 - m0), c0 + t * (c1 - c0)
    raise ValueError(f"{sms} SMs: the device has {probe['device_sms']}")


def static_partition(
    args: Any, workload: Workload, shapes: list[ModelShape], slos: list[tuple[float, float]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """bench_multimodel's `static`: every model alone on its partition (its even KV share,
    its SM share's compute), the partitions independent. Returns per request: model,
    finished, TTFT, TPOT (as `SimResult`'s arrays), over all the models."""
    probe = json.loads(PROBE.read_text())
    usable = probe["split_by_8"]["granules"] * probe["granularity"]["min_partition_sms"]
    params = {f"m{i}": shape.params for i, shape in enumerate(shapes)}
    sms = proportional_sms(static_demand(args, params), usable,
                           probe["granularity"]["min_partition_sms"])  # fmt: skip
    share = even_kv_share(args.budget, [shape.weight_bytes for shape in shapes], PAGE)
    parts: list[tuple[np.ndarray, ...]] = []
    for i, shape in enumerate(shapes):
        matmul, copy = share_fractions(sms[f"m{i}"], probe)
        spec = replace(H200, hbm_bytes_per_s=H200.hbm_bytes_per_s * copy,
                       flops_per_s=H200.flops_per_s * matmul)  # fmt: skip
        mine = [replace(r, model=0) for r in workload.requests if r.model == i]
        alone = Workload(f"{workload.name}/m{i}", 1, workload.duration_s, mine)
        memory = -(-shape.weight_bytes // PAGE) * PAGE + share + 8 * PAGE
        result = simulate(args, alone, [shape], [slos[i]], memory, CostModel(spec))
        parts.append((np.full(len(result.model), i), result.finished, result.ttft, result.tpot))
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))  # type: ignore[return-value]


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
            workload = sim_workload(args, rate, seed=1)
            if base == "static":
                model, finished, ttft, tpot = static_partition(args, workload, shapes, scaled)
                wakes = sleeps = preemptions = 0
            else:
                result = simulate(args, workload, shapes, scaled)
                model, finished = result.model, result.finished
                ttft, tpot = result.ttft, result.tpot
                wakes, sleeps = sum(result.wakes.values()), sum(result.sleeps.values())
                preemptions = int(result.preemptions.sum())
            att = {
                str(s): _ttft_tpot(attainment(model, ttft, tpot, base_ttft * s, base_tpot * s))
                for s in args.slo_scales
            }
            row = {"mode": mode, "policy": args.policy, "rate": rate, "attainment": att,
                   "requests": len(model), "finished": int(finished.sum()),
                   "wakes": int(wakes), "sleeps": int(sleeps),
                   "preemptions": preemptions}  # fmt: skip
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
