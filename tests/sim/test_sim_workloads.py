"""Workloads: deterministic for a seed, the rates and burstiness asked for, trace adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prism.sim.workloads import (
    Stream,
    SyntheticLengths,
    Workload,
    azure_lengths,
    azure_trace,
    bursty_fleet,
    bursty_groups,
    gamma_arrivals,
    mooncake_lengths,
    replicated_arrivals,
    servegen,
    steady_streams,
    zipf_weights,
)


def _key(w: Workload) -> list[tuple[int, float, int, int]]:
    return [(r.model, r.arrival, r.prompt_tokens, r.output_tokens) for r in w.requests]


def test_bursty_groups_is_deterministic_for_a_seed() -> None:
    """Same seed, same requests; another seed, others."""
    a = bursty_groups(12, 600, 5.0, seed=3)
    b = bursty_groups(12, 600, 5.0, seed=3)
    c = bursty_groups(12, 600, 5.0, seed=4)
    assert _key(a) == _key(b)
    assert _key(a) != _key(c)


def test_bursty_groups_rate_and_order() -> None:
    """Arrivals sorted, ids in order, mean total rate as asked (±5%), rate_scale scales it."""
    w = bursty_groups(20, 3600, 10.0, seed=1)
    arrivals = [r.arrival for r in w.requests]
    assert arrivals == sorted(arrivals)
    assert [r.id for r in w.requests] == list(range(len(w.requests)))
    assert w.total_rate == pytest.approx(10.0, rel=0.05)
    doubled = bursty_groups(20, 3600, 10.0, seed=1, rate_scale=2.0)
    assert doubled.total_rate == pytest.approx(20.0, rel=0.05)


def test_hot_set_rotates() -> None:
    """With all traffic on one hot group, the busy models change from period to period."""
    w = bursty_groups(16, 1200, 8.0, group_size=4, hot_share=1.0, period_s=300, seed=2)
    busy = []
    for start in range(0, 1200, 300):
        models = {r.model for r in w.requests if start <= r.arrival < start + 300}
        assert len(models) <= 4
        busy.append(frozenset(models))
    assert len(set(busy)) > 1


def test_gamma_arrivals_have_the_asked_cv() -> None:
    """Inter-arrival CV and rate of a long gamma process match the parameters."""
    rng = np.random.default_rng(0)
    for cv in (0.5, 1.0, 3.0):
        t = gamma_arrivals(rng, 50.0, cv, 0.0, 4000.0)
        gaps = np.diff(t)
        assert len(t) / 4000.0 == pytest.approx(50.0, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_zipf_popularity() -> None:
    w = zipf_weights(10, 1.0)
    assert w.sum() == pytest.approx(1.0) and all(np.diff(w) < 0)


def test_synthetic_lengths_respect_the_context() -> None:
    """Prompt + output never exceed max_tokens; both at least one token."""
    p, o = SyntheticLengths(2000, 1000, 2.0, max_tokens=2048).sample(np.random.default_rng(0), 5000)
    assert (p >= 1).all() and (o >= 1).all() and (p + o <= 2048).all()


def test_servegen_maps_busiest_clients(traces: Path) -> None:
    """N models from the busiest clients (model 0 busiest), deterministic, time-scaled."""
    w = servegen(6, 1800, traces=traces, category="reason/deepseek-r1", seed=1)
    assert w.num_models == 6 and w.requests
    rates = w.rates()
    assert rates[0] == max(rates)
    assert _key(w) == _key(servegen(6, 1800, traces=traces, category="reason/deepseek-r1", seed=1))
    fast = servegen(6, 1800, traces=traces, category="reason/deepseek-r1", seed=1, time_scale=0.5)
    assert fast.requests and _key(fast) != _key(w)


def test_azure_trace_and_lengths(traces: Path) -> None:
    """The Azure code trace: ~2.6 req/s over ~1 h; rate_scale compresses the timeline."""
    w = azure_trace(5, traces=traces, seed=0)
    assert len(w.requests) == 8819
    assert w.total_rate == pytest.approx(2.57, rel=0.05)
    twice = azure_trace(5, traces=traces, seed=0, rate_scale=2.0, duration_s=600)
    assert len(twice.requests) == sum(1 for r in w.requests if r.arrival < 1200)
    lengths = azure_lengths(traces)
    assert np.mean(lengths.prompts) == pytest.approx(2048, rel=0.05)


def test_mooncake_lengths_are_capped(traces: Path) -> None:
    """Mooncake's long prompts are cut to max_tokens (minus room for the output)."""
    lengths = mooncake_lengths(traces, max_tokens=16384)
    p, o = lengths.sample(np.random.default_rng(0), 1000)
    assert (p + o <= 16384).all() and p.mean() > 8000


def test_only_renumbers_models() -> None:
    w = bursty_groups(8, 300, 4.0, seed=0)
    sub = w.only([5, 2])
    assert sub.num_models == 2
    assert sorted({r.model for r in sub.requests}) <= [0, 1]
    assert len(sub.requests) == sum(1 for r in w.requests if r.model in (5, 2))


def test_replicas_add_independent_copies() -> None:
    """k replicas: k times the rate, and the CV of a superposition (CV / sqrt(k) for
    a renewal process over long windows: measured on counts per window)."""
    rng = np.random.default_rng(0)
    one = gamma_arrivals(rng, 5.0, 3.0, 0.0, 20_000.0)
    four = replicated_arrivals(rng, 5.0, 3.0, 0.0, 20_000.0, 4)
    assert len(four) / len(one) == pytest.approx(4.0, rel=0.05)
    assert (np.diff(four) >= 0).all()
    counts = [np.histogram(t, bins=np.arange(0, 20_001, 50.0))[0] for t in (one, four)]
    cv_one, cv_four = (c.std() / c.mean() for c in counts)
    assert cv_four == pytest.approx(cv_one / 2, rel=0.2)
    w = bursty_groups(6, 600, 3.0, seed=2, replicas=3)
    assert w.total_rate == pytest.approx(9.0, rel=0.1)


def test_azure_replicas_shift_the_trace(traces: Path) -> None:
    """Two replicas: twice the requests over the same span, still sorted, ids in order."""
    one = azure_trace(5, traces=traces, seed=0)
    two = azure_trace(5, traces=traces, seed=0, replicas=2)
    assert len(two.requests) == 2 * len(one.requests)
    assert two.duration_s == pytest.approx(one.duration_s)
    arrivals = [r.arrival for r in two.requests]
    assert arrivals == sorted(arrivals) and arrivals[-1] < two.duration_s
    assert [r.id for r in two.requests] == list(range(len(two.requests)))


def test_servegen_fold_keeps_every_client(traces: Path) -> None:
    """`fold` deals all clients of several categories onto the models: more load than
    the busiest N alone, and about the sum of every client's windows."""
    cats = ["reason/deepseek-r1", "multimodal/mm-image"]
    top = servegen(4, 3600, traces=traces, category=cats, seed=0)
    fold = servegen(4, 3600, traces=traces, category=cats, mapping="fold", seed=0)
    assert fold.name.endswith(":fold") and fold.num_models == 4
    assert len(fold.requests) > len(top.requests)
    with pytest.raises(ValueError, match="mapping"):
        servegen(4, 600, traces=traces, category=cats, mapping="spread")


def test_steady_streams_give_each_model_its_shape() -> None:
    """Per-model rate and lengths: a prefill-heavy and a decode-heavy stream."""
    w = steady_streams(
        [
            Stream(4.0, SyntheticLengths(4096, 8, 0.1)),
            Stream(1.0, SyntheticLengths(256, 1024, 0.1)),
        ],
        1200,
        seed=0,
    )
    rates = w.rates()
    assert rates[0] == pytest.approx(4.0, rel=0.1) and rates[1] == pytest.approx(1.0, rel=0.15)
    prompts = [np.mean([r.prompt_tokens for r in w.requests if r.model == m]) for m in (0, 1)]
    assert prompts[0] > 3000 and prompts[1] < 400


def test_bursty_fleet_is_blocks_of_groups() -> None:
    """130 models in blocks of 58: the rate shared by block size, models renumbered, and
    the first block is the 58-model workload of the same seed at its share of the rate."""
    fleet = bursty_fleet(130, 600, 26.0, seed=3)
    assert fleet.num_models == 130
    assert fleet.total_rate == pytest.approx(26.0, rel=0.1)
    assert {r.model for r in fleet.requests} <= set(range(130))
    first = bursty_groups(58, 600, 26.0 * 58 / 130, seed=3)
    key = [(r.model, r.arrival) for r in fleet.requests if r.model < 58]
    assert key == [(r.model, r.arrival) for r in first.requests]
