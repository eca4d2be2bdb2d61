"""The simulator against the live system: one small multi-model workload, run on a real
`DeviceWorker` and in `prism.sim`, TTFT and TPOT attainment compared at the same SLOs.

Three random-weight models of different sizes share one device whose budget holds their
weights and little KV beside them, so the hot model's cache grows by putting idle models
to sleep (ballooning) and a cold model's request wakes it. Arrivals are bursty (gamma,
CV 2) with a rotating hot model (`bursty_groups`: groups of one, 60% of the load on the
hot one, redrawn every period); prompt and output lengths come from the Azure LLM 2023
code trace (prompts scaled down on the CPU). Steps, all in one run:

1. calibrate: on the live worker, time rounds of each model alone (prefill at a few token
   counts, decode at a few batch sizes), its wakes and sleeps; measure the device's copy
   and matmul ceilings; fit the cost model to them (`Calibration.fit`). On CUDA the
   committed H200 calibration (`benchmarks/results/*h200*.json`) is simulated too.
2. solo: each model alone at light load, live and simulated. SLO = scale × the live p95
   TTFT and TPOT of each model: one set of SLO values for both sides.
3. shared: the workload at each rate, live (`bench_worker.replay`, timed arrivals) and
   simulated (policy `prism-worker`: the worker's elastic memory, first come first served,
   no idle timer; the paper's `prism` is reported beside it), with the same requests and
   the same cutoff.
4. attainment of both at each SLO scale (`prism.sim.metrics.attainment` for both), and
   the difference in percentage points.

Usage: python benchmarks/validate_sim.py --device cuda --traces TRACES --out f.json
       python benchmarks/validate_sim.py --device cpu     (small models, a few minutes)
       python benchmarks/validate_sim.py --smoke          (tiny models, ~20 s: the plumbing)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_worker import Record, replay

from prism.engine import EngineConfig, SamplingParams
from prism.models.config import ModelConfig
from prism.models.presets import PRESETS
from prism.serving.model_slot import ModelSpec, ModelState
from prism.serving.worker import DeviceWorker, WorkerConfig, WorkerStats
from prism.sim.cost_model import Calibration, CostModel, GPUSpec, ModelShape
from prism.sim.gpu import GPUConfig
from prism.sim.metrics import SimResult, attainment, p95_by_model
from prism.sim.policies import make_policy
from prism.sim.request import SimModel
from prism.sim.simulator import SimConfig, Simulator
from prism.sim.workloads import (
    Stream,
    TraceLengths,
    Workload,
    azure_lengths,
    bursty_groups,
    steady_streams,
)

MiB, GiB = 1 << 20, 1 << 30
REPO = Path(__file__).resolve().parents[1]
Arrival = tuple[float, str, list[int], SamplingParams]


def llama(hidden: int, inter: int, layers: int, heads: int, kv_heads: int) -> ModelConfig:
    """A small Llama shape for random weights on the CPU (head_dim 64, or less when tiny)."""
    return ModelConfig(
        architecture="llama", vocab_size=1024, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
    )  # fmt: skip


@dataclass(frozen=True)
class Setup:
    """What one validation run fixes, per kind of device."""

    device: str
    models: dict[str, ModelConfig]  # name -> shape, smallest first
    kv_bytes: int  # KV memory in the budget beyond every model's weights
    engine: EngineConfig
    rates: tuple[float, ...]  # requests/s of all models together, one shared run each
    slo_scales: tuple[float, ...]
    seconds: float  # arrivals of a shared run
    grace_s: float  # after the last arrival: then what is unfinished is cut off (a miss)
    period_s: float  # the hot model is redrawn this often
    solo_rate: float  # requests/s of each model's solo run
    solo_seconds: float
    prompt_scale: float  # Azure prompt lengths × this
    max_tokens: int  # prompt + output, at most
    prefill_tokens: tuple[int, ...]  # calibration: one prompt of each length in a step
    decode_batches: tuple[int, ...]  # calibration: decode steps at these batch sizes
    decode_context: int
    repeats: int
    threads: int = 0  # torch CPU threads (0: leave as is)
    seed: int = 1

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.device == "cpu" else torch.bfloat16

    @property
    def weight_bytes(self) -> int:
        return sum(c.weight_bytes(self.dtype) for c in self.models.values())

    @property
    def budget_bytes(self) -> int:
        page = 64 << 10 if self.device == "cpu" else 2 * MiB
        pages = sum(-(-c.weight_bytes(self.dtype) // page) for c in self.models.values())
        return pages * page + self.kv_bytes


def _engine(max_tokens: int, max_seqs: int, graphs: tuple[int, ...] = ()) -> EngineConfig:
    # No prefix caching: the simulator does not model it (random prompts share nothing).
    return EngineConfig(
        max_model_len=max_tokens + 16, max_num_seqs=max_seqs, max_num_batched_tokens=2048,
        prefix_caching=False, cuda_graph_sizes=graphs,
    )  # fmt: skip


# fmt: off
SETUPS = {
    "cuda": Setup(
        device="cuda",
        models={n: PRESETS[n] for n in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")},
        kv_bytes=4 * GiB,
        engine=_engine(8192, 128, (1, 2, 4, 8, 16, 32, 64, 128)),
        rates=(8.0, 14.0),
        slo_scales=(2.0, 3.0, 5.0, 10.0),
        seconds=90.0, grace_s=30.0, period_s=20.0, solo_rate=1.0, solo_seconds=20.0,
        prompt_scale=1.0, max_tokens=8192,
        prefill_tokens=(128, 512, 2048), decode_batches=(1, 8, 32, 128), decode_context=512,
        repeats=3,
    ),
    "cpu": Setup(
        device="cpu",
        models={"s": llama(512, 1536, 4, 8, 4), "m": llama(512, 1536, 8, 8, 4),
                "l": llama(768, 2048, 6, 12, 4)},
        kv_bytes=12 * MiB,
        engine=_engine(512, 64),
        rates=(1.5, 3.0),
        slo_scales=(2.0, 3.0, 5.0, 10.0),
        seconds=90.0, grace_s=30.0, period_s=15.0, solo_rate=1.0, solo_seconds=16.0,
        prompt_scale=1 / 16, max_tokens=512,
        prefill_tokens=(16, 64, 256, 512), decode_batches=(1, 2, 4, 8, 16), decode_context=128,
        repeats=3, threads=1,
    ),
    "smoke": Setup(
        device="cpu",
        models={"s": llama(64, 128, 1, 2, 1), "m": llama(128, 256, 2, 4, 2),
                "l": llama(192, 384, 2, 4, 2)},
        kv_bytes=2 * MiB,
        engine=_engine(256, 16),
        rates=(6.0,),
        slo_scales=(2.0, 5.0),
        seconds=6.0, grace_s=20.0, period_s=2.0, solo_rate=3.0, solo_seconds=1.5,
        prompt_scale=1 / 32, max_tokens=256,
        prefill_tokens=(16, 64), decode_batches=(1, 4), decode_context=32,
        repeats=2, threads=1,
    ),
}
# fmt: on


# ---- the workload -----------------------------------------------------------------------


def trace_lengths(setup: Setup, traces: Path) -> TraceLengths:
    """Azure 2023 code trace lengths, prompts × `prompt_scale`, capped at `max_tokens`."""
    azure = azure_lengths(traces, max_tokens=setup.max_tokens)
    if setup.prompt_scale == 1.0:
        return azure
    prompts = tuple(max(1, round(p * setup.prompt_scale)) for p in azure.prompts)
    name = f"{azure.name}, prompts x{setup.prompt_scale:g}"
    return TraceLengths(name, prompts, azure.outputs, setup.max_tokens)


def shared_workload(setup: Setup, lengths: TraceLengths, rate: float) -> Workload:
    """Bursty arrivals over the models, one hot model at a time, redrawn every period."""
    return bursty_groups(
        len(setup.models), setup.seconds, rate, cv=2.0, alpha=1.0, group_size=1,
        hot_groups=1, hot_share=0.6, period_s=setup.period_s, lengths=lengths, seed=setup.seed,
    )  # fmt: skip


def solo_workloads(setup: Setup, lengths: TraceLengths) -> list[Workload]:
    """Each model's light Poisson stream, as a one-model workload."""
    streams = [Stream(setup.solo_rate, lengths)] * len(setup.models)
    both = steady_streams(streams, setup.solo_seconds, seed=setup.seed + 1, name="solo")
    return [both.only([m]) for m in range(len(setup.models))]


def live_arrivals(workload: Workload, names: list[str], vocab: int, seed: int) -> list[Arrival]:
    """The workload's requests for `replay`: random prompt ids, exact output lengths."""
    rng = random.Random(seed)
    return [
        (r.arrival, names[r.model], [rng.randrange(1, vocab) for _ in range(r.prompt_tokens)],
         greedy(r.output_tokens))
        for r in workload.requests
    ]  # fmt: skip


# ---- per-request latencies, either side -------------------------------------------------


@dataclass(frozen=True)
class Latencies:
    """Per request [R], in arrival order: what attainment is computed from."""

    model: np.ndarray  # model index
    arrival: np.ndarray  # seconds from the run's start
    output: np.ndarray  # output tokens asked for
    ttft: np.ndarray  # seconds; nan without a first token
    tpot: np.ndarray  # seconds; nan if unfinished, 0 for a one-token output

    @classmethod
    def from_records(cls, records: list[Record], workload: Workload) -> Latencies:
        if len(records) != len(workload.requests):
            raise RuntimeError(f"{len(records)} records for {len(workload.requests)} requests")
        ttft = [np.nan if r.ttft is None else r.ttft for r in records]
        tpot = [np.nan if r.finished is None else (r.tpot or 0.0) for r in records]
        specs = workload.requests
        return cls(
            np.array([s.model for s in specs]), np.array([r.arrival for r in records]),
            np.array([s.output_tokens for s in specs]), np.array(ttft), np.array(tpot),
        )  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, list[Any]]) -> Latencies:
        def array(values: list[Any]) -> np.ndarray:
            return np.array([np.nan if v is None else v for v in values])

        return cls(**{k: array(v) for k, v in data.items()})

    @classmethod
    def from_sim(cls, result: SimResult) -> Latencies:
        return cls(result.model, result.arrival, result.output_tokens, result.ttft, result.tpot)

    @property
    def finished(self) -> int:
        return int((~np.isnan(self.tpot)).sum())

    def p95(self, num_models: int) -> tuple[np.ndarray, np.ndarray]:
        return p95_by_model(num_models, self.model, self.ttft, self.tpot, self.output)

    def attainment(self, ttft_slo: np.ndarray, tpot_slo: np.ndarray) -> dict[str, float]:
        return attainment(self.model, self.ttft, self.tpot, ttft_slo, tpot_slo)

    def to_json(self) -> dict[str, list[Any]]:
        def clean(a: np.ndarray) -> list[Any]:
            return [None if isinstance(x, float) and np.isnan(x) else x for x in a.tolist()]

        return {k: clean(v) for k, v in asdict(self).items()}


# ---- the live side ----------------------------------------------------------------------


def build_worker(setup: Setup) -> DeviceWorker:
    """Every model on one worker, woken once (engine built, graphs captured), then asleep."""
    worker = DeviceWorker(WorkerConfig(device=setup.device, budget_bytes=setup.budget_bytes))
    for name, config in setup.models.items():
        worker.add_model(ModelSpec(name, config, load_format="dummy", engine=setup.engine))
        assert worker.wake(name), f"{name} does not fit"
        worker.sleep(name)
    return worker


def all_asleep(worker: DeviceWorker) -> None:
    for name, slot in worker.models.items():
        if slot.state is ModelState.ACTIVE:
            worker.sleep(name)


def run_live(
    worker: DeviceWorker, setup: Setup, workload: Workload, names: list[str], seed: int
) -> tuple[Latencies, dict[str, Any]]:
    """Replay `workload` with every model asleep at the start (as the sim starts them)."""
    all_asleep(worker)
    start = worker.stats()
    before = {m.name: (m.wakes, m.sleeps) for m in start.models}
    vocab = min(c.vocab_size for c in setup.models.values())
    arrivals = live_arrivals(workload, names, vocab, seed)
    summary, records = replay(
        worker, arrivals, cutoff_s=workload.duration_s + setup.grace_s, sample_s=TIMELINE_S
    )
    worker.run_until_idle()  # aborted requests leave nothing behind
    worker.check_integrity()
    end = worker.stats()
    after = end.models
    summary["wakes"] = sum(m.wakes - before[m.name][0] for m in after)
    summary["sleeps"] = sum(m.sleeps - before[m.name][1] for m in after)
    summary["preemptions"] = sum(m.preemptions for m in after) - sum(
        m.preemptions for m in start.models
    )
    # Where the worker's rounds went: the host's work before waiting, and the wait
    rounds = end.rounds - start.rounds
    summary["rounds"] = rounds
    summary["round_host_ms"] = 1e3 * (end.round_host_s - start.round_host_s) / max(1, rounds)
    summary["round_wait_ms"] = 1e3 * (end.round_wait_s - start.round_wait_s) / max(1, rounds)
    return Latencies.from_records(records, workload), summary


# ---- calibration on the live worker -----------------------------------------------------


def cpu_ceilings() -> GPUSpec:
    """Memory copy bandwidth (read + write bytes, as bench_engine counts it), fp32 matmul
    rate and plain copy rate (bytes moved) of this CPU, at the threads torch uses."""
    x = torch.empty(256 * MiB, dtype=torch.uint8)
    y = torch.empty_like(x)
    copies = []
    for _ in range(7):
        t = time.perf_counter()
        y.copy_(x)
        copies.append(time.perf_counter() - t)
    copy_s = statistics.median(copies[2:])
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(3):
        a @ b
    flops = 3 * 2 * n**3 / (time.perf_counter() - t)
    return GPUSpec("cpu", 0, 2 * x.numel() / copy_s, flops, x.numel() / copy_s)


def cuda_ceilings() -> GPUSpec:
    from bench_engine import ceilings
    from bench_worker import h2d_bandwidth

    c = ceilings()
    name = torch.cuda.get_device_name(0)
    return GPUSpec(name, 0, c["copy_bytes_per_s"], c["bf16_flops_per_s"], h2d_bandwidth())


@dataclass
class Samples:
    """Measured steps, wakes and sleeps: what `Calibration.fit` takes."""

    decode: list[tuple[ModelShape, int, int, float]] = field(default_factory=list)
    prefill: list[tuple[ModelShape, int, float]] = field(default_factory=list)
    wake: list[tuple[ModelShape, float]] = field(default_factory=list)
    sleep: list[tuple[int, float]] = field(default_factory=list)
    kv_map: list[tuple[int, float]] = field(default_factory=list)  # KV growth: bytes, s


def greedy(tokens: int) -> SamplingParams:
    """What every request asks for, in the workload and in calibration alike."""
    return SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)


def timed_step(worker: DeviceWorker) -> tuple[float, list[Any]]:
    t = time.perf_counter()
    outs = worker.step()
    return time.perf_counter() - t, outs


def measure_model(worker: DeviceWorker, setup: Setup, name: str, shape: ModelShape) -> Samples:
    """One model alone (the others asleep): wakes, sleeps, prefill and decode rounds."""
    out = Samples()
    rng = random.Random(7)
    vocab = setup.models[name].vocab_size
    for _ in range(setup.repeats):
        t = time.perf_counter()
        assert worker.wake(name)
        out.wake.append((shape, time.perf_counter() - t))
        t = time.perf_counter()
        released = worker.sleep(name)
        out.sleep.append((released, time.perf_counter() - t))
    assert worker.wake(name)
    out.kv_map += measure_kv_growth(worker, name, setup.kv_bytes // 4)
    for tokens in setup.prefill_tokens:
        times = []
        for _ in range(setup.repeats + 1):  # the first of each length warms up
            prompt = [rng.randrange(1, vocab) for _ in range(tokens)]
            worker.submit(name, prompt, greedy(1))
            seconds, outs = timed_step(worker)
            assert outs and outs[0][1].finished, "the prompt did not prefill in one step"
            times.append(seconds)
        out.prefill.append((shape, tokens, statistics.median(times[1:])))
    steps = 2 * setup.repeats + 2
    for batch in setup.decode_batches:
        params = greedy(steps + 2)
        for _ in range(batch):
            prompt = [rng.randrange(1, vocab) for _ in range(setup.decode_context)]
            worker.submit(name, prompt, params)
        first = 0
        while first < batch:  # prefill every prompt (each gives its first token)
            first += sum(1 for _, o in worker.step() if o.num_output_tokens == 1)
        times = [timed_step(worker)[0] for _ in range(steps)]
        worker.run_until_idle()
        kv_tokens = batch * (setup.decode_context + 1 + steps // 2)
        out.decode.append((shape, batch, kv_tokens, statistics.median(times[1:])))
    worker.sleep(name)
    return out


def measure_kv_growth(worker: DeviceWorker, name: str, nbytes: int) -> list[tuple[int, float]]:
    """A woken model's KV cache grown by about `nbytes` of pages from its empty state
    (blocks allocated, as a request's admission takes them), three times: the host time
    per byte the simulator charges as caches grow."""
    engine = worker.models[name].engine
    assert engine is not None
    cache = engine.kv_cache
    blocks = max(1, nbytes // (cache.config.bytes_per_token * cache.config.block_size))
    samples = []
    for _ in range(3):
        cache.trim(0)
        before = cache.mapped_bytes
        t = time.perf_counter()
        got = cache.allocate(min(blocks, cache.free_blocks + cache.growth_blocks()))
        seconds = time.perf_counter() - t
        assert got is not None, f"{name}: KV growth for calibration failed"
        samples.append((cache.mapped_bytes - before, seconds))
        cache.free(got)
    cache.trim()
    return [(b, t) for b, t in samples if b > 0]


def calibrate(
    worker: DeviceWorker, setup: Setup, shapes: dict[str, ModelShape]
) -> tuple[CostModel, dict[str, Any]]:
    """Ceilings and step times measured now; the cost model fitted to them."""
    spec = cpu_ceilings() if setup.device == "cpu" else cuda_ceilings()
    all_asleep(worker)
    samples = Samples()
    for name, shape in shapes.items():
        got = measure_model(worker, setup, name, shape)
        samples.decode += got.decode
        samples.prefill += got.prefill
        samples.wake += got.wake
        samples.sleep += got.sleep
        samples.kv_map += got.kv_map
    source = f"measured in this run on {spec.name}"
    calibration = Calibration.fit(
        spec, samples.decode, samples.prefill, samples.wake, samples.sleep, source,
        kv_map=samples.kv_map,
    )  # fmt: skip
    cost = CostModel(spec, calibration)
    return cost, {"ceilings": asdict(spec), "factors": _factors(calibration),
                  "fit": fit_report(cost, samples)}  # fmt: skip


def _factors(calibration: Calibration) -> dict[str, Any]:
    return {k: getattr(calibration, k) for k in (
        "decode_overhead", "prefill_points", "wake_overhead", "wake_fixed_s",
        "unmap_s_per_gib", "map_s_per_gib", "step_fixed_s", "seq_fixed_s", "eager_layer_s",
        "roofline", "source")}  # fmt: skip


def fit_report(cost: CostModel, samples: Samples) -> list[dict[str, Any]]:
    """Every measured point against the fitted model."""
    rows = []
    for shape, batch, kv, seconds in samples.decode:
        rows.append(("decode", shape.name, batch, seconds, cost.decode_s(shape, batch, kv)))
    for shape, tokens, seconds in samples.prefill:
        rows.append(("prefill", shape.name, tokens, seconds, cost.prefill_s(shape, tokens)))
    for shape, seconds in samples.wake:
        rows.append(("wake", shape.name, 0, seconds, cost.wake_s(shape)))
    return [{"kind": k, "model": m, "size": n, "measured_s": s, "model_s": p,
             "error": p / s - 1} for k, m, n, s, p in rows]  # fmt: skip


# ---- the simulated side -----------------------------------------------------------------


def run_sim(
    setup: Setup,
    workload: Workload,
    shapes: list[ModelShape],
    cost: CostModel,
    policy: str,
    slos: tuple[np.ndarray, np.ndarray],
    page_size: int,
) -> SimResult:
    """`workload` on one simulated device with the live worker's budget and engine limits."""
    ttft, tpot = slos
    models = [SimModel(i, s.name, s, float(ttft[i]), float(tpot[i])) for i, s in enumerate(shapes)]
    engine = setup.engine
    gpu = GPUConfig(
        memory_bytes=setup.budget_bytes, headroom_bytes=0, page_size=page_size,
        block_size=engine.block_size, model_overhead_bytes=0, max_num_seqs=engine.max_num_seqs,
        max_batched_tokens=engine.max_num_batched_tokens,
        graph_tokens=tuple(t for t in engine.cuda_graph_tokens
                           if t <= engine.max_num_batched_tokens),
    )  # fmt: skip
    config = SimConfig(1, gpu, sample_s=TIMELINE_S, drain_s=setup.grace_s)
    return Simulator(workload, models, make_policy(policy), config, cost).run()


# ---- the comparison ---------------------------------------------------------------------

TIMELINE_S = 0.05  # both sides' state per model is sampled this often (seconds)
MAIN = "prism-worker/measured"  # the variant that runs what the live worker runs
SIM_POLICIES = ("prism-worker", "prism")  # the paper's `prism` beside it, for reference


def solo_live(worker: DeviceWorker, setup: Setup, lengths: TraceLengths) -> dict[str, Any]:
    """Each model alone at light load on the live worker: p95 TTFT and TPOT per model."""
    names = list(setup.models)
    p95 = []
    for i, workload in enumerate(solo_workloads(setup, lengths)):
        lat, _ = run_live(worker, setup, workload, [names[i]], seed=100 + i)
        ttft, tpot = lat.p95(1)
        p95.append((float(ttft[0]), float(tpot[0])))
    return {"ttft_p95_s": [t for t, _ in p95], "tpot_p95_s": [p for _, p in p95]}


def solo_sim(
    setup: Setup, lengths: TraceLengths, shapes: list[ModelShape], cost: CostModel, page: int
) -> dict[str, Any]:
    """The same solo runs simulated (the SLOs do not matter: one model, first come first
    served)."""
    p95 = []
    unit = (np.ones(1), np.ones(1))
    for i, workload in enumerate(solo_workloads(setup, lengths)):
        result = run_sim(setup, workload, [shapes[i]], cost, "prism-worker", unit, page)
        ttft, tpot = Latencies.from_sim(result).p95(1)
        p95.append((float(ttft[0]), float(tpot[0])))
    return {"ttft_p95_s": [t for t, _ in p95], "tpot_p95_s": [p for _, p in p95]}


def live_side(
    worker: DeviceWorker, setup: Setup, lengths: TraceLengths, rate: float
) -> dict[str, Any]:
    """One rate's shared workload on the live worker."""
    workload = shared_workload(setup, lengths, rate)
    started = time.perf_counter()
    live, summary = run_live(worker, setup, workload, list(setup.models), seed=int(rate * 1000))
    summary["wall_s"] = time.perf_counter() - started
    timeline = live_timeline(summary.pop("timeline"), list(setup.models))
    return {"rate": rate, "requests": len(workload.requests), "live": summary,
            "latencies": {"live": live.to_json()}, "timeline": {"live": timeline}}  # fmt: skip


# Timeline columns per model: JSON name → `ModelStats` field
LIVE_COLUMNS = {"state": "state", "weight_bytes": "weights_mapped_bytes",
                "kv_bytes": "kv_mapped_bytes", "running": "running", "waiting": "waiting",
                "busy_s": "busy_s", "output_tokens": "output_tokens",
                "preemptions": "preemptions", "steps": "steps",
                "prefill_tokens": "prefill_tokens"}  # fmt: skip


def live_timeline(samples: list[tuple[float, WorkerStats]], names: list[str]) -> dict[str, Any]:
    """`replay`'s samples as columns: t [T]; per model [T][model] (models in `names`
    order) its state, weight and KV bytes, running and waiting requests (held for a wake
    included), and cumulative engine seconds, output tokens, preemptions, steps and prefill
    tokens; the worker's cumulative rounds, round host and wait seconds [T][3]."""
    columns: dict[str, Any] = {"t": [round(t, 4) for t, _ in samples]}
    per_model = [{m.name: m for m in stats.models} for _, stats in samples]
    for key, attr in LIVE_COLUMNS.items():
        columns[key] = [[getattr(models[n], attr) for n in names] for models in per_model]
    columns["rounds"] = [[s.rounds, s.round_host_s, s.round_wait_s] for _, s in samples]
    return columns


def sim_timeline(result: SimResult) -> dict[str, Any]:
    """The simulator's trace in `live_timeline`'s columns: memory, each model's state,
    running and waiting requests, cumulative engine seconds, steps, output and prefill
    tokens and preemptions [T][model], and the GPU's cumulative rounds [T]."""
    trace = result.memory
    assert trace is not None
    times, weights, kv = trace.arrays()
    out: dict[str, Any] = {"t": [round(float(t), 4) for t in times],
                           "weight_bytes": weights.tolist(), "kv_bytes": kv.tolist()}  # fmt: skip
    for k, name in enumerate(trace.COLUMNS):
        out[name] = [[model[k] for model in sample] for sample in trace.columns]
    out["rounds"] = trace.rounds
    return out


def sim_side(
    row: dict[str, Any], setup: Setup, lengths: TraceLengths, shapes: list[ModelShape],
    costs: dict[str, CostModel], base: tuple[np.ndarray, np.ndarray], page: int,
) -> None:  # fmt: skip
    """Simulate the workload of `row` (a live run) in every variant (policy × calibration)
    and put both sides' attainment at every SLO scale into it. `prism` orders by deadline,
    so it runs once per scale; `prism-worker` once."""
    workload = shared_workload(setup, lengths, row["rate"])
    sims: dict[str, dict[float, Latencies]] = {}
    row["sim"] = {}
    for key, cost in costs.items():
        for policy in SIM_POLICIES:
            label = f"{policy}/{key}"
            scales = setup.slo_scales if policy == "prism" else setup.slo_scales[:1]
            for scale in scales:
                slos = (base[0] * scale, base[1] * scale)
                result = run_sim(setup, workload, shapes, cost, policy, slos, page)
                sims.setdefault(label, {})[scale] = Latencies.from_sim(result)
                if label == MAIN and scale == setup.slo_scales[0]:
                    row.setdefault("timeline", {})["sim"] = sim_timeline(result)
                row["sim"].setdefault(label, result.summary())
    live = Latencies.from_json(row["latencies"]["live"])
    row["latencies"]["sim"] = sims[MAIN][setup.slo_scales[0]].to_json()
    row["attainment"] = {}
    for scale in setup.slo_scales:
        slos = (base[0] * scale, base[1] * scale)
        cell = {"live": live.attainment(*slos)}
        for label, by_scale in sims.items():
            cell[label] = by_scale.get(scale, by_scale[setup.slo_scales[0]]).attainment(*slos)
        row["attainment"][str(scale)] = cell


def diff_pp(cell: dict[str, dict[str, float]], label: str, metric: str) -> float:
    return 100.0 * (cell[label][metric] - cell["live"][metric])


def largest_diff(results: dict[str, Any], label: str) -> float:
    return max(
        abs(diff_pp(cell, label, metric))
        for run in results["runs"]
        for cell in run["attainment"].values()
        for metric in ("ttft", "tpot")
    )


def print_table(results: dict[str, Any]) -> None:
    first = results["runs"][0]["attainment"][str(results["slo_scales"][0])]
    for label in first:
        if label not in ("live", MAIN):
            worst = largest_diff(results, label)
            print(f"sim {label}: largest difference from live {worst:.1f} pp")
    print(f"\n{'req/s':>6} {'SLO x':>5} | {'TTFT live':>9} {'sim':>6} {'diff pp':>7} | "
          f"{'TPOT live':>9} {'sim':>6} {'diff pp':>7}")  # fmt: skip
    for run in results["runs"]:
        for scale, cell in run["attainment"].items():
            live, sim = cell["live"], cell[MAIN]
            print(
                f"{run['rate']:6.2f} {float(scale):5.1f} | {live['ttft']:9.3f} {sim['ttft']:6.3f} "
                f"{diff_pp(cell, MAIN, 'ttft'):+7.1f} | {live['tpot']:9.3f} {sim['tpot']:6.3f} "
                f"{diff_pp(cell, MAIN, 'tpot'):+7.1f}"
            )
    within = "within" if results["within_5pp"] else "beyond"
    print(f"largest difference: {results['max_abs_diff_pp']:.1f} pp ({within} 5 pp)")


def commit() -> str:
    if "PRISM_COMMIT" in os.environ:
        return os.environ["PRISM_COMMIT"]
    git = ["git", "-C", str(REPO)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty.strip() else "")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---- a whole run, or the simulated side again ---------------------------------------------


def validate(kind: str, setup: Setup, traces: Path, out: Path) -> dict[str, Any]:
    """Calibrate, solo runs, then each rate live and simulated; saved after every phase."""
    if setup.threads:
        torch.set_num_threads(setup.threads)
    started = time.perf_counter()
    lengths = trace_lengths(setup, traces)
    shapes = model_shapes(setup)
    worker = build_worker(setup)
    page = worker.pool.page_size
    cost, calibration = calibrate(worker, setup, dict(zip(setup.models, shapes, strict=True)))
    device = "cpu" if setup.device == "cpu" else torch.cuda.get_device_name(0)
    results: dict[str, Any] = {
        "benchmark": "validate_sim", "kind": kind, "device": device, "date": now(),
        "commit": commit(), "setup": describe(setup, shapes, lengths, page),
        "slo_scales": list(setup.slo_scales), "calibration": calibration, "runs": [],
    }  # fmt: skip

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=float))

    save()
    costs = sim_costs(setup, cost)
    solo = results["solo"] = solo_live(worker, setup, lengths)
    solo["sim"] = {k: solo_sim(setup, lengths, shapes, c, page) for k, c in costs.items()}
    print_solo(setup, solo)
    save()
    base = (np.array(solo["ttft_p95_s"]), np.array(solo["tpot_p95_s"]))
    for rate in setup.rates:
        row = live_side(worker, setup, lengths, rate)
        sim_side(row, setup, lengths, shapes, costs, base, page)
        results["runs"].append(row)
        print_rate(row)
        save()
    worker.close()
    summarise(results)
    results["wall_s"] = time.perf_counter() - started
    save()
    return results


def resimulate(source: Path, traces: Path, out: Path | None, refit: bool = False) -> dict[str, Any]:
    """The simulated side again, against the live runs recorded in `source` (after a
    change to the simulator, say: no device needed). `refit`: fit the calibration again
    to the steps and wakes the run measured (after a change to the cost model)."""
    results = json.loads(source.read_text())
    recorded = results["setup"]
    setup = replace(
        SETUPS[results["kind"]], rates=tuple(recorded["rates"]), seconds=recorded["seconds"],
        slo_scales=tuple(recorded["slo_scales"]), kv_bytes=recorded["kv_bytes"],
    )  # fmt: skip
    lengths = trace_lengths(setup, traces)
    shapes = model_shapes(setup)
    page = recorded["page_size"]
    spec = GPUSpec(**results["calibration"]["ceilings"])
    factors = dict(results["calibration"]["factors"])
    factors["prefill_points"] = tuple(tuple(p) for p in factors["prefill_points"])
    if "map_s_per_gib" not in factors and results["kind"] != "cuda":
        factors["map_s_per_gib"] = 0.0  # not measured before 2026-11-29, and no CPU figure
    calibration = Calibration(**factors)  # (a CUDA run's: the H200 bench_memory figure)
    if refit:
        calibration = refit_calibration(results, setup, shapes, spec, calibration)
        results["calibration"]["factors"] = _factors(calibration)
    cost = CostModel(spec, calibration)
    costs = sim_costs(setup, cost)
    solo = results["solo"]
    solo["sim"] = {k: solo_sim(setup, lengths, shapes, c, page) for k, c in costs.items()}
    print_solo(setup, solo)
    base = (np.array(solo["ttft_p95_s"]), np.array(solo["tpot_p95_s"]))
    for row in results["runs"]:
        sim_side(row, setup, lengths, shapes, costs, base, page)
        print_rate(row)
    summarise(results)
    results["resimulated"] = {"date": now(), "commit": commit()}
    if out is not None:
        out.write_text(json.dumps(results, indent=1, default=float))
    return results


def refit_calibration(
    results: dict[str, Any], setup: Setup, shapes: list[ModelShape], spec: GPUSpec,
    recorded: Calibration,
) -> Calibration:  # fmt: skip
    """`Calibration.fit` again over the samples of a run's fit report (sleeps and KV
    growth were not recorded one by one: their rates stay as fitted then)."""
    by_name = {s.name: s for s in shapes}
    steps = 2 * setup.repeats + 2  # as `measure_model` times them
    samples = Samples()
    for row in results["calibration"]["fit"]:
        shape, size, seconds = by_name[row["model"]], row["size"], row["measured_s"]
        if row["kind"] == "decode":
            kv_tokens = size * (setup.decode_context + 1 + steps // 2)
            samples.decode.append((shape, size, kv_tokens, seconds))
        elif row["kind"] == "prefill":
            samples.prefill.append((shape, size, seconds))
        else:
            samples.wake.append((shape, seconds))
    fitted = Calibration.fit(spec, samples.decode, samples.prefill, samples.wake, [], "")
    return replace(fitted, unmap_s_per_gib=recorded.unmap_s_per_gib,
                   map_s_per_gib=recorded.map_s_per_gib,
                   source=f"{recorded.source}; refitted {now()}")  # fmt: skip


def model_shapes(setup: Setup) -> list[ModelShape]:
    dtype_bytes = setup.dtype.itemsize
    return [ModelShape.from_config(n, c, dtype_bytes) for n, c in setup.models.items()]


def sim_costs(setup: Setup, measured: CostModel) -> dict[str, CostModel]:
    """The calibration measured in the run; on CUDA also the committed H200 one."""
    costs = {"measured": measured}
    if setup.device == "cuda":
        costs["h200-results"] = CostModel.from_results(REPO / "benchmarks" / "results")
    return costs


def describe(
    setup: Setup, shapes: list[ModelShape], lengths: TraceLengths, page: int
) -> dict[str, Any]:
    models = {s.name: {"params": s.params, "weight_bytes": s.weight_bytes,
                       "kv_bytes_per_token": s.kv_bytes_per_token} for s in shapes}  # fmt: skip
    fixed = {k: v for k, v in asdict(setup).items() if k not in ("models", "engine")}
    return {"models": models, "budget_bytes": setup.budget_bytes,
            "weight_bytes": setup.weight_bytes, "page_size": page, "lengths": lengths.name,
            "engine": asdict(setup.engine), **fixed}  # fmt: skip


def summarise(results: dict[str, Any]) -> None:
    results["max_abs_diff_pp"] = largest_diff(results, MAIN)
    results["within_5pp"] = results["max_abs_diff_pp"] <= 5.0


def print_solo(setup: Setup, solo: dict[str, Any]) -> None:
    sim = solo["sim"]["measured"]
    for i, name in enumerate(setup.models):
        print(f"solo {name}: p95 TTFT live {solo['ttft_p95_s'][i] * 1e3:7.1f} ms, sim "
              f"{sim['ttft_p95_s'][i] * 1e3:7.1f} ms; p95 TPOT live "
              f"{solo['tpot_p95_s'][i] * 1e3:6.2f} ms, sim {sim['tpot_p95_s'][i] * 1e3:6.2f} ms",
              flush=True)  # fmt: skip


def print_rate(row: dict[str, Any]) -> None:
    live, sim = row["live"], row["sim"][MAIN]
    print(f"{row['rate']:5.2f} req/s: {row['requests']} requests; finished live "
          f"{live['finished']}, sim {sim['finished']}; wakes/sleeps live {live['wakes']}/"
          f"{live['sleeps']}, sim {sim['wakes']}/{sim['sleeps']}; preemptions live "
          f"{live.get('preemptions', '?')}, sim {sim['preemptions']}", flush=True)  # fmt: skip
    if "rounds" in live:  # recorded since c56bdd1
        print(f"       live worker: {live['rounds']} rounds, host {live['round_host_ms']:.2f} ms "
              f"+ wait {live['round_wait_ms']:.2f} ms a round", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    floats = lambda t: tuple(float(x) for x in t.split(","))  # noqa: E731
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, ~20 s")
    parser.add_argument("--traces", type=Path, default=REPO.parent / "shared" / "traces")
    parser.add_argument("--out", type=Path, help="JSON result (default: benchmarks/results/)")
    parser.add_argument("--rates", type=floats, help="requests/s of the shared runs, comma list")
    parser.add_argument("--seconds", type=float, help="arrivals per shared run")
    parser.add_argument("--slo-scales", type=floats)
    parser.add_argument("--kv-mib", type=float, help="KV memory beside the weights, MiB")
    parser.add_argument(
        "--graph-tokens", type=lambda t: () if t == "none" else tuple(map(int, t.split(","))),
        help="token counts of the CUDA graphs for steps with prefill chunks (default: the "
        "engine's; 'none': layer by layer)",
    )  # fmt: skip
    parser.add_argument("--resim", type=Path, help="simulate again against this result's live runs")
    parser.add_argument("--refit", action="store_true", help="with --resim: fit the costs again")
    args = parser.parse_args()
    if args.resim:
        print_table(resimulate(args.resim, args.traces, args.out, args.refit))
        return
    kind = "smoke" if args.smoke else args.device
    kv = None if args.kv_mib is None else int(args.kv_mib * MiB)
    overrides = {"rates": args.rates, "seconds": args.seconds, "slo_scales": args.slo_scales,
                 "kv_bytes": kv}  # fmt: skip
    setup = replace(SETUPS[kind], **{k: v for k, v in overrides.items() if v is not None})
    if args.graph_tokens is not None:
        setup = replace(setup, engine=replace(setup.engine, cuda_graph_tokens=args.graph_tokens))
    out = args.out or REPO / "benchmarks" / "results" / f"validate_sim_{kind}.json"
    print_table(validate(kind, setup, args.traces, out))


if __name__ == "__main__":
    sys.exit(main())
