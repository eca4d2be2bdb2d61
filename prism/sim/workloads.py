"""Request streams for the simulator: synthetic bursty groups and the real traces.

A `Workload` is a list of `RequestSpec` sorted by arrival, over models numbered
0..num_models-1. Every generator is deterministic for its seed: each model draws from
its own `numpy` generator spawned from (seed, model), so adding a model does not change
the others' streams.

- `bursty_groups`: gamma inter-arrivals with a chosen CV, power-law (Zipf) popularity,
  models in groups of which a few are hot at a time; the hot set rotates every period.
- `servegen`: ServeGen per-client rate windows (600 s, rate and CV each) of one or more
  categories; the busiest N clients become the N simulated models (`mapping="top"`), or
  every client is dealt onto the N models by volume rank (`mapping="fold"`: all of the
  trace's load is kept, each model a sum of clients).
- `azure_trace`: the Azure LLM 2023 code trace's arrivals and lengths, one request
  stream split over N models by power-law popularity.
- Lengths: `SyntheticLengths` (log-normal), or `TraceLengths` drawn from the Azure LLM
  2023 or Mooncake FAST'25 traces.

Load scaling: `rate_scale` multiplies every rate (same burstiness); `replicas` runs
that many independent copies of every arrival process and adds them up (the load of k
clients like this one: k× the rate, burstiness of a superposition, CV / √k); `time_scale`
stretches the timeline (0.1 makes a rate pattern change ten times as fast). For the
recorded Azure trace `rate_scale` and `time_scale` both act on the timestamps, and a
replica is the trace again, shifted in time by a fraction of its span, with models drawn
anew.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

DEFAULT_TRACES = Path("../shared/traces")  # relative to the repository root
SERVEGEN_WINDOW_S = 600.0


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request as the workload states it; the simulator adds what happens to it."""

    id: int
    model: int
    arrival: float  # seconds from the start of the run
    prompt_tokens: int
    output_tokens: int  # tokens to generate, the first included


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    num_models: int
    duration_s: float
    requests: list[RequestSpec] = field(repr=False)

    def rates(self) -> list[float]:
        """Mean request rate of each model over the run."""
        counts = [0] * self.num_models
        for r in self.requests:
            counts[r.model] += 1
        return [c / self.duration_s for c in counts]

    @property
    def total_rate(self) -> float:
        return len(self.requests) / self.duration_s

    def only(self, models: Sequence[int]) -> Workload:
        """The requests of `models`, renumbered 0..len(models)-1 in the given order."""
        index = {m: i for i, m in enumerate(models)}
        kept = [r for r in self.requests if r.model in index]
        requests = [
            RequestSpec(i, index[r.model], r.arrival, r.prompt_tokens, r.output_tokens)
            for i, r in enumerate(kept)
        ]
        return Workload(self.name, len(models), self.duration_s, requests)


# ---- lengths ----------------------------------------------------------------------------


class Lengths(Protocol):
    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """`n` (prompt tokens, output tokens) pairs, as two int arrays."""
        ...


@dataclass(frozen=True, slots=True)
class SyntheticLengths:
    """Log-normal prompt and output lengths with the given means and CV."""

    prompt_mean: float = 1024.0
    output_mean: float = 256.0
    cv: float = 1.0
    max_tokens: int = 8192  # prompt + output never exceed this (the model's context)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        prompts = _lognormal(rng, self.prompt_mean, self.cv, n)
        outputs = _lognormal(rng, self.output_mean, self.cv, n)
        return _cap(prompts, outputs, self.max_tokens)


@dataclass(frozen=True, slots=True)
class TraceLengths:
    """(prompt, output) pairs drawn with replacement from a recorded trace."""

    name: str
    prompts: tuple[int, ...] = field(repr=False)
    outputs: tuple[int, ...] = field(repr=False)
    max_tokens: int = 8192

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        pick = rng.integers(0, len(self.prompts), n)
        prompts = np.asarray(self.prompts)[pick]
        outputs = np.asarray(self.outputs)[pick]
        return _cap(prompts, outputs, self.max_tokens)


def _lognormal(rng: np.random.Generator, mean: float, cv: float, n: int) -> np.ndarray:
    sigma2 = math.log1p(cv * cv)
    return rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2), n)


def _cap(
    prompts: np.ndarray, outputs: np.ndarray, max_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """At least one token each; a prompt keeps room for at least one output token."""
    p = np.clip(np.rint(prompts).astype(np.int64), 1, max_tokens - 1)
    o = np.clip(np.rint(outputs).astype(np.int64), 1, None)
    return p, np.minimum(o, max_tokens - p)


def azure_lengths(traces: str | Path = DEFAULT_TRACES, max_tokens: int = 8192) -> TraceLengths:
    """Context and generated tokens of the Azure LLM 2023 code trace (CC-BY 4.0,
    Patel et al., "Splitwise", ISCA 2024)."""
    rows = _azure_rows(traces)
    return TraceLengths(
        "azure-2023", tuple(r[1] for r in rows), tuple(r[2] for r in rows), max_tokens
    )


def mooncake_lengths(traces: str | Path = DEFAULT_TRACES, max_tokens: int = 32768) -> TraceLengths:
    """Input and output lengths of the Mooncake FAST'25 synthetic trace (Apache-2.0,
    Qin et al., "Mooncake", FAST 2025); long prompts are capped at `max_tokens`."""
    path = Path(traces) / "mooncake-fast25" / "synthetic_trace.jsonl"
    prompts, outputs = [], []
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            prompts.append(int(row["input_length"]))
            outputs.append(int(row["output_length"]))
    return TraceLengths("mooncake-fast25", tuple(prompts), tuple(outputs), max_tokens)


def _azure_rows(traces: str | Path) -> list[tuple[float, int, int]]:
    """(seconds since the first request, context tokens, generated tokens)."""
    path = Path(traces) / "azure-llm-2023" / "AzureLLMInferenceTrace_code.csv"
    rows = []
    with path.open() as f:
        reader = csv.reader(f)
        next(reader)
        for stamp, context, generated in reader:
            # "2023-11-16 18:17:03.9799600": seven fractional digits; datetime takes six
            when = datetime.fromisoformat(stamp[:26]).timestamp()
            rows.append((when, int(context), int(generated)))
    start = rows[0][0]
    return [(t - start, c, g) for t, c, g in rows]


# ---- arrivals ---------------------------------------------------------------------------


def gamma_arrivals(
    rng: np.random.Generator, rate: float, cv: float, start: float, end: float
) -> np.ndarray:
    """Arrival times in [start, end) of a gamma renewal process (mean rate `rate`,
    inter-arrival CV `cv`); the first gap is a fraction of a full one, so a process
    restarted at every window does not bunch arrivals at window starts."""
    if rate <= 0 or end <= start:
        return np.empty(0)
    shape = 1.0 / max(cv, 1e-3) ** 2
    scale = 1.0 / (rate * shape)
    expected = rate * (end - start)
    times: list[np.ndarray] = []
    now = start - rng.random() * rng.gamma(shape, scale)
    while now < end:
        gaps = rng.gamma(shape, scale, int(expected * 1.2) + 16)
        chunk = now + np.cumsum(gaps)
        times.append(chunk)
        now = float(chunk[-1])
    out = np.concatenate(times)
    return out[(out >= start) & (out < end)]


def replicated_arrivals(
    rng: np.random.Generator, rate: float, cv: float, start: float, end: float, replicas: int
) -> np.ndarray:
    """The superposition of `replicas` independent gamma processes (sorted)."""
    if replicas == 1:
        return gamma_arrivals(rng, rate, cv, start, end)
    copies = [gamma_arrivals(rng, rate, cv, start, end) for _ in range(replicas)]
    return np.sort(np.concatenate(copies))


def _model_rngs(seed: int, num_models: int) -> list[np.random.Generator]:
    return [np.random.default_rng([seed, m]) for m in range(num_models)]


def zipf_weights(num_models: int, alpha: float) -> np.ndarray:
    """Popularity share of model i ∝ 1 / (i + 1)^alpha, summing to 1."""
    w = 1.0 / np.arange(1, num_models + 1) ** alpha
    return w / w.sum()


def _build(
    name: str,
    num_models: int,
    duration_s: float,
    arrivals: list[np.ndarray],
    lengths: Lengths | Sequence[Lengths],
    rngs: list[np.random.Generator],
) -> Workload:
    """Attach lengths (one for all, or one per model) to each model's arrivals and merge
    them into one sorted list."""
    per_model = list(lengths) if isinstance(lengths, Sequence) else [lengths] * num_models
    times, models, prompts, outputs = [], [], [], []
    for m, t in enumerate(arrivals):
        p, o = per_model[m].sample(rngs[m], len(t))
        times.append(t)
        models.append(np.full(len(t), m))
        prompts.append(p)
        outputs.append(o)
    if not times:
        return Workload(name, num_models, duration_s, [])
    t_all = np.concatenate(times)
    m_all = np.concatenate(models)
    p_all = np.concatenate(prompts)
    o_all = np.concatenate(outputs)
    order = np.lexsort((m_all, t_all))  # by time, ties by model: deterministic
    requests = [
        RequestSpec(i, int(m), float(t), int(p), int(o))
        for i, (t, m, p, o) in enumerate(
            zip(t_all[order], m_all[order], p_all[order], o_all[order], strict=True)
        )
    ]
    return Workload(name, num_models, duration_s, requests)


def bursty_groups(
    num_models: int,
    duration_s: float,
    total_rate: float,
    *,
    cv: float = 2.0,
    alpha: float = 1.0,
    group_size: int = 4,
    hot_groups: int = 1,
    hot_share: float = 0.5,
    period_s: float = 300.0,
    lengths: Lengths | None = None,
    rate_scale: float = 1.0,
    time_scale: float = 1.0,
    replicas: int = 1,
    seed: int = 0,
) -> Workload:
    """Bursty groups of models: a base of Zipf(alpha) popularity carrying
    (1 - hot_share) of `total_rate`, and `hot_groups` groups of `group_size` models
    sharing `hot_share` of it, drawn anew every `period_s` (a rotating hot set).
    Each model's arrivals in a period: `replicas` gamma processes of that rate, summed."""
    lengths = lengths or SyntheticLengths()
    rate = total_rate * rate_scale
    period = period_s * time_scale
    base = zipf_weights(num_models, alpha) * (1.0 - hot_share) * rate
    num_groups = max(1, math.ceil(num_models / group_size))
    hot = min(hot_groups, num_groups)
    schedule = np.random.default_rng([seed, 1 << 20])  # which groups are hot when
    rngs = _model_rngs(seed, num_models)
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_models)]
    for start in np.arange(0.0, duration_s, period):
        end = min(start + period, duration_s)
        hot_models = _hot_models(schedule, num_groups, hot, group_size, num_models)
        boost = hot_share * rate / max(len(hot_models), 1)
        for m in range(num_models):
            r = base[m] + (boost if m in hot_models else 0.0)
            chunks[m].append(
                replicated_arrivals(rngs[m], r, cv, float(start), float(end), replicas)
            )
    arrivals = [np.concatenate(c) if c else np.empty(0) for c in chunks]
    return _build("bursty-groups", num_models, duration_s, arrivals, lengths, rngs)


def bursty_fleet(
    num_models: int,
    duration_s: float,
    total_rate: float,
    *,
    block: int = 58,
    seed: int = 0,
    **kwargs: Any,
) -> Workload:
    """Many independent bursty groups: models in blocks of `block` (the last one smaller),
    each block a `bursty_groups` workload with its own seed and a share of `total_rate`
    proportional to its size. A large fleet then has the per-model rates of a small one
    (one Zipf over 1,000 models would give its top model 1/H(1000) of everything)."""
    parts = []
    for k, first in enumerate(range(0, num_models, block)):
        size = min(block, num_models - first)
        rate = total_rate * size / num_models
        parts.append((first, bursty_groups(size, duration_s, rate, seed=seed + k, **kwargs)))
    if len(parts) == 1:
        return parts[0][1]
    merged = sorted(
        ((r.arrival, first + r.model, r.prompt_tokens, r.output_tokens) for first, w in parts
         for r in w.requests),
        key=lambda r: (r[0], r[1]),
    )  # fmt: skip
    requests = [RequestSpec(i, m, t, p, o) for i, (t, m, p, o) in enumerate(merged)]
    return Workload("bursty-fleet", num_models, duration_s, requests)


def _hot_models(
    rng: np.random.Generator, num_groups: int, hot: int, group_size: int, num_models: int
) -> set[int]:
    groups = rng.choice(num_groups, size=hot, replace=False)
    return {m for g in groups for m in range(g * group_size, min((g + 1) * group_size, num_models))}


@dataclass(frozen=True, slots=True)
class Stream:
    """One model's steady traffic: a gamma process and the lengths of its requests."""

    rate: float  # requests per second
    lengths: Lengths
    cv: float = 1.0  # inter-arrival CV (1: Poisson)


def steady_streams(
    streams: Sequence[Stream],
    duration_s: float,
    *,
    rate_scale: float = 1.0,
    replicas: int = 1,
    seed: int = 0,
    name: str = "steady",
) -> Workload:
    """Model i receives `streams[i]` for the whole run: always-busy models, each with its
    own rate and request shape (prefill-heavy, decode-heavy, ...)."""
    rngs = _model_rngs(seed, len(streams))
    arrivals = [
        replicated_arrivals(rngs[m], s.rate * rate_scale, s.cv, 0.0, duration_s, replicas)
        for m, s in enumerate(streams)
    ]
    lengths = [s.lengths for s in streams]
    return _build(name, len(streams), duration_s, arrivals, lengths, rngs)


@dataclass(frozen=True, slots=True)
class RateWindows:
    """One client's piecewise-constant rate: window starts, rates and CVs."""

    starts: np.ndarray  # seconds
    rates: np.ndarray  # requests per second
    cvs: np.ndarray

    def total(self, start: float, end: float, window: float) -> float:
        inside = (self.starts >= start) & (self.starts < end)
        return float(self.rates[inside].sum() * window)


def read_servegen_client(path: Path) -> RateWindows:
    """A ServeGen `chunk-*-trace.csv`: window_start, rate, cv, pattern, arg1, arg2 (no
    header). Rows repeating a window are added (their rates sum)."""
    by_start: dict[float, tuple[float, float]] = {}
    with path.open() as f:
        for row in csv.reader(f):
            if not row:
                continue
            start, rate, cv = float(row[0]), float(row[1]), float(row[2] or 1.0)
            old_rate, old_cv = by_start.get(start, (0.0, 0.0))
            total = old_rate + rate
            mixed = (old_rate * old_cv + rate * cv) / total if total > 0 else 1.0
            by_start[start] = (total, mixed)
    starts = np.array(sorted(by_start))
    rates = np.array([by_start[s][0] for s in starts])
    cvs = np.array([by_start[s][1] for s in starts])
    return RateWindows(starts, rates, cvs)


def servegen(
    num_models: int,
    duration_s: float,
    *,
    traces: str | Path = DEFAULT_TRACES,
    category: str | Sequence[str] = "language/m-large",
    mapping: str = "top",
    start_s: float = 0.0,
    lengths: Lengths | None = None,
    rate_scale: float = 1.0,
    time_scale: float = 1.0,
    replicas: int = 1,
    seed: int = 0,
) -> Workload:
    """ServeGen rate windows (Apache-2.0, Xiang et al., arXiv 2505.09999) of one or more
    categories (e.g. "language/m-large" or ["language/m-mid", "reason/deepseek-r1"]).
    Clients are ranked by their volume over the run; `mapping="top"`: the `num_models`
    busiest become models 0..N-1, busiest first (the rest are left out); `"fold"`: client
    of rank r goes to model r mod N, so every client's load is kept. Sim time t reads the
    trace at start_s + t / time_scale."""
    categories = [category] if isinstance(category, str) else list(category)
    clients = [read_servegen_client(p) for c in categories for p in _servegen_files(traces, c)]
    trace_end = start_s + duration_s / time_scale
    volume = [c.total(start_s, trace_end, SERVEGEN_WINDOW_S) for c in clients]
    ranked = sorted(range(len(clients)), key=lambda i: (-volume[i], i))
    if mapping == "top":
        groups = [[c] for c in ranked[:num_models]]
    elif mapping == "fold":
        groups = [ranked[m::num_models] for m in range(num_models)]
    else:
        raise ValueError(f"mapping must be 'top' or 'fold', got {mapping!r}")
    rngs = _model_rngs(seed, num_models)
    arrivals = []
    for m, group in enumerate(groups):
        parts = [
            _windowed_arrivals(
                rngs[m], clients[c], start_s, duration_s, rate_scale, time_scale, replicas
            )
            for c in group
        ]
        arrivals.append(np.sort(np.concatenate(parts)) if parts else np.empty(0))
    arrivals += [np.empty(0)] * (num_models - len(arrivals))  # fewer clients than models
    lengths = lengths or SyntheticLengths()
    name = f"servegen:{'+'.join(categories)}:{mapping}"
    return _build(name, num_models, duration_s, arrivals, lengths, rngs)


def _servegen_files(traces: str | Path, category: str) -> list[Path]:
    folder = Path(traces) / "servegen" / "data" / category
    files = sorted(folder.glob("chunk-*-trace.csv"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        raise FileNotFoundError(f"no ServeGen client traces under {folder}")
    return files


def _windowed_arrivals(
    rng: np.random.Generator,
    client: RateWindows,
    start_s: float,
    duration_s: float,
    rate_scale: float,
    time_scale: float,
    replicas: int = 1,
) -> np.ndarray:
    chunks = []
    for w_start, rate, cv in zip(client.starts, client.rates, client.cvs, strict=True):
        lo = (w_start - start_s) * time_scale
        hi = lo + SERVEGEN_WINDOW_S * time_scale
        if hi <= 0 or lo >= duration_s or rate <= 0:
            continue
        lo, hi = max(lo, 0.0), min(hi, duration_s)
        chunks.append(replicated_arrivals(rng, rate * rate_scale, cv, lo, hi, replicas))
    return np.concatenate(chunks) if chunks else np.empty(0)


def azure_trace(
    num_models: int,
    *,
    traces: str | Path = DEFAULT_TRACES,
    alpha: float = 1.0,
    duration_s: float | None = None,
    max_tokens: int = 8192,
    rate_scale: float = 1.0,
    time_scale: float = 1.0,
    replicas: int = 1,
    seed: int = 0,
) -> Workload:
    """The Azure LLM 2023 code trace (one service, ~1 h, ~2.6 req/s) with its own
    lengths; each request goes to a model drawn by Zipf(alpha) popularity. The timeline
    is stretched by time_scale / rate_scale (and cut at `duration_s`). Replica j > 0 is
    the trace shifted (circularly, over its span) by j / replicas of the span, its
    requests drawn to models anew."""
    rows = _azure_rows(traces)
    stretch = time_scale / rate_scale
    span = rows[-1][0] + 1e-6
    rng = np.random.default_rng([seed, 1 << 21])
    popularity = zipf_weights(num_models, alpha)
    end = duration_s if duration_s is not None else span * stretch
    drawn: list[tuple[float, int, int, int]] = []
    for j in range(replicas):
        models = rng.choice(num_models, size=len(rows), p=popularity)
        shift = span * j / replicas
        for (t, context, generated), m in zip(rows, models, strict=True):
            when = ((t + shift) % span) * stretch
            if when < end:
                prompt = min(max(context, 1), max_tokens - 1)
                output = min(max(generated, 1), max_tokens - prompt)
                drawn.append((when, int(m), prompt, output))
    drawn.sort(key=lambda r: (r[0], r[1]))  # stable: ties keep their draw order
    requests = [RequestSpec(i, m, t, p, o) for i, (t, m, p, o) in enumerate(drawn)]
    return Workload("azure-2023", num_models, end, requests)
