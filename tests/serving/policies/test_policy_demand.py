"""RateWindow: sliding-window request and token rates; StepCostWindow: engine seconds per
output token from cumulative counters. Both against hand-computed values."""

from __future__ import annotations

import math

import pytest

from prism.serving.policies import Rate, RateWindow, RateWindowConfig, StepCostWindow


def test_rates_over_the_window() -> None:
    """Events in (now − 10, now] count; rates are their sums over 10 s."""
    w = RateWindow(RateWindowConfig(window_s=10.0))
    for t, tokens in [(0.0, 100), (2.0, 50), (5.0, 30), (9.0, 20)]:
        w.record(t, tokens)
    assert w.rate(9.0) == Rate(0.4, 20.0)  # 4 requests, 200 tokens
    assert w.rate(10.0) == Rate(0.3, 10.0)  # t=0 falls out: 3 requests, 100 tokens
    assert w.rate(14.5) == Rate(0.2, 5.0)  # t=2 out too: 2 requests, 50 tokens
    assert w.rate(19.0) == Rate(0.0, 0.0)  # all out
    w.record(19.5, 40)
    assert w.rate(20.0) == Rate(0.1, 4.0)


def test_idle_for() -> None:
    """Idle time runs from the last request, or from `start_s`, or is infinite."""
    assert RateWindow().idle_for(100.0) == math.inf
    w = RateWindow(start_s=10.0)
    assert w.idle_for(55.0) == 45.0
    w.record(60.0, 5)
    assert w.idle_for(61.5) == 1.5


def test_many_events_stay_exact() -> None:
    """After 10,000 events the running sums equal a recount of the window."""
    w = RateWindow(RateWindowConfig(window_s=60.0))
    for i in range(10_000):
        w.record(i * 0.1, i % 7)
    now = 1000.0
    inside = [i for i in range(10_000) if i * 0.1 > now - 60.0]
    assert w.rate(now).requests_per_s == len(inside) / 60.0
    assert w.rate(now).tokens_per_s == sum(i % 7 for i in inside) / 60.0


def test_time_must_not_run_backwards() -> None:
    """An event or query before the latest time seen is an error."""
    w = RateWindow()
    w.record(5.0)
    with pytest.raises(ValueError, match="backwards"):
        w.record(4.0)
    with pytest.raises(ValueError, match="backwards"):
        w.rate(4.9)


def test_step_cost_from_two_workers_counters() -> None:
    """Deltas of cumulative counters, summed over sources, over the window."""
    w = StepCostWindow(window_s=10.0, min_tokens=10)
    w.sample(0.0, "cpu:0", busy_s=1.0, tokens=100)  # first sight: counted from zero
    assert w.seconds_per_token(0.0) == pytest.approx(0.01)
    w.sample(5.0, "cpu:0", busy_s=1.5, tokens=200)  # +0.5 s, +100 tokens
    w.sample(5.0, "cpu:1", busy_s=3.0, tokens=100)  # another device, slower per token
    assert w.seconds_per_token(5.0) == pytest.approx(4.5 / 300)
    assert w.seconds_per_token(10.0) == pytest.approx(3.5 / 200)  # t=0 fell out
    w.sample(11.0, "cpu:0", busy_s=1.5, tokens=200)  # no change: nothing added
    assert w.seconds_per_token(15.0) is None  # everything fell out


def test_step_cost_counter_reset_and_too_few_tokens() -> None:
    """A counter that goes down (restarted worker) counts from zero; below `min_tokens`
    there is no estimate."""
    w = StepCostWindow(window_s=60.0, min_tokens=50)
    w.sample(0.0, "cpu:0", busy_s=2.0, tokens=40)
    assert w.seconds_per_token(1.0) is None  # 40 tokens < 50
    w.sample(1.0, "cpu:0", busy_s=0.5, tokens=20)  # restarted: 0.5 s, 20 tokens new
    assert w.seconds_per_token(1.0) == pytest.approx(2.5 / 60)
    w.forget("cpu:0")
    w.sample(2.0, "cpu:0", busy_s=0.6, tokens=30)  # forgotten: counted from zero again
    assert w.seconds_per_token(2.0) == pytest.approx(3.1 / 90)
    with pytest.raises(ValueError, match="window_s"):
        StepCostWindow(window_s=0)
