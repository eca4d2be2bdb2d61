"""EvictionPolicy: sleep only idle models under pressure, never pinned ones, cheapest first."""

from __future__ import annotations

import math

from prism.serving.policies import EvictionCandidate, EvictionConfig, EvictionPolicy

GB = 10**9
POLICY = EvictionPolicy(EvictionConfig(idle_threshold_s=45.0, host_to_device_bytes_per_s=20 * GB))


def candidate(
    name: str, idle_s: float, gb: int = 10, rate: float = 0.0, pinned: bool = False
) -> EvictionCandidate:
    return EvictionCandidate(name, gb * GB, gb * GB, idle_s, rate, pinned)


def names(victims: list[EvictionCandidate]) -> list[str]:
    return [v.name for v in victims]


def test_needs_both_idleness_and_pressure() -> None:
    """Without pressure nobody sleeps; under pressure only models idle ≥ 45 s do."""
    models = [candidate("busy", idle_s=5.0), candidate("recent", 44.9), candidate("idle", 45.0)]
    assert POLICY.choose_victims(models, bytes_needed=0) == []
    assert POLICY.choose_victims([candidate("idle", 1e6)], bytes_needed=-1) == []
    assert names(POLICY.choose_victims(models, bytes_needed=30 * GB)) == ["idle"]


def test_never_picks_pinned_models() -> None:
    """A pinned model stays even when it is the idlest and the shortage is large."""
    models = [candidate("pinned", math.inf, pinned=True), candidate("idle", 100.0)]
    assert names(POLICY.choose_victims(models, bytes_needed=100 * GB)) == ["idle"]


def test_cost_combines_idle_time_reload_and_demand() -> None:
    """Cost = P(request within 60 s) × reload seconds, P from window rate + 1/idle."""
    c = candidate("m", idle_s=60.0, gb=40, rate=0.05)
    expected = (1 - math.exp(-(0.05 + 1 / 60.0) * 60.0)) * 2.0  # 40 GB at 20 GB/s
    assert math.isclose(POLICY.cost(c), expected)
    assert POLICY.cost(candidate("a", 600.0)) < POLICY.cost(candidate("a", 60.0))
    assert POLICY.cost(candidate("a", 60.0, gb=5)) < POLICY.cost(candidate("a", 60.0, gb=50))
    assert POLICY.cost(candidate("a", 60.0)) < POLICY.cost(candidate("a", 60.0, rate=0.1))


def test_victims_cheapest_first_and_only_as_many_as_needed() -> None:
    """Cheapest victims cover the shortage; a victim the cover does not need is put back."""
    models = [
        candidate("warm", 50.0, gb=10, rate=0.2),  # likely back soon: costliest
        candidate("cold-small", 3600.0, gb=4),
        candidate("cold-big", 3000.0, gb=30),
        candidate("cool", 300.0, gb=8),
    ]
    ranked = sorted(models, key=POLICY.cost)
    assert names(ranked) == ["cold-small", "cold-big", "cool", "warm"]
    # cold-small (4) + cold-big (30) cover 30 GB, and cold-big alone does too.
    assert names(POLICY.choose_victims(models, 30 * GB)) == ["cold-big"]
    assert names(POLICY.choose_victims(models, 3 * GB)) == ["cold-small"]
    # Not enough in total: every eligible model, cheapest first.
    assert names(POLICY.choose_victims(models, 100 * GB)) == names(ranked)
