"""`RateWindow`: one model's request and token rates over a sliding window.

Rule: the rate at `now` counts the events in the half-open window (now − W, now] and
divides by W (not by the time since the first event, so a model's rate ramps up over its
first W seconds rather than jumping on its first request). Events are appended in time
order and expired from the front, so `record` and `rate` are O(1) amortised; token counts
are ints, so the running sum never drifts.
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
