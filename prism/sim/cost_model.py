"""Step times of a simulated GPU: decode, prefill, and waking a model.

Each time is a physical floor times a factor measured on real hardware, plus host work:

- decode step  = roofline(bytes read / HBM bandwidth, FLOPs / matmul rate) × decode_overhead
  + step_fixed_s + seq_fixed_s × batch, bytes = weights + the batch's KV cache; the
  roofline is the larger of the two times (a GPU overlaps them) or, where measurements
  say so (a CPU core), their sum;
- prefill      = max(FLOPs / (matmul rate × efficiency(tokens)), layers × eager_layer_s)
  + the same host work, never below the decode time of the same step (a short prompt is
  bound by reading the weights); eager_layer_s is the host's time to launch one layer of
  a step that runs without a CUDA graph (every step with a prefill chunk), which bounds
  small prompts and small models: 0.64-0.74 ms a layer on the H200 host, measured;
- a mixed step (prefill chunk + running decodes, as the engine runs them) = the larger
  of its memory time and its compute time;
- wake         = weight bytes / host→device bandwidth × wake_overhead + wake_fixed_s.

`Calibration.from_results` reads the factors from the H200 benchmark files under
`benchmarks/results/` (decode: overhead and host work per sequence, fitted to the 8B
rows); without them the defaults below are those same measurements. `Calibration.fit`
fits every factor to steps and wakes timed on any device (several models at once), as
`benchmarks/validate_sim.py` does on the device it compares against.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from prism.models.config import ModelConfig
from prism.models.presets import PRESETS

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the cost model needs of a model: sizes, not weights."""

    name: str
    params: int  # every parameter, embedding included (what a wake copies)
    matmul_params: int  # parameters multiplied per token (embedding lookup excluded)
    layers: int
    heads: int  # query heads
    head_dim: int
    kv_bytes_per_token: int  # K and V over all layers
    dtype_bytes: int = 2  # bf16

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @classmethod
    def from_config(cls, name: str, config: ModelConfig, dtype_bytes: int = 2) -> ModelShape:
        params = config.num_parameters
        embedding = config.vocab_size * config.hidden_size
        return cls(
            name=name,
            params=params,
            matmul_params=params - (0 if config.tie_word_embeddings else embedding),
            layers=config.num_layers,
            heads=config.num_heads,
            head_dim=config.head_dim,
            kv_bytes_per_token=2 * config.num_layers * config.kv_size * dtype_bytes,
            dtype_bytes=dtype_bytes,
        )


def _qwen3(hidden: int, inter: int, layers: int, heads: int, tied: bool) -> ModelConfig:
    """Qwen3 shapes beyond the presets (published configs), for a wider model mix."""
    base = PRESETS["qwen3-8b"]
    return replace(
        base,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        tie_word_embeddings=tied,
    )


def _catalogue() -> dict[str, ModelShape]:
    configs = dict(PRESETS)
    configs["qwen3-4b"] = _qwen3(2560, 9728, 36, 32, tied=True)
    configs["qwen3-14b"] = _qwen3(5120, 17408, 40, 40, tied=False)
    return {name: ModelShape.from_config(name, c) for name, c in sorted(configs.items())}


SHAPES: dict[str, ModelShape] = _catalogue()


@dataclass(frozen=True, slots=True)
class GPUSpec:
    """A GPU's ceilings as measured (copy bandwidth, matmul rate), not as advertised."""

    name: str
    memory_bytes: int  # HBM the device reports
    hbm_bytes_per_s: float  # device copy bandwidth, read + write counted (as bench_engine)
    flops_per_s: float  # dense bf16 matmul rate (8192³)
    h2d_bytes_per_s: float  # pinned host→device copy


# Measured on the lent H200 (benchmarks/results/bench_engine_h200.json, bench_worker_h200.json).
H200 = GPUSpec("H200", 143_771 * MiB, 4.1655e12, 7.8508e14, 5.5343e10)
# Not measured here: H100 SXM at the same fractions of its datasheet as the H200 reached
# of its own (4.17/4.8 TB/s, 785/989 TFLOP/s), PCIe 5 host copy as measured on the H200.
H100 = GPUSpec("H100", 81_559 * MiB, 3.35e12 * 4.1655 / 4.8, 7.8508e14, 5.5343e10)
GPUS = {"H200": H200, "H100": H100}


# bench_memory_h200.json (ce399a0): growing a KV cache by 1 GiB of pages, 18.2 ms
KV_MAP_S_PER_GIB = 0.0182


@dataclass(frozen=True, slots=True)
class Calibration:
    """Measured factors between real step times and their physical floors."""

    decode_overhead: float = 1.3540  # engine step / floor, batch 1..128 (8B, ctx 512), fitted
    # prefill achieved / matmul rate, by tokens in the step (8B, CUDA graph): 512, 2048, 8192
    prefill_points: tuple[tuple[int, float], ...] = ((512, 0.811), (2048, 0.814), (8192, 0.732))
    # wake / (bytes / H2D), least-squares slope over 1B, 3B, 8B (the copy runs as the
    # pages map, so a wake is close to the bare copy)
    wake_overhead: float = 1.001
    wake_fixed_s: float = 0.0059  # its intercept: per-wake work that does not scale with bytes
    unmap_s_per_gib: float = 0.0119  # sleep: unmapping 1 GiB of pages (bench_memory shrink)
    # KV growing by 1 GiB of pages (bench_memory grow): the host's time in the worker's
    # loop, as KV shrinking (preemption, trim) costs `unmap_s_per_gib`
    map_s_per_gib: float = KV_MAP_S_PER_GIB
    # Host work of an engine step, whatever the model (scheduling, inputs, sampling), and
    # per sequence in it; the H200 results fit only the latter (one model's rows: a fixed
    # term would take the whole step, see `from_results`).
    step_fixed_s: float = 0.0
    seq_fixed_s: float = 8.955e-06
    # Host time per layer of an eager step (with a prefill chunk, so no CUDA graph): the
    # floor of such a step when launching kernels takes longer than running them.
    eager_layer_s: float = 0.0
    # Host time of a worker round beyond its models' steps (scheduling every model, then
    # launching each): `WorkerStats.round_host_s` / rounds, measured by bench_multimodel
    # and validate_sim on the live worker. Charged once a round. Default: bench_multimodel's
    # prism runs at 8a783c1, eight models, mean over their rounds.
    round_fixed_s: float = 0.000745
    roofline: str = "max"  # decode memory and compute time: "max" (overlapped) or "sum"
    source: str = "defaults (H200 runs of commits 82d2eb1, 8a783c1, ce399a0, dee4692)"
    _tokens: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_tokens", tuple(math.log2(t) for t, _ in self.prefill_points))

    def prefill_efficiency(self, tokens: int) -> float:
        """Fraction of the matmul rate a prefill of `tokens` reaches: piecewise linear in
        log2(tokens) between measured points, flat beyond them."""
        points = self.prefill_points
        x = math.log2(max(tokens, 1))
        i = bisect_right(self._tokens, x)
        if i == 0:
            return points[0][1]
        if i == len(points):
            return points[-1][1]
        x0, x1 = self._tokens[i - 1], self._tokens[i]
        y0, y1 = points[i - 1][1], points[i][1]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)

    @classmethod
    def from_results(cls, results_dir: str | Path) -> Calibration:
        """Factors from the H200 benchmark files (engine, worker, multimodel, memory), where
        present."""
        root = Path(results_dir)
        found: dict[str, Any] = {}
        sources = []
        engine = root / "bench_engine_h200.json"
        if engine.is_file():
            data = json.loads(engine.read_text())
            shape = SHAPES["llama-3.1-8b"]
            # One step at a time, as the worker steps its models (the engine alone runs
            # ahead: `step_ms`, its host work hidden).
            decode = [(shape, r["batch"], r["batch"] * (r["ctx"] + 20),
                       r.get("sync_step_ms", r["step_ms"]) / 1e3)
                      for r in data.get("decode_8b", [])]  # fmt: skip
            if decode:
                # One model's rows: overhead and host work per sequence (a fixed term
                # would take the whole step from this one model, and not carry to others).
                _, overhead, _, per_seq = _fit_decode(
                    gpu_from_results(root), decode, rooflines=("max",), fixed_term=False
                )
                found.update(decode_overhead=overhead, seq_fixed_s=per_seq)
            # Replayed from CUDA graphs, as the engine runs its prefill steps (eager rows
            # only where a file has no graph rows): an eager step's launch moves with the
            # host's load (8B, 512 tokens: 76% of the matmul rate at d527b03, 47% at 82d2eb1).
            rows = data.get("prefill_8b_graph") or data.get("prefill_8b", [])
            prefill = [(r["tokens"], r["of_matmul_rate"]) for r in rows]
            if prefill:
                found["prefill_points"] = tuple(sorted(prefill))
            sources.append(f"{engine.name}@{data.get('commit', '?')}")
        worker = root / "bench_worker_h200.json"
        if worker.is_file():
            data = json.loads(worker.read_text())
            points = [(r["floor_s"], r["wake_s"]) for r in data.get("wake", [])]
            if len(points) >= 2:
                found["wake_overhead"], found["wake_fixed_s"] = _line_fit(points)
            sources.append(f"{worker.name}@{data.get('commit', '?')}")
        multimodel = root / "bench_multimodel_h200.json"
        if multimodel.is_file():
            runs = json.loads(multimodel.read_text()).get("runs", [])
            # the latest call's prism runs (the runs are in the order they were made)
            latest = next((r.get("commit") for r in reversed(runs) if r.get("rounds")), None)
            rows = [r for r in runs if r.get("commit") == latest
                    and r["mode"].startswith("prism") and r.get("rounds")]  # fmt: skip
            if rows:
                rounds = sum(r["rounds"] for r in rows)
                host_ms = sum(r["rounds"] * r["round_host_ms"] for r in rows) / rounds
                found["round_fixed_s"] = host_ms / 1e3
                sources.append(f"{multimodel.name}@{latest}")
        memory = root / "bench_memory_h200.json"
        if memory.is_file():
            data = json.loads(memory.read_text())
            moves = data.get("grow_shrink", {})
            shrink, grow = moves.get("shrink_1gib_ms"), moves.get("grow_1gib_ms")
            if shrink:
                found["unmap_s_per_gib"] = shrink / 1e3
            if grow:
                found["map_s_per_gib"] = grow / 1e3
            if shrink or grow:
                sources.append(f"{memory.name}@{data.get('commit', '?')}")
        if not sources:
            return cls()
        return cls(**found, source=", ".join(sources))

    @classmethod
    def fit(
        cls,
        gpu: GPUSpec,
        decode: Sequence[tuple[ModelShape, int, int, float]],
        prefill: Sequence[tuple[ModelShape, int, float]],
        wake: Sequence[tuple[ModelShape, float]],
        sleep: Sequence[tuple[int, float]],
        source: str,
        kv_map: Sequence[tuple[int, float]] = (),
    ) -> Calibration:
        """Factors fitted to measurements on `gpu` (whose ceilings make the floors):
        decode steps (shape, batch, KV tokens, seconds) → roofline, overhead and host work
        (`_fit_decode`); prefill steps (shape, tokens, seconds) → the eager host floor per
        layer and the efficiency at each token count (`_fit_prefill`); wakes (shape,
        seconds) → copy overhead and fixed time, a line as in `from_results`; sleeps
        (bytes unmapped, seconds) → seconds per GiB; KV growth (bytes mapped, seconds) →
        seconds per GiB (the default when not measured)."""
        roofline, overhead, fixed, per_seq = _fit_decode(gpu, decode)
        eager, points = _fit_prefill(gpu, prefill, fixed + per_seq)
        wake_overhead, wake_fixed = _line_fit(
            [(shape.weight_bytes / gpu.h2d_bytes_per_s, t) for shape, t in wake]
        )
        unmapped = sum(b for b, _ in sleep)
        mapped = sum(b for b, _ in kv_map)
        map_s = sum(t for _, t in kv_map) / (mapped / GiB) if mapped else KV_MAP_S_PER_GIB
        return cls(
            decode_overhead=overhead,
            prefill_points=points,
            wake_overhead=wake_overhead,
            wake_fixed_s=wake_fixed,
            unmap_s_per_gib=sum(t for _, t in sleep) / (unmapped / GiB) if unmapped else 0.0,
            map_s_per_gib=map_s,
            step_fixed_s=fixed,
            seq_fixed_s=per_seq,
            eager_layer_s=eager,
            roofline=roofline,
            source=source,
        )


def _fit_decode(
    gpu: GPUSpec,
    decode: Sequence[tuple[ModelShape, int, int, float]],
    rooflines: Sequence[str] = ("max", "sum"),
    fixed_term: bool = True,
) -> tuple[str, float, float, float]:
    """(roofline, overhead, step_fixed_s, seq_fixed_s) of decode = overhead × floor +
    step_fixed_s + seq_fixed_s × batch: least squares on the relative error, for each
    roofline and with or without each host-work term (`fixed_term=False`: never a
    step_fixed_s); the closest fit with no negative term wins."""
    measured = np.array([t for *_, t in decode])
    batch = np.array([b for _, b, _, _ in decode], dtype=float)
    best: tuple[float, str, dict[int, float]] | None = None
    keeps = ([0], [0, 1], [0, 2], [0, 1, 2]) if fixed_term else ([0], [0, 2])
    for roofline in rooflines:
        floors = CostModel(
            gpu, Calibration(decode_overhead=1.0, seq_fixed_s=0.0, roofline=roofline)
        )
        floor = np.array([floors.decode_s(s, b, kv) for s, b, kv, _ in decode])
        columns = np.stack([floor, np.ones_like(floor), batch], axis=1) / measured[:, None]
        for keep in keeps:
            coef = np.linalg.lstsq(columns[:, keep], np.ones(len(decode)), rcond=None)[0]
            error = float(np.sum((columns[:, keep] @ coef - 1.0) ** 2))
            if (coef >= 0).all() and (best is None or error < best[0]):
                best = (error, roofline, dict(zip(keep, coef.tolist(), strict=True)))
    assert best is not None, "no decode samples"
    _, roofline, terms = best
    return roofline, terms[0], terms.get(1, 0.0), terms.get(2, 0.0)


def _fit_prefill(
    gpu: GPUSpec, prefill: Sequence[tuple[ModelShape, int, float]], host_s: float
) -> tuple[float, tuple[tuple[int, float], ...]]:
    """(eager_layer_s, prefill_points) of prefill = max(FLOPs / (rate × efficiency),
    layers × eager_layer_s) + host_s. Each candidate floor (none, or the one that one
    sample's time would give) splits the samples into host-bound ones (at or under the
    floor) and compute-bound ones, whose mean efficiency per token count it takes (a token
    count with none gets the efficiency that just fits under the floor); the candidate
    whose model is closest to every sample wins, the smallest on a tie."""
    flops = CostModel(gpu)
    rows = []
    for shape, tokens, seconds in prefill:
        compute_s = flops.prefill_flops(shape, tokens) / gpu.flops_per_s
        # host work never takes more than 90% of a step (a noisy fit could say so)
        rows.append((shape.layers, tokens, compute_s, max(seconds - host_s, 0.1 * seconds)))
    candidates = sorted({0.0} | {work / layers for layers, _, _, work in rows})
    best: tuple[float, float, tuple[tuple[int, float], ...]] | None = None
    for eager in candidates:
        bound = [layers * eager >= work * (1 - 1e-9) for layers, _, _, work in rows]
        efficiency: dict[int, list[float]] = {}
        for (_, tokens, compute_s, work), host_bound in zip(rows, bound, strict=True):
            if not host_bound:
                efficiency.setdefault(tokens, []).append(compute_s / work)
        for tokens in {t for _, t, _, _ in rows} - efficiency.keys():
            efficiency[tokens] = [max(c / w for _, t, c, w in rows if t == tokens)]
        means = {t: sum(e) / len(e) for t, e in efficiency.items()}
        error = sum(
            (max(compute_s / means[tokens], layers * eager) / work - 1.0) ** 2
            for layers, tokens, compute_s, work in rows
        )
        if best is None or error < best[0] - 1e-12:
            best = (error, eager, tuple(sorted(means.items())))
    assert best is not None, "no prefill samples"
    return best[1], best[2]


def _line_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope and intercept of y over x."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, max(0.0, my - slope * mx)


def gpu_from_results(results_dir: str | Path, base: GPUSpec = H200) -> GPUSpec:
    """`base` with the ceilings measured in the H200 result files, where present."""
    root = Path(results_dir)
    spec = base
    engine = root / "bench_engine_h200.json"
    if engine.is_file():
        ceil = json.loads(engine.read_text()).get("ceilings", {})
        spec = replace(
            spec,
            hbm_bytes_per_s=ceil.get("copy_bytes_per_s", spec.hbm_bytes_per_s),
            flops_per_s=ceil.get("bf16_flops_per_s", spec.flops_per_s),
        )
    worker = root / "bench_worker_h200.json"
    if worker.is_file():
        h2d = json.loads(worker.read_text()).get("h2d_bytes_per_s")
        spec = replace(spec, h2d_bytes_per_s=h2d or spec.h2d_bytes_per_s)
    return spec


@dataclass(frozen=True, slots=True)
class CostModel:
    """Step times for one kind of GPU."""

    gpu: GPUSpec = H200
    calibration: Calibration = field(default_factory=Calibration)

    @classmethod
    def from_results(cls, results_dir: str | Path, gpu: GPUSpec = H200) -> CostModel:
        """H200 ceilings and factors from the benchmark files (only the factors for another
        GPU: its ceilings stay as given)."""
        spec = gpu_from_results(results_dir, gpu) if gpu.name == "H200" else gpu
        return cls(spec, Calibration.from_results(results_dir))

    def decode_s(self, shape: ModelShape, batch: int, kv_tokens: int) -> float:
        """One decode step of `batch` sequences holding `kv_tokens` tokens of KV in all."""
        if batch <= 0:
            return 0.0
        memory = (
            shape.weight_bytes + kv_tokens * shape.kv_bytes_per_token
        ) / self.gpu.hbm_bytes_per_s
        compute = 2.0 * shape.matmul_params * batch / self.gpu.flops_per_s
        c = self.calibration
        floor = memory + compute if c.roofline == "sum" else max(memory, compute)
        return floor * c.decode_overhead + c.step_fixed_s + c.seq_fixed_s * batch

    def prefill_flops(self, shape: ModelShape, tokens: int, offset: int = 0) -> float:
        """Matmuls plus causal attention of a chunk of `tokens` after `offset` cached ones."""
        attention = (
            2.0 * shape.layers * shape.heads * shape.head_dim * tokens * (2 * offset + tokens)
        )
        return 2.0 * shape.matmul_params * tokens + attention

    def prefill_s(
        self, shape: ModelShape, tokens: int, offset: int = 0, graph_rows: int = 0
    ) -> float:
        """A prefill step alone: one chunk of `tokens` prompt tokens (replayed from a
        graph of `graph_rows` tokens, or eager if 0)."""
        flops = self.prefill_flops(shape, tokens, offset)
        return self.step_s(shape, 0, 0, tokens, flops, graph_rows=graph_rows)

    def step_s(
        self,
        shape: ModelShape,
        batch: int,
        kv_tokens: int,
        prefill_tokens: int,
        prefill_flops: float,
        prefill_seqs: int = 1,
        graph_rows: int = 0,
    ) -> float:
        """A mixed step: `batch` decodes over `kv_tokens` of KV plus prefill chunks of
        `prefill_seqs` prompts, `prefill_tokens` tokens in all, costing `prefill_flops`
        (see `prefill_flops`). Replayed from a CUDA graph of `graph_rows` tokens (the
        engine's next captured size up), every row runs the matmuls, padding included;
        eager (0), the step runs its own rows but its layers are launched from the host."""
        decode = self.decode_s(shape, max(batch, 1), kv_tokens)
        if prefill_tokens <= 0:
            return decode if batch > 0 else 0.0
        c = self.calibration
        rows = max(graph_rows, batch + prefill_tokens)
        flops = prefill_flops + 2.0 * shape.matmul_params * (rows - prefill_tokens)
        efficiency = c.prefill_efficiency(rows if graph_rows else prefill_tokens)
        compute = flops / (self.gpu.flops_per_s * efficiency)
        eager = 0.0 if graph_rows else shape.layers * c.eager_layer_s  # launched per kernel
        host = c.step_fixed_s + c.seq_fixed_s * (batch + prefill_seqs)
        return max(decode, max(compute, eager) + host)

    def wake_s(self, shape: ModelShape) -> float:
        """Map the weights' pages and copy them from pinned host memory."""
        floor = shape.weight_bytes / self.gpu.h2d_bytes_per_s
        return floor * self.calibration.wake_overhead + self.calibration.wake_fixed_s

    def sleep_s(self, pages_bytes: int) -> float:
        """Unmap a sleeping model's pages (the worker does it in its loop)."""
        return pages_bytes / GiB * self.calibration.unmap_s_per_gib

    def kv_moves_s(self, mapped_bytes: int, unmapped_bytes: int) -> float:
        """Map and unmap KV pages as caches grow and shrink (the worker's loop does it)."""
        return mapped_bytes / GiB * self.calibration.map_s_per_gib + self.sleep_s(unmapped_bytes)

    def migrate_s(self, shape: ModelShape) -> float:
        """Moving a model to another GPU: a wake there (the host copy is shared)."""
        return self.wake_s(shape)
