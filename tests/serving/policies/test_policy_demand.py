"""RateWindow: sliding-window request and token rates against hand-computed values."""

from __future__ import annotations

import math

import pytest

from prism.serving.policies import Rate, RateWindow, RateWindowConfig


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
