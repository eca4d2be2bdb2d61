"""Experiments built from runs: SLOs from solo runs, sweeps, and the fewest GPUs a
policy needs for a target attainment.

A `Scenario` fixes everything but the policy, the GPU count and the SLO scale. SLOs
are per model: scale × the model's p95 TTFT (and TPOT) when it has a GPU to itself
(`solo_slos`: one `static` run with one GPU per model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from prism.sim.cost_model import SHAPES, CostModel
from prism.sim.gpu import GPUConfig
from prism.sim.metrics import SimResult, solo_p95
from prism.sim.policies import make_policy
from prism.sim.request import SimModel
from prism.sim.simulator import SimConfig, Simulator
from prism.sim.workloads import Stream, SyntheticLengths, Workload, steady_streams

Progress = Callable[[float], None]

SMALL = ("llama-3.2-1b", "qwen3-1.7b", "llama-3.2-3b")  # the 1–3B shapes
LARGE = ("llama-3.1-8b", "qwen3-8b", "qwen3-14b")


def model_mix(num_models: int, small_fraction: float = 0.75, seed: int = 0) -> list[str]:
    """Shape names for `num_models` models, `small_fraction` of them 1–3B, the rest
    8–14B, shuffled so that size and popularity rank are independent."""
    small = round(num_models * small_fraction)
    names = [SMALL[i % len(SMALL)] for i in range(small)]
    names += [LARGE[i % len(LARGE)] for i in range(num_models - small)]
    order = np.random.default_rng([seed, 7]).permutation(num_models)
    return [names[i] for i in order]


def make_models(shapes: Sequence[str], priority: int = 0) -> list[SimModel]:
    return [
        SimModel(i, f"m{i:04d}-{s}", SHAPES[s], priority=priority) for i, s in enumerate(shapes)
    ]


@dataclass(frozen=True)
class Scenario:
    workload: Workload
    models: tuple[SimModel, ...]
    gpu: GPUConfig
    cost: CostModel = field(default_factory=CostModel)
    tick_s: float = 5.0
    sample_s: float = 10.0
    drain_s: float = 120.0

    def run(
        self,
        policy: str,
        gpus: int,
        models: Sequence[SimModel] | None = None,
        progress: Progress | None = None,
    ) -> SimResult:
        config = SimConfig(gpus, self.gpu, self.tick_s, self.sample_s, self.drain_s)
        sim = Simulator(
            self.workload, models or self.models, make_policy(policy), config, self.cost
        )
        return sim.run(progress)


@dataclass(frozen=True, slots=True)
class SLOs:
    """Per-model solo p95 latencies; an SLO is `scale` times these."""

    ttft_s: np.ndarray  # [M]
    tpot_s: np.ndarray  # [M]

    def scaled(self, scale: float) -> tuple[np.ndarray, np.ndarray]:
        return self.ttft_s * scale, self.tpot_s * scale

    def models(self, models: Sequence[SimModel], scale: float) -> list[SimModel]:
        """`models` with their SLOs set (the local scheduler orders by them)."""
        ttft, tpot = self.scaled(scale)
        return [
            replace(m, ttft_slo_s=float(ttft[m.index]), tpot_slo_s=float(tpot[m.index]))
            for m in models
        ]


def solo_slos(scenario: Scenario, progress: Progress | None = None) -> tuple[SLOs, SimResult]:
    result = scenario.run("static", len(scenario.models), progress=progress)
    ttft, tpot = solo_p95(result)
    return SLOs(ttft, tpot), result


def run_at(
    scenario: Scenario,
    policy: str,
    gpus: int,
    slos: SLOs,
    scale: float,
    progress: Progress | None = None,
    *,
    after_s: float = 0.0,
) -> tuple[SimResult, dict[str, float]]:
    """One run with SLOs at `scale`; returns the result and its attainment (of requests
    arriving from `after_s` on)."""
    models = slos.models(scenario.models, scale)
    result = scenario.run(policy, gpus, models, progress)
    return result, result.attainment(*slos.scaled(scale), after_s=after_s)


def fewest_gpus(
    scenario: Scenario,
    policy: str,
    slos: SLOs,
    scale: float,
    *,
    target: float = 0.99,
    metric: str = "ttft",
    min_gpus: int = 1,
    max_gpus: int = 64,
    after_s: float = 0.0,
    progress: Progress | None = None,
    on_run: Callable[[int, SimResult, dict[str, float]], None] | None = None,
) -> tuple[int | None, dict[int, dict[str, float]]]:
    """Smallest GPU count in [min_gpus, max_gpus] whose `metric` attainment (of requests
    arriving from `after_s` on) reaches `target`: binary search, attainment taken to
    grow with GPUs. None if `max_gpus` does not reach it. Returns it and the attainment
    of every count tried; `on_run(gpus, result, attainment)` sees every run."""
    tried: dict[int, dict[str, float]] = {}

    def ok(gpus: int) -> bool:
        if gpus not in tried:
            result, att = run_at(scenario, policy, gpus, slos, scale, progress, after_s=after_s)
            tried[gpus] = {**att, "wall_s": result.wall_s}
            if on_run is not None:
                on_run(gpus, result, att)
        return tried[gpus][metric] >= target

    if not ok(max_gpus):
        return None, tried
    lo, hi = min_gpus - 1, max_gpus  # ok(hi) holds; ok(lo) is taken to fail
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi, dict(sorted(tried.items()))


def summary_row(result: SimResult, attainment: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {**extra, **result.summary(), "attainment": attainment}


def always_busy_four(
    duration_s: float, *, rate_scale: float = 1.0, seed: int = 0
) -> tuple[Workload, list[SimModel]]:
    """Four models, each loaded all the time, where KV pressure alone places badly.

    - m0 (8B) decodes long answers: 1 req/s, 1,024 in / 1,024 out — the largest KV demand,
      little compute (one batched decode step at a time);
    - m1, m2 (3B) prefill long prompts and answer in a few tokens: 13 req/s of 4,096 in /
      8 out each — ~60% of a GPU's compute each, little KV (few tokens in flight);
    - m3 (3B) decodes: 0.5 req/s, 1,024 in / 512 out.

    The KV-pressure greedy puts m0 alone (its demand dwarfs the rest) and m1 and m2
    together (they hold little KV), which is 120% of one GPU's compute; a compute term
    splits them. At t = 0 no rates are known and both place by weights, which also puts
    m1 and m2 together: the difference is whether re-placement sees the overload."""
    streams = [
        Stream(1.0, SyntheticLengths(1024, 1024, 0.5)),
        Stream(13.0, SyntheticLengths(4096, 8, 0.25)),
        Stream(13.0, SyntheticLengths(4096, 8, 0.25)),
        Stream(0.5, SyntheticLengths(1024, 512, 0.5)),
    ]
    workload = steady_streams(
        streams, duration_s, rate_scale=rate_scale, seed=seed, name="always-busy-four"
    )
    shapes = ["llama-3.1-8b", "llama-3.2-3b", "llama-3.2-3b", "llama-3.2-3b"]
    return workload, make_models(shapes)
