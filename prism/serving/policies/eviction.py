"""`EvictionPolicy`: which idle models to put to sleep when a device's memory is short.

Eligible: not pinned, idle for at least `idle_threshold_s`, and only while there is memory
pressure (`bytes_needed > 0`). A bare timer would sleep models that are about to be used
again; instead each eligible model is scored by the TTFT a future request is expected to
lose if it is asleep:

    λ        = request_rate + 1 / idle_s         predicted requests per second: the window's
                                                  rate, plus the rate its last gap implies
    p_soon   = 1 − exp(−λ × horizon_s)           P(a request within the horizon), Poisson
    reload_s = weight_bytes / host_to_device_bytes_per_s
    cost     = p_soon × reload_s                 expected wake stall, seconds

Victims are taken cheapest first (ties: longest idle, then most bytes freed) until their
resident bytes cover `bytes_needed`; then victims not needed for the cover are put back,
costliest first. If all eligible models together cannot cover it, all of them are returned
(the pool goes on to its next reclaim level for the rest).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EvictionConfig:
    idle_threshold_s: float = 45.0  # never sleep a model used more recently than this
    host_to_device_bytes_per_s: float = 25e9  # measured copy bandwidth of a wake
    horizon_s: float = 60.0  # how far ahead a request counts as "soon"


@dataclass(frozen=True, slots=True)
class EvictionCandidate:
    name: str
    resident_bytes: int  # what sleeping it frees: weights and KV pages
    weight_bytes: int  # what waking it copies back
    idle_s: float  # since its last request (`RateWindow.idle_for`)
    request_rate: float  # requests/s over the window (`RateWindow.rate(now).requests_per_s`)
    pinned: bool = False  # never slept


class EvictionPolicy:
    """Idle ∧ pressure ⇒ sleep the models whose wake is least likely to be paid for soon."""

    def __init__(self, config: EvictionConfig | None = None) -> None:
        self.config = config or EvictionConfig()

    def eligible(self, candidate: EvictionCandidate) -> bool:
        return not candidate.pinned and candidate.idle_s >= self.config.idle_threshold_s

    def cost(self, candidate: EvictionCandidate) -> float:
        """Expected seconds of wake stall that sleeping `candidate` now costs (see module)."""
        gap_rate = 1.0 / candidate.idle_s if candidate.idle_s > 0 else math.inf
        predicted_rate = candidate.request_rate + gap_rate
        p_soon = -math.expm1(-predicted_rate * self.config.horizon_s)
        return p_soon * candidate.weight_bytes / self.config.host_to_device_bytes_per_s

    def choose_victims(
        self, candidates: Sequence[EvictionCandidate], bytes_needed: int
    ) -> list[EvictionCandidate]:
        """Models to sleep, cheapest first, to free `bytes_needed`; [] without pressure."""
        if bytes_needed <= 0:
            return []
        ranked = sorted(
            (c for c in candidates if self.eligible(c)),
            key=lambda c: (self.cost(c), -c.idle_s, -c.resident_bytes, c.name),
        )
        victims, freed = [], 0
        for candidate in ranked:
            if freed >= bytes_needed:
                break
            victims.append(candidate)
            freed += candidate.resident_bytes
        return _drop_unneeded(victims, freed, bytes_needed)


def _drop_unneeded(
    victims: list[EvictionCandidate], freed: int, bytes_needed: int
) -> list[EvictionCandidate]:
    """Put back, costliest (latest) first, victims the cover does not need."""
    kept = []
    for victim in reversed(victims):
        if freed - victim.resident_bytes >= bytes_needed:
            freed -= victim.resident_bytes
        else:
            kept.append(victim)
    return kept[::-1]
