"""The simulator on micro-workloads with known answers (the issue's acceptance tests):
deterministic for a seed, closed-form latencies for a lone request, a model at low rate
meets every SLO, a model over capacity misses them, two alternating models thrash under
`swap` and not under `prism`; and every ledger is consistent after every run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest
from sim_helpers import models, workload

from prism.sim.cost_model import CostModel, GiB
from prism.sim.experiments import always_busy_four
from prism.sim.gpu import GPUConfig
from prism.sim.metrics import SimResult
from prism.sim.policies import POLICIES, make_policy
from prism.sim.request import SimModel
from prism.sim.simulator import SimConfig, Simulator
from prism.sim.workloads import RequestSpec, Workload, bursty_groups


def run(
    w: Workload,
    ms: Sequence[SimModel],
    policy: str,
    gpus: int,
    gpu: GPUConfig,
    cost: CostModel,
) -> tuple[SimResult, Simulator]:
    sim = Simulator(w, ms, make_policy(policy), SimConfig(gpus, gpu), cost)
    result = sim.run()
    for g in sim.gpus:
        g.check_integrity()
        for instance in g.instances.values():
            if not instance.holds_kv:
                assert instance.kv.used_blocks == 0  # finished requests freed their blocks
    return result, sim


def _slos(ms: Sequence[SimModel]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([m.ttft_slo_s for m in ms]), np.array([m.tpot_slo_s for m in ms])


@pytest.mark.parametrize("policy", ["prism", "prism+", "swap"])
def test_deterministic_for_a_seed(policy: str, h200: GPUConfig, cost: CostModel) -> None:
    """Two runs of one seeded workload give the same latencies and counters."""
    w = bursty_groups(8, 300, 6.0, seed=5)
    ms = models(*["llama-3.2-1b", "llama-3.2-3b", "qwen3-1.7b", "llama-3.1-8b"] * 2)
    a, _ = run(w, ms, policy, 2, h200, cost)
    b, _ = run(w, ms, policy, 2, h200, cost)
    np.testing.assert_array_equal(a.ttft, b.ttft)
    np.testing.assert_array_equal(a.tpot, b.tpot)
    assert (a.wakes, a.sleeps, a.migrations) == (b.wakes, b.sleeps, b.migrations)


def test_a_lone_request_takes_the_closed_form_time(h200: GPUConfig, cost: CostModel) -> None:
    """Static, one request: TTFT = one prefill step; TPOT = the mean decode step, whose
    KV grows one token a step (linear, so the mean is the step at the mean context); each
    round also costs the worker's host time for a round, and the admission the mapping of
    the KV group beyond the one the wake mapped (1,025 tokens and the padding block: 66
    blocks of the 8B's 64 a group; the decode stays inside them)."""
    ms = models("llama-3.1-8b")
    prompt, output = 1024, 65
    r, sim = run(workload([(1.0, 0)], prompt, output, 1, 10.0), ms, "static", 1, h200, cost)
    shape = ms[0].shape
    per_round = cost.calibration.round_fixed_s
    assert per_round > 0
    kv = sim.gpus[0].instances[0].kv
    assert kv.pages_mapped == kv.group_pages  # the wake's group is the wake's cost
    mapping = cost.kv_moves_s(kv.group_pages * h200.page_size, 0)
    assert mapping > 0
    ttft = cost.prefill_s(shape, prompt) + per_round + mapping
    assert r.ttft[0] == pytest.approx(ttft, rel=1e-9)
    steps = [cost.decode_s(shape, 1, prompt + i) + per_round for i in range(output - 1)]
    assert r.tpot[0] == pytest.approx(sum(steps) / len(steps), rel=1e-4)


def test_a_long_prompt_is_prefilled_in_chunks(h200: GPUConfig, cost: CostModel) -> None:
    """5,000 tokens with a 2,048-token step budget: three chunks (three rounds), attention
    over the cache; the last, 904 tokens, replays the engine's 1,024-token graph; the
    whole prompt's KV is mapped at admission (four 1,024-token groups beyond the wake's)."""
    ms = models("llama-3.2-3b")
    r, sim = run(workload([(0.0, 0)], 5000, 1, 1, 10.0), ms, "static", 1, h200, cost)
    shape = ms[0].shape
    chunks = [(2048, 0, 2048), (2048, 2048, 2048), (904, 4096, 1024)]
    rounds = len(chunks) * cost.calibration.round_fixed_s
    steps = sum(cost.prefill_s(shape, n, o, graph) for n, o, graph in chunks)
    kv = sim.gpus[0].instances[0].kv
    assert kv.pages_mapped == 4 * kv.group_pages
    mapping = cost.kv_moves_s(kv.pages_mapped * h200.page_size, 0)
    assert r.ttft[0] == pytest.approx(steps + rounds + mapping)
    assert steps > sum(cost.prefill_s(shape, n, o) for n, o, _ in chunks)  # the padding
    assert r.tpot[0] == 0.0  # one output token: no time per further token


@pytest.mark.parametrize("policy", list(POLICIES))
def test_one_model_at_low_rate_meets_every_slo(
    policy: str, h200: GPUConfig, cost: CostModel
) -> None:
    """0.2 req/s of a 3B model on its own GPU: every request within 1 s TTFT, 50 ms TPOT
    (a first wake included)."""
    ms = models("llama-3.2-3b", ttft_s=1.0, tpot_s=0.05)
    w = workload([(5.0 * i, 0) for i in range(120)], 1500, 200, 1, 600.0)
    r, _ = run(w, ms, policy, 1, h200, cost)
    assert r.attainment(*_slos(ms)) == {"ttft": 1.0, "tpot": 1.0, "both": 1.0}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_model_over_capacity_misses_its_slos(
    policy: str, h200: GPUConfig, cost: CostModel
) -> None:
    """50 req/s of 4k-token prompts on an 8B model needs ~5 GPUs of prefill: on one, the
    queue grows without bound and almost every TTFT SLO is missed."""
    ms = models("llama-3.1-8b", ttft_s=1.0, tpot_s=0.05)
    w = workload([(0.02 * i, 0) for i in range(3000)], 4096, 16, 1, 60.0)
    r, _ = run(w, ms, policy, 1, h200, cost)
    assert r.attainment(*_slos(ms))["ttft"] < 0.2


def test_alternating_models_thrash_under_swap_not_prism(h200: GPUConfig, cost: CostModel) -> None:
    """A and B take turns, one request a second, on one GPU; the TTFT SLO lies between a
    prefill and a wake. `swap` swaps on every request, so each TTFT after the first is
    unmapping the other model (weights and one KV group) + a wake + a prefill, and every
    one misses; `prism` wakes each model once (its first request misses) and keeps both
    resident."""
    ms = models("llama-3.2-3b", "llama-3.2-3b")
    shape = ms[0].shape
    prompt, wake = 512, cost.wake_s(shape)
    prefill = cost.prefill_s(shape, prompt) + cost.calibration.round_fixed_s  # its round
    ms = [replace(m, ttft_slo_s=(wake + prefill) / 2) for m in ms]
    w = workload([(1.0 * i, i % 2) for i in range(120)], prompt, 64, 2, 120.0)
    swap, sim = run(w, ms, "swap", 1, h200, cost)
    prism, _ = run(w, ms, "prism", 1, h200, cost)
    assert sum(swap.wakes.values()) == 120 and sum(swap.sleeps.values()) == 119
    other = sim.gpus[0].instances[0]
    pages = other.weights.num_pages + other.kv.group_pages  # 576 tokens: one KV group
    unmap = cost.sleep_s(pages * h200.page_size)
    assert swap.ttft[0] == pytest.approx(wake + prefill)
    np.testing.assert_allclose(swap.ttft[1:], unmap + wake + prefill, rtol=1e-6)
    assert swap.attainment(*_slos(ms))["ttft"] == 0.0
    assert sum(prism.wakes.values()) == 2 and sum(prism.sleeps.values()) == 0
    assert prism.attainment(*_slos(ms))["ttft"] == pytest.approx(118 / 120)


def test_kv_shortage_preempts_and_still_finishes(cost: CostModel) -> None:
    """A GPU with 2 GiB of KV room and long outputs: requests are preempted (recompute)
    and every one still finishes; no page is lost."""
    ms = models("llama-3.2-1b")
    small = GPUConfig(memory_bytes=8 * GiB, headroom_bytes=GiB + GiB // 2)
    w = workload([(0.05 * i, 0) for i in range(64)], 2000, 1500, 1, 10.0)
    r, _ = run(w, ms, "prism", 1, small, cost)
    assert r.finished.all()
    assert r.preemptions.sum() > 0


def test_static_drops_models_without_a_gpu(h200: GPUConfig, cost: CostModel) -> None:
    """Three models, two GPUs: the least busy model has no GPU and is not served."""
    ms = models("llama-3.2-1b", "llama-3.2-1b", "llama-3.2-1b")
    arrivals = [(0.5 * i, 0) for i in range(10)] + [(0.5 * i + 0.1, 1) for i in range(6)]
    w = workload(sorted([*arrivals, (3.3, 2)]), 100, 10, 3, 10.0)
    r, sim = run(w, ms, "static", 2, h200, cost)
    assert r.dropped == 1 and 2 not in sim.homes


def test_static_gives_spare_gpus_to_the_busiest_model(h200: GPUConfig, cost: CostModel) -> None:
    ms = models("llama-3.2-1b", "llama-3.2-1b")
    arrivals = [(0.1 * i, 0) for i in range(90)] + [(1.0 * i + 0.05, 1) for i in range(9)]
    w = workload(sorted(arrivals), 100, 10, 2, 10.0)
    r, sim = run(w, ms, "static", 4, h200, cost)
    assert len(sim.homes[0]) == 3 and len(sim.homes[1]) == 1
    assert r.finished.all()


def test_spatial_quotas_fit_the_gpu(h200: GPUConfig, cost: CostModel) -> None:
    """Every model resident from the start; weights plus KV quotas within the budget."""
    ms = models("llama-3.1-8b", "llama-3.2-3b", "llama-3.2-1b", "qwen3-1.7b")
    w = bursty_groups(4, 120, 4.0, seed=0)
    r, sim = run(w, ms, "spatial", 1, h200, cost)
    gpu = sim.gpus[0]
    assert len(gpu.instances) == 4 and sum(r.wakes.values()) == 0
    quota = sum(i.kv.account.max_pages + i.weights.num_pages for i in gpu.instances.values())
    assert quota * gpu.config.page_size <= gpu.config.budget_bytes


def test_memory_trace_follows_each_model(h200: GPUConfig, cost: CostModel) -> None:
    """Samples every 10 s; a model's memory is its weights (+ workspace) and KV while
    resident, nothing before its first request."""
    ms = models("llama-3.2-3b", "llama-3.2-1b")
    w = workload([(30.0, 0), (31.0, 0), (70.0, 1)], 800, 50, 2, 100.0)
    r, _ = run(w, ms, "prism", 1, h200, cost)
    assert r.memory is not None
    times, weights, kv = r.memory.arrays()
    assert len(times) >= 10
    assert weights[0].sum() == 0  # t = 0: nothing resident
    at_40 = int(np.searchsorted(times, 40.0))
    assert weights[at_40, 0] >= ms[0].shape.weight_bytes and weights[at_40, 1] == 0
    assert kv[at_40, 0] > 0


def test_the_migration_threshold_stops_needless_moves(h200: GPUConfig, cost: CostModel) -> None:
    """The stateless KV-pressure rule re-run on fresh rates moves models back and forth;
    with the paper's threshold τ (`prism`) and with prism+'s hysteresis and move cap,
    far fewer moves."""
    ms = models(*["llama-3.2-1b", "llama-3.2-3b", "qwen3-1.7b", "llama-3.1-8b"] * 2)
    w = bursty_groups(8, 600, 6.0, seed=1, period_s=120)
    stateless, _ = run(w, ms, "prism-no-tau", 2, h200, cost)
    prism, _ = run(w, ms, "prism", 2, h200, cost)
    plus, _ = run(w, ms, "prism+", 2, h200, cost)
    assert stateless.migrations >= 10
    assert prism.migrations <= stateless.migrations // 5
    assert plus.migrations <= stateless.migrations // 5


def test_slo_deadlines_come_from_the_models(h200: GPUConfig, cost: CostModel) -> None:
    ms = [replace(m, ttft_slo_s=0.25) for m in models("llama-3.2-1b")]
    sim = Simulator(workload([(1.0, 0)], 10, 2, 1, 5.0), ms, make_policy("prism"),
                    SimConfig(1, h200), cost)  # fmt: skip
    sim.run()
    assert sim.requests[0].deadline == pytest.approx(1.25)


def test_prism_plus_splits_the_compute_heavy_pair(h200: GPUConfig, cost: CostModel) -> None:
    """Four always-busy models on 2 GPUs: KV pressure alone leaves the two prefill-heavy
    3B models (1 and 2) together, 120% of a GPU's compute, and their queue grows; the
    compute term of prism+ moves one of them once the rates are seen, and keeps them
    apart: re-placing from scratch, it put them back together each time the moved one's
    120 s residence ended (at 180 s, 390 s, ...)."""
    w, ms = always_busy_four(400.0)
    homes, moves = {}, {}
    for policy in ("prism", "prism+"):
        _, sim = run(w, ms, policy, 2, h200, cost)
        homes[policy], moves[policy] = sim.homes, sim.migrations
    assert homes["prism"][1] == homes["prism"][2]
    assert homes["prism+"][1] != homes["prism+"][2]
    assert moves["prism+"] <= 3


def test_an_equal_below_its_share_takes_the_excess(cost: CostModel) -> None:
    """As the worker does between models of equal priority: B, waking for one request
    while A's long requests hold all the KV memory, takes what A holds beyond its fair
    share (A's newest requests are preempted and recomputed) instead of waiting for A's
    whole backlog; everything still finishes."""
    ms = models("llama-3.2-1b", "llama-3.2-1b")
    small = GPUConfig(memory_bytes=8 * GiB, headroom_bytes=GiB + GiB // 2)
    w = Workload(
        "share", 2, 10.0,
        [*workload([(0.01 * i, 0) for i in range(40)], 2000, 1500, 2, 10.0).requests,
         RequestSpec(40, 1, 2.0, 1000, 10)],
    )  # fmt: skip
    r, _ = run(w, ms, "prism-worker", 1, small, cost)
    assert r.finished.all()
    assert r.preemptions[r.model == 0].sum() > 0
    assert r.ttft[-1] < 0.5  # waiting for A instead: 1.9 s, until A's first requests end
