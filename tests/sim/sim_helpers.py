"""Paths and small builders shared by the prism.sim tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prism.sim.cost_model import SHAPES
from prism.sim.request import SimModel
from prism.sim.workloads import RequestSpec, Workload

REPO = Path(__file__).resolve().parents[2]
TRACES = REPO / ".." / "shared" / "traces"  # the default, ../shared/traces from the repo root
RESULTS = REPO / "benchmarks" / "results"


def models(*shapes: str, ttft_s: float = 1.0, tpot_s: float = 0.05) -> list[SimModel]:
    return [SimModel(i, f"m{i}", SHAPES[s], ttft_s, tpot_s) for i, s in enumerate(shapes)]


def workload(
    arrivals: Sequence[tuple[float, int]], prompt: int, output: int, num_models: int, end: float
) -> Workload:
    """(time, model) arrivals, all with the same lengths."""
    specs = [RequestSpec(i, m, t, prompt, output) for i, (t, m) in enumerate(arrivals)]
    return Workload("test", num_models, end, specs)
