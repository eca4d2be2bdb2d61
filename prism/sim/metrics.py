"""What a run produced: per-request latencies, counters, memory over time, and the
SLO attainment computed from them.

SLOs are per model: scale × that model's p95 latency when served alone (`solo_p95`,
from a run with one dedicated GPU per model). A request meets its TTFT SLO when its
first token came within it; its TPOT SLO when it finished and its mean time per output
token after the first was within it. A request that never finished misses both.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from prism.sim.gpu import SimGPU
    from prism.sim.simulator import Simulator


class MemoryTrace:
    """Weights and KV bytes each model holds (over all its GPUs), sampled in time, with
    each model's counters in the live worker's `ModelStats` terms (`COLUMNS`) and the
    GPUs' rounds, for comparison with a live timeline."""

    COLUMNS = ("state", "running", "waiting", "busy_s", "steps", "output_tokens",
               "prefill_tokens", "preemptions")  # fmt: skip

    def __init__(self, num_models: int) -> None:
        self.num_models = num_models
        self.times: list[float] = []
        self.weights: list[np.ndarray] = []  # per sample: [num_models] bytes
        self.kv: list[np.ndarray] = []
        self.columns: list[list[tuple[object, ...]]] = []  # per sample, per model: COLUMNS
        self.rounds: list[int] = []  # per sample: rounds over all GPUs

    def sample(self, now: float, gpus: list[SimGPU]) -> None:
        weights = np.zeros(self.num_models)
        kv = np.zeros(self.num_models)
        columns: list[tuple[object, ...]] = [("", 0, 0, 0.0, 0, 0, 0, 0)] * self.num_models
        for gpu in gpus:
            page = gpu.config.page_size
            for model, instance in gpu.instances.items():
                weights[model] += instance.weights.account.num_owned * page
                kv[model] += instance.kv.mapped_pages * page
                i = instance  # one GPU's instance per model in the runs that record this
                columns[model] = (i.state.value, i.running, len(i.waiting), i.busy_s, i.steps,
                                  i.output_tokens, i.prefill_tokens, i.preemptions)  # fmt: skip
        self.times.append(now)
        self.weights.append(weights)
        self.kv.append(kv)
        self.columns.append(columns)
        self.rounds.append(sum(gpu.rounds for gpu in gpus))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """times [T], weights [T, M], kv [T, M] (bytes)."""
        if not self.times:
            empty = np.zeros((0, self.num_models))
            return np.zeros(0), empty, empty
        return np.array(self.times), np.stack(self.weights), np.stack(self.kv)


@dataclass(slots=True)
class SimResult:
    policy: str
    num_gpus: int
    num_models: int
    duration_s: float  # the workload's span
    end_s: float  # simulated time at the end of the run (drain included)
    wall_s: float
    model: np.ndarray  # [R] model of each request
    arrival: np.ndarray  # [R]
    ttft: np.ndarray  # [R] seconds; nan without a first token
    tpot: np.ndarray  # [R] seconds; nan if unfinished; 0 for one-token outputs
    output_tokens: np.ndarray  # [R]
    preemptions: np.ndarray  # [R]
    dropped: int
    migrations: int
    wakes: Counter[int] = field(default_factory=Counter)  # per model
    sleeps: Counter[int] = field(default_factory=Counter)
    busy_s: list[float] = field(default_factory=list)  # per GPU, time in steps and wakes
    memory: MemoryTrace | None = None

    @classmethod
    def collect(cls, sim: Simulator, wall_s: float) -> SimResult:
        reqs = sim.requests
        first = np.array([r.first_token for r in reqs], dtype=float)
        finish = np.array([r.finish for r in reqs], dtype=float)
        arrival = np.array([r.arrival for r in reqs], dtype=float)
        output = np.array([r.output for r in reqs], dtype=np.int64)
        ttft = np.where(first >= 0, first - arrival, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_token = (finish - first) / np.maximum(output - 1, 1)
        tpot = np.where(finish >= 0, per_token, np.nan)
        wakes: Counter[int] = Counter()
        sleeps: Counter[int] = Counter()
        for gpu in sim.gpus:
            wakes.update(gpu.wakes_by_model)
            sleeps.update(gpu.sleeps_by_model)
        return cls(
            policy=sim.policy.name,
            num_gpus=len(sim.gpus),
            num_models=len(sim.models),
            duration_s=sim.workload.duration_s,
            end_s=sim.now,
            wall_s=wall_s,
            model=np.array([r.model for r in reqs], dtype=np.int64),
            arrival=arrival,
            ttft=ttft,
            tpot=tpot,
            output_tokens=output,
            preemptions=np.array([r.preemptions for r in reqs], dtype=np.int64),
            dropped=sim.dropped,
            migrations=sim.migrations,
            wakes=wakes,
            sleeps=sleeps,
            busy_s=[g.busy_s for g in sim.gpus],
            memory=sim.memory,
        )

    @property
    def finished(self) -> np.ndarray:
        return ~np.isnan(self.tpot)

    def attainment(
        self, ttft_slo: np.ndarray, tpot_slo: np.ndarray, after_s: float = 0.0
    ) -> dict[str, float]:
        """Fractions of requests meeting their model's TTFT SLO, TPOT SLO, and both;
        `ttft_slo` and `tpot_slo` are per model ([num_models] seconds). With `after_s`,
        only requests arriving from then on count (a warm-up left out)."""
        kept = self.arrival >= after_s
        return attainment(self.model[kept], self.ttft[kept], self.tpot[kept], ttft_slo, tpot_slo)

    def summary(self) -> dict[str, Any]:
        """Counters and latencies; throughput both over the workload's span and over busy
        GPU time (what the GPUs produced per second they were stepping or waking)."""
        done = self.finished
        tokens = int(self.output_tokens[done].sum())
        busy = float(np.sum(self.busy_s)) if self.busy_s else 0.0
        return {
            "policy": self.policy,
            "gpus": self.num_gpus,
            "models": self.num_models,
            "requests": len(self.model),
            "finished": int(done.sum()),
            "dropped": self.dropped,
            "throughput_rps": float(done.sum() / self.duration_s),
            "throughput_tokens_s": tokens / self.duration_s,
            "busy_gpu_s": busy,
            "busy_throughput_rps": float(done.sum()) / busy if busy > 0 else 0.0,
            "busy_throughput_tokens_s": tokens / busy if busy > 0 else 0.0,
            "ttft_p50_s": _pct(self.ttft, 50),
            "ttft_p99_s": _pct(self.ttft, 99),
            "tpot_p50_s": _pct(self.tpot, 50),
            "tpot_p99_s": _pct(self.tpot, 99),
            "wakes": sum(self.wakes.values()),
            "sleeps": sum(self.sleeps.values()),
            "migrations": self.migrations,
            "preemptions": int(self.preemptions.sum()),
            "gpu_busy": float(np.mean(self.busy_s) / max(self.end_s, 1e-9)) if self.busy_s else 0.0,
            "simulated_s": self.end_s,
            "wall_s": self.wall_s,
        }


def attainment(
    model: np.ndarray,
    ttft: np.ndarray,
    tpot: np.ndarray,
    ttft_slo: np.ndarray,
    tpot_slo: np.ndarray,
) -> dict[str, float]:
    """Fractions of requests meeting their model's TTFT SLO, TPOT SLO, and both. Per
    request [R]: model, TTFT (nan: no first token), TPOT (nan: unfinished; 0 for a
    one-token output); per model [M]: the SLOs. Used for live runs too, so that both
    sides of a comparison count alike."""
    if len(model) == 0:
        return {"ttft": 1.0, "tpot": 1.0, "both": 1.0}
    ttft_ok = np.nan_to_num(ttft, nan=np.inf) <= ttft_slo[model]
    tpot_ok = np.nan_to_num(tpot, nan=np.inf) <= tpot_slo[model]
    return {
        "ttft": float(ttft_ok.mean()),
        "tpot": float(tpot_ok.mean()),
        "both": float((ttft_ok & tpot_ok).mean()),
    }


def _pct(values: np.ndarray, q: float) -> float | None:
    ok = values[~np.isnan(values)]
    return float(np.percentile(ok, q)) if len(ok) else None


def solo_p95(result: SimResult) -> tuple[np.ndarray, np.ndarray]:
    """Per-model p95 TTFT and TPOT of a run where each model had a GPU to itself.
    Models without requests get the median of the others."""
    return p95_by_model(
        result.num_models, result.model, result.ttft, result.tpot, result.output_tokens
    )


def p95_by_model(
    num_models: int,
    model: np.ndarray,
    ttft: np.ndarray,
    tpot: np.ndarray,
    output_tokens: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """p95 TTFT and TPOT [num_models] of per-request latencies [R] (as `attainment` takes
    them; TPOT of one-token outputs left out). Models without requests get the median of
    the others."""
    p95_ttft = np.full(num_models, np.nan)
    p95_tpot = np.full(num_models, np.nan)
    for m in range(num_models):
        mine = model == m
        t = ttft[mine]
        t = t[~np.isnan(t)]
        p = tpot[mine]
        p = p[~np.isnan(p) & (output_tokens[mine] > 1)]
        if len(t):
            p95_ttft[m] = np.percentile(t, 95)
        if len(p):
            p95_tpot[m] = np.percentile(p, 95)
    for arr in (p95_ttft, p95_tpot):
        fill = np.nanmedian(arr) if np.any(~np.isnan(arr)) else 1.0
        arr[np.isnan(arr)] = fill
    return p95_ttft, p95_tpot
