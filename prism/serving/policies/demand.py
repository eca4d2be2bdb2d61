"""`RateWindow`: one model's request and token rates over a sliding window;
`StepCostWindow`: the engine time a model spends per output token, over one too.

Rule: the rate at `now` counts the events in the half-open window (now − W, now] and
divides by W (not by the time since the first event, so a model's rate ramps up over its
first W seconds rather than jumping on its first request). Events are appended in time
order and expired from the front, so `record` and `rate` are O(1) amortised; token counts
are ints, so the running sum never drifts.

A model's compute share on a device is its demanded token rate times the engine seconds
it has spent per output token (prefill included, batching effects included) on the
devices that ran it: measured, so it needs no cost model, and it keeps counting demand a
saturated device cannot serve (a share above 1 means the model wants more than a device).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateWindowConfig:
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if self.window_s <= 0:
            raise ValueError(f"window_s must be positive, got {self.window_s}")


@dataclass(frozen=True, slots=True)
class Rate:
    requests_per_s: float
    tokens_per_s: float


class RateWindow:
    """Sliding-window rates of one model, from timestamped request events."""

    def __init__(self, config: RateWindowConfig | None = None, start_s: float = -math.inf) -> None:
        self.config = config or RateWindowConfig()
        self._events: deque[tuple[float, int]] = deque()  # (time, tokens), oldest first
        self._tokens = 0  # Σ tokens of `_events`
        self._last_s = start_s  # last event, or when the model came into being
        self._latest_now = start_s  # time never runs backwards: checked on every call

    def record(self, t: float, tokens: int = 0) -> None:
        """One request at time `t`, with the tokens the caller attributes to it."""
        self._advance(t)
        self._events.append((t, tokens))
        self._tokens += tokens
        self._last_s = t

    def rate(self, now: float) -> Rate:
        self._advance(now)
        window = self.config.window_s
        return Rate(len(self._events) / window, self._tokens / window)

    def idle_for(self, now: float) -> float:
        """Seconds since the last request (or since `start_s`); inf if neither exists."""
        self._advance(now)
        return now - self._last_s

    def _advance(self, now: float) -> None:
        if now < self._latest_now:
            raise ValueError(f"time ran backwards: {now} < {self._latest_now}")
        self._latest_now = now
        horizon = now - self.config.window_s
        while self._events and self._events[0][0] <= horizon:
            _, tokens = self._events.popleft()
            self._tokens -= tokens


class StepCostWindow:
    """Engine seconds per output token of one model over a sliding window, from the
    cumulative (busy seconds, output tokens) counters of the workers that run it.

    Counters are sampled per source (worker); a counter that went down (the worker was
    restarted, the model reloaded) starts again from zero."""

    def __init__(self, window_s: float = 60.0, min_tokens: int = 16) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.window_s = window_s
        self.min_tokens = min_tokens  # fewer in the window: no estimate yet
        self._last: dict[str, tuple[float, int]] = {}  # source → its counters last seen
        self._deltas: deque[tuple[float, float, int]] = deque()  # (time, busy s, tokens)
        self._busy = 0.0
        self._tokens = 0

    def sample(self, now: float, source: str, busy_s: float, tokens: int) -> None:
        last_busy, last_tokens = self._last.get(source, (0.0, 0))
        if busy_s < last_busy or tokens < last_tokens:  # the counters were reset
            last_busy, last_tokens = 0.0, 0
        self._last[source] = (busy_s, tokens)
        d_busy, d_tokens = busy_s - last_busy, tokens - last_tokens
        if d_busy > 0 or d_tokens > 0:
            self._deltas.append((now, d_busy, d_tokens))
            self._busy += d_busy
            self._tokens += d_tokens
        self._expire(now)

    def forget(self, source: str) -> None:
        """The source no longer runs the model: its next counters count from zero."""
        self._last.pop(source, None)

    def seconds_per_token(self, now: float) -> float | None:
        self._expire(now)
        if self._tokens < self.min_tokens:
            return None
        return max(0.0, self._busy) / self._tokens

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._deltas and self._deltas[0][0] <= horizon:
            _, d_busy, d_tokens = self._deltas.popleft()
            self._busy -= d_busy
            self._tokens -= d_tokens
        if not self._deltas:
            self._busy = 0.0  # no float drift left behind
