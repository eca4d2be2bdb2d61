"""LocalScheduler: Moore–Hodgson admission order against FIFO, EDF and brute force; preemption.

Prefill estimators return whole seconds and arrivals are whole numbers, so completion
times are exact and a brute-force count of misses compares exactly.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from prism.serving.policies import (
    SLO,
    EDFOrder,
    FIFOOrder,
    LocalScheduler,
    LocalSchedulerConfig,
    PendingRequest,
    RotatingOrder,
    RunningDecode,
)

SLOS = {"chat": SLO(ttft_s=8.0, tpot_s=0.05), "batch": SLO(ttft_s=30.0, tpot_s=0.2)}
PREFILL = {"chat": lambda n: n / 1000, "batch": lambda n: n / 1000}  # 1000 tokens/s


def scheduler(cls: type[LocalScheduler] = LocalScheduler) -> LocalScheduler:
    return cls(LocalSchedulerConfig(SLOS), PREFILL)


def ids(requests: list[PendingRequest]) -> list[str]:
    return [r.request_id for r in requests]


# At now = 10 (prefill p, deadline d): e (4, 36) arrived first, then the chat requests
# a (5, 15), b (2, 16), c (2, 17), d (2, 18). Long `a` first makes b, c, d late in a row.
DOMINO = [
    PendingRequest("e", "batch", 6.0, 4000),
    PendingRequest("a", "chat", 7.0, 5000),
    PendingRequest("b", "chat", 8.0, 2000),
    PendingRequest("c", "chat", 9.0, 2000),
    PendingRequest("d", "chat", 10.0, 2000),
]


def test_moore_hodgson_misses_fewer_deadlines_than_fifo_and_edf() -> None:
    """On the domino case FIFO misses 4, EDF 3 and Moore–Hodgson 1 (the long `a`)."""
    now = 10.0
    misses = {}
    for cls in (FIFOOrder, EDFOrder, LocalScheduler):
        s = scheduler(cls)
        misses[cls.__name__] = ids(s.missed(s.order(DOMINO, now), now))
    assert misses == {
        "FIFOOrder": ["a", "b", "c", "d"],
        "EDFOrder": ["b", "c", "d"],
        "LocalScheduler": ["a"],
    }
    assert ids(scheduler().order(DOMINO, now)) == ["b", "c", "d", "e", "a"]


def test_hopeless_requests_go_to_the_back_in_edf_order() -> None:
    """Requests that miss even if started now follow the rest, earliest deadline first."""
    now = 20.0
    pending = [
        PendingRequest("late2", "chat", 13.0, 2000),  # deadline 21, done at 22 at best
        PendingRequest("late1", "chat", 12.0, 1500),  # deadline 20, done at 21.5 at best
        PendingRequest("ok", "batch", 19.0, 3000),  # deadline 49
    ]
    s = scheduler()
    assert [s.slack(r, now) for r in pending] == [-1.0, -1.5, 26.0]
    assert ids(s.order(pending, now)) == ["ok", "late1", "late2"]


def test_all_on_time_keeps_edf_order() -> None:
    """When everything fits, Moore–Hodgson drops nothing and the order is EDF."""
    pending = [PendingRequest(f"r{i}", "chat", float(i), 500) for i in (3, 1, 2)]
    assert ids(scheduler().order(pending, 3.0)) == ["r1", "r2", "r3"]


def brute_force_min_misses(s: LocalScheduler, pending: list[PendingRequest], now: float) -> int:
    return min(len(s.missed(p, now)) for p in itertools.permutations(pending))


requests = st.lists(
    st.builds(
        PendingRequest,
        request_id=st.uuids().map(str),
        model=st.sampled_from(["fast", "slow"]),
        arrival_s=st.integers(0, 10).map(float),
        prompt_tokens=st.integers(1, 6),
        priority=st.just(0),
    ),
    min_size=0,
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(pending=requests, ttft=st.tuples(st.integers(1, 12), st.integers(1, 12)))
def test_moore_hodgson_is_optimal(pending: list[PendingRequest], ttft: tuple[int, int]) -> None:
    """Misses of Moore–Hodgson's order equal the minimum over every permutation."""
    slos = {"fast": SLO(ttft[0], 0.1), "slow": SLO(ttft[1], 0.1)}
    s = LocalScheduler(LocalSchedulerConfig(slos), {"fast": float, "slow": lambda n: 2.0 * n})
    now = 10.0
    ordered = s.order(pending, now)
    assert sorted(ids(ordered)) == sorted(ids(pending))
    assert len(s.missed(ordered, now)) == brute_force_min_misses(s, pending, now)


RUNNING = [
    RunningDecode("hi-old", "chat", 1.0, pages=4, priority=2),
    RunningDecode("lo-old", "chat", 2.0, pages=3, priority=0),
    RunningDecode("lo-new", "batch", 5.0, pages=2, priority=0),
    RunningDecode("mid", "batch", 3.0, pages=6, priority=1),
]


def test_preemption_protects_headroom() -> None:
    """A shortage within the headroom preempts nothing; only the excess is taken."""
    s = scheduler()
    assert s.choose_preemption_victims(RUNNING, pages_needed=8, headroom_pages=8) == []
    assert s.choose_preemption_victims(RUNNING, pages_needed=0, headroom_pages=0) == []
    victims = s.choose_preemption_victims(RUNNING, pages_needed=10, headroom_pages=8)
    assert [v.request_id for v in victims] == ["lo-new"]  # excess 2: one request covers it


def test_preemption_takes_lowest_priority_then_latest_arrival() -> None:
    """Victims come lowest priority first, latest arrival first among equals."""
    s = scheduler()
    victims = s.choose_preemption_victims(RUNNING, pages_needed=9, headroom_pages=2)
    assert [v.request_id for v in victims] == ["lo-new", "lo-old", "mid"]  # excess 7


def test_preemption_is_all_or_nothing_and_respects_the_asker() -> None:
    """Nothing is preempted if the eligible cannot cover the excess; equals are spared."""
    s = scheduler()
    assert s.choose_preemption_victims(RUNNING, pages_needed=16, headroom_pages=0) == []
    victims = s.choose_preemption_victims(RUNNING, 5, 0, below_priority=1)
    assert [v.request_id for v in victims] == ["lo-new", "lo-old"]
    assert s.choose_preemption_victims(RUNNING, 6, 0, below_priority=1) == []


def test_rotating_order_takes_models_in_turn() -> None:
    """The worker's order without SLOs: each call moves the first model on by one; within
    a model, arrival order."""
    rot = scheduler(RotatingOrder)
    firsts = [ids(rot.order(DOMINO, 10.0))[:2] for _ in range(3)]
    assert firsts == [["a", "b"], ["e", "a"], ["a", "b"]]  # chat, batch, chat first
    assert ids(rot.order(DOMINO, 10.0)) == ["e", "a", "b", "c", "d"]
    assert rot.order([], 10.0) == []
