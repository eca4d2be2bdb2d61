"""`prism simulate`: run policies over a workload on simulated GPUs; JSON and PNG out.

The grid is policies × GPU counts × SLO scales × rate scales; every axis given more
than one value gets a plot of attainment against it. `--fewest-gpus MAX` searches, per
policy, the fewest GPUs (up to MAX) whose attainment reaches `--target`. SLOs are per
model: scale × its p95 latency alone on a GPU, measured once at the first rate scale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from prism.sim.cost_model import GPUS, CostModel
from prism.sim.experiments import (
    Scenario,
    SLOs,
    fewest_gpus,
    make_models,
    model_mix,
    run_at,
    solo_slos,
    summary_row,
)
from prism.sim.gpu import GPUConfig
from prism.sim.metrics import SimResult
from prism.sim.policies import KNOWN, POLICIES
from prism.sim.progress import ProgressBar
from prism.sim.workloads import (
    DEFAULT_TRACES,
    Lengths,
    SyntheticLengths,
    Workload,
    azure_lengths,
    azure_trace,
    bursty_groups,
    mooncake_lengths,
    servegen,
)


def add_simulate_parser(sub: Any) -> None:
    p = sub.add_parser("simulate", help="simulate serving policies on a cluster of GPUs")
    p.add_argument("--workload", choices=["bursty", "servegen", "azure"], default="bursty")
    p.add_argument("--models", type=int, default=58)
    p.add_argument("--small-fraction", type=float, default=0.75, help="share of 1–3B models")
    p.add_argument("--duration", type=float, default=3600.0, help="simulated seconds")
    p.add_argument("--rate", type=float, default=20.0, help="bursty: total requests/s")
    p.add_argument("--cv", type=float, default=2.0, help="bursty: inter-arrival CV")
    p.add_argument("--alpha", type=float, default=1.0, help="Zipf popularity exponent")
    p.add_argument(
        "--category", default="language/m-large", help="servegen categories (comma list)"
    )
    p.add_argument(
        "--mapping", choices=["top", "fold"], default="top",
        help="servegen: busiest clients one per model (top), or all clients dealt onto the models",
    )  # fmt: skip
    p.add_argument("--start", type=float, default=0.0, help="servegen: trace second to start at")
    p.add_argument("--lengths", choices=["synthetic", "azure", "mooncake"], default="synthetic")
    p.add_argument("--rate-scale", type=_floats, default=[1.0], help="comma list")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument(
        "--replicas", type=int, default=1, help="independent copies of every arrival process"
    )
    p.add_argument("--policy", type=_names, default=list(POLICIES), help="comma list")
    p.add_argument("--gpus", type=_ints, default=[8], help="comma list")
    p.add_argument("--slo-scale", type=_floats, default=[5.0], help="comma list")
    p.add_argument("--fewest-gpus", type=int, default=0, metavar="MAX", help="search up to MAX")
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--metric", choices=["ttft", "tpot", "both"], default="ttft")
    p.add_argument("--gpu-type", choices=sorted(GPUS), default="H200")
    p.add_argument("--traces", type=Path, default=DEFAULT_TRACES)
    p.add_argument("--calibration", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--out", type=Path, default=Path("sim-results"))
    p.add_argument("--name", default="simulate", help="prefix of the output files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=simulate)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown policy {unknown}; known: {list(KNOWN)}")
    return names


def _lengths(args: argparse.Namespace) -> Lengths:
    if args.lengths == "azure":
        return azure_lengths(args.traces)
    if args.lengths == "mooncake":
        return mooncake_lengths(args.traces)
    return SyntheticLengths()


def make_workload(args: argparse.Namespace, rate_scale: float) -> Workload:
    if args.workload == "servegen":
        return servegen(
            args.models, args.duration, traces=args.traces, category=args.category.split(","),
            mapping=args.mapping, start_s=args.start, lengths=_lengths(args),
            rate_scale=rate_scale, time_scale=args.time_scale, replicas=args.replicas,
            seed=args.seed,
        )  # fmt: skip
    if args.workload == "azure":
        return azure_trace(
            args.models, traces=args.traces, alpha=args.alpha, duration_s=args.duration,
            rate_scale=rate_scale, time_scale=args.time_scale, replicas=args.replicas,
            seed=args.seed,
        )  # fmt: skip
    return bursty_groups(
        args.models, args.duration, args.rate, cv=args.cv, alpha=args.alpha,
        lengths=_lengths(args), rate_scale=rate_scale, time_scale=args.time_scale,
        replicas=args.replicas, seed=args.seed,
    )  # fmt: skip


def _progress(enabled: bool, label: str, total: float) -> ProgressBar | None:
    return ProgressBar(label, total) if enabled else None


def simulate(args: argparse.Namespace) -> int:
    cost = CostModel.from_results(args.calibration, GPUS[args.gpu_type])
    gpu = GPUConfig(cost.gpu.memory_bytes)
    models = tuple(make_models(model_mix(args.models, args.small_fraction, args.seed)))
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": _config(args), "cost_model": _cost(cost), "runs": []}
    slos: SLOs | None = None
    memory: dict[str, SimResult] = {}
    show = not args.no_progress
    for rate_scale in args.rate_scale:
        scenario = Scenario(make_workload(args, rate_scale), models, gpu, cost)
        if slos is None:
            bar = _progress(show, "solo", scenario.workload.duration_s)
            slos, _ = solo_slos(scenario, bar)
            _close(bar)
            report["solo_p95"] = {"ttft_s": slos.ttft_s.tolist(), "tpot_s": slos.tpot_s.tolist()}
        for policy in args.policy:
            for gpus in args.gpus:
                for scale in args.slo_scale:
                    label = f"{policy} {gpus} GPUs x{scale:g} rate x{rate_scale:g}"
                    bar = _progress(show, label, scenario.workload.duration_s)
                    result, att = run_at(scenario, policy, gpus, slos, scale, bar)
                    _close(bar)
                    row = summary_row(result, att, rate_scale=rate_scale, slo_scale=scale)
                    report["runs"].append(row)
                    memory.setdefault(policy, result)
                    print(_line(label, row), flush=True)
            if args.fewest_gpus:
                found, tried = fewest_gpus(
                    scenario, policy, slos, args.slo_scale[0], target=args.target,
                    metric=args.metric, max_gpus=args.fewest_gpus,
                )  # fmt: skip
                report.setdefault("fewest_gpus", {})[policy] = {"gpus": found, "tried": tried}
                print(f"{policy}: fewest GPUs for {args.target:.0%} {args.metric} = {found}")
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    if not args.no_plots:
        _plots(args, report, memory, models)
    return 0


def _close(bar: ProgressBar | None) -> None:
    if bar is not None:
        bar.close()


def _line(label: str, row: dict[str, Any]) -> str:
    att = row["attainment"]
    return (
        f"{label}: TTFT {att['ttft']:.3f} TPOT {att['tpot']:.3f} | {row['finished']} done, "
        f"{row['wakes']} wakes, {row['migrations']} migrations | {row['wall_s']:.1f} s wall"
    )


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}


def _cost(cost: CostModel) -> dict[str, Any]:
    c = cost.calibration
    return {
        "gpu": cost.gpu.name, "memory_bytes": cost.gpu.memory_bytes,
        "hbm_bytes_per_s": cost.gpu.hbm_bytes_per_s, "flops_per_s": cost.gpu.flops_per_s,
        "h2d_bytes_per_s": cost.gpu.h2d_bytes_per_s, "decode_overhead": c.decode_overhead,
        "prefill_points": c.prefill_points, "wake_overhead": c.wake_overhead,
        "wake_fixed_s": c.wake_fixed_s, "unmap_s_per_gib": c.unmap_s_per_gib, "source": c.source,
    }  # fmt: skip


def _plots(
    args: argparse.Namespace,
    report: dict[str, Any],
    memory: dict[str, SimResult],
    models: tuple[Any, ...],
) -> None:
    from prism.sim import plots

    runs = report["runs"]
    axes = {"rate_scale": args.rate_scale, "slo_scale": args.slo_scale, "gpus": args.gpus}
    for axis, values in axes.items():
        if len(values) < 2:
            continue
        series = {
            p: [_mean([r["attainment"][args.metric] for r in runs
                       if r["policy"] == p and r[axis] == v]) for v in values]
            for p in args.policy
        }  # fmt: skip
        path = args.out / f"{args.name}_vs_{axis}.png"
        plots.attainment_curves(
            path, values, series, xlabel=axis.replace("_", " "),
            title=f"{args.metric.upper()} attainment, {args.models} models",
            ylabel=f"{args.metric.upper()} SLO attainment",
        )  # fmt: skip
        print(f"wrote {path}")
    if "fewest_gpus" in report:
        path = args.out / f"{args.name}_fewest_gpus.png"
        needed = {p: v["gpus"] for p, v in report["fewest_gpus"].items()}
        plots.gpus_needed(
            path, needed, ceiling=args.fewest_gpus,
            title=f"GPUs for {args.target:.0%} {args.metric.upper()} attainment",
        )  # fmt: skip
        print(f"wrote {path}")
    names = [m.name for m in models]
    for policy, result in memory.items():
        if result.memory is not None:
            path = args.out / f"{args.name}_memory_{policy.replace('+', 'plus')}.png"
            plots.memory_over_time(
                path,
                result.memory,
                names,
                title=f"memory per model: {policy}, {result.num_gpus} GPUs",
            )
            print(f"wrote {path}")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prism-sim")
    add_simulate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["simulate", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
