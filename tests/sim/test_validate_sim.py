"""`benchmarks/validate_sim.py --smoke`: the plumbing of the live-vs-simulated comparison
(not the agreement itself: CPU timings are too noisy for a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sim_helpers import REPO

from prism.sim.metrics import attainment

SCRIPT = REPO / "benchmarks" / "validate_sim.py"


def _run(*args: str) -> None:
    subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, check=True, timeout=300,
                   capture_output=True)  # fmt: skip


def _array(values: list[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values])


@pytest.fixture(scope="module")
def smoke(traces: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("validate") / "smoke.json"
    _run("--smoke", "--traces", str(traces), "--out", str(out))
    return json.loads(out.read_text()), out


@pytest.mark.slow
def test_both_sides_ran_the_same_requests_to_the_end(smoke: tuple[dict[str, Any], Path]) -> None:
    """Same requests (model and arrival, in order) live and simulated; every one finished."""
    results, _ = smoke
    assert results["runs"]
    for run in results["runs"]:
        live, sim = run["latencies"]["live"], run["latencies"]["sim"]
        assert len(live["model"]) == len(sim["model"]) == run["requests"] > 0
        assert live["model"] == sim["model"] and live["output"] == sim["output"]
        assert np.allclose(live["arrival"], sim["arrival"])
        assert run["live"]["finished"] == run["requests"]
        assert run["sim"]["prism-worker/measured"]["finished"] == run["requests"]
        assert not np.isnan(_array(live["tpot"])).any() and not np.isnan(_array(sim["tpot"])).any()


@pytest.mark.slow
def test_both_sides_record_memory_over_time(smoke: tuple[dict[str, Any], Path]) -> None:
    """Each run keeps a timeline from either side: every model's mapped weights and KV
    within the worker's budget, its weights mapped whenever it is active (live), and the
    live requests running or waiting; the simulator's samples on the same spacing."""
    results, _ = smoke
    budget = results["setup"]["budget_bytes"]
    models = len(results["setup"]["models"])
    for run in results["runs"]:
        live, sim = run["timeline"]["live"], run["timeline"]["sim"]
        assert len(live["t"]) > 2 and len(sim["t"]) > 2
        assert all(b >= a for a, b in zip(live["t"], live["t"][1:], strict=False))
        for side in (live, sim):
            for weights, kv in zip(side["weight_bytes"], side["kv_bytes"], strict=True):
                assert len(weights) == len(kv) == models and sum(weights) + sum(kv) <= budget
        for states, weights in zip(live["state"], live["weight_bytes"], strict=True):
            assert all(w > 0 for s, w in zip(states, weights, strict=True) if s == "active")
        assert max(max(r) for r in live["running"]) > 0
        rounds = [r[0] for r in live["rounds"]]  # cumulative: the worker's rounds so far
        assert rounds == sorted(rounds) and rounds[-1] > 0 and len(live["rounds"][0]) == 3
        for side in (live, sim):
            for key in ("busy_s", "output_tokens", "preemptions", "steps", "prefill_tokens"):
                for model in range(models):
                    column = [row[model] for row in side[key]]
                    assert column == sorted(column)  # cumulative
            assert sum(side["output_tokens"][-1]) > sum(side["output_tokens"][0])
            assert sum(side["prefill_tokens"][-1]) > sum(side["prefill_tokens"][0])
        assert sim["rounds"] == sorted(sim["rounds"]) and sim["rounds"][-1] > 0
        assert max(max(r) for r in sim["running"]) > 0
        assert {s for row in sim["state"] for s in row} <= {
            "cached",
            "waking",
            "active",
            "asleep",
            "",
        }
        # every output token of the run, counted by the simulator's models at the end
        assert sum(sim["output_tokens"][-1]) <= sum(run["latencies"]["sim"]["output"])


@pytest.mark.slow
def test_attainment_comes_from_the_same_slos(smoke: tuple[dict[str, Any], Path]) -> None:
    """Both sides' attainment is recomputed exactly from the per-request latencies and
    one set of SLOs: scale × each model's live solo p95."""
    results, _ = smoke
    base_ttft = np.array(results["solo"]["ttft_p95_s"])
    base_tpot = np.array(results["solo"]["tpot_p95_s"])
    assert (base_ttft > 0).all() and (base_tpot > 0).all()
    for run in results["runs"]:
        for scale in results["slo_scales"]:
            cell = run["attainment"][str(scale)]
            for side, label in (("live", "live"), ("sim", "prism-worker/measured")):
                lat = run["latencies"][side]
                got = attainment(
                    np.array(lat["model"]), _array(lat["ttft"]), _array(lat["tpot"]),
                    base_ttft * scale, base_tpot * scale,
                )  # fmt: skip
                assert got == cell[label]


@pytest.mark.slow
def test_calibration_was_fitted_and_resimulation_repeats_it(
    smoke: tuple[dict[str, Any], Path], traces: Path, tmp_path: Path
) -> None:
    """The cost model was fitted to steps measured in the run, and `--resim` (the simulated
    side again, from the recorded live runs) gives the same figures: the sim is
    deterministic."""
    results, path = smoke
    factors = results["calibration"]["factors"]
    assert factors["decode_overhead"] > 0 and factors["prefill_points"]
    kinds = {row["kind"] for row in results["calibration"]["fit"]}
    assert kinds == {"decode", "prefill", "wake"}
    again = tmp_path / "again.json"
    _run("--resim", str(path), "--traces", str(traces), "--out", str(again))
    redone = json.loads(again.read_text())
    for old, new in zip(results["runs"], redone["runs"], strict=True):
        assert old["attainment"] == new["attainment"]


@pytest.mark.slow
def test_probe_rounds_replays_a_window_with_its_rounds(traces: Path, tmp_path: Path) -> None:
    """`benchmarks/probe_rounds.py`: only the window's requests are replayed (all to the
    end), and its intervals account for the worker's rounds: their count adds up to the
    rounds the run made, host + wait never exceed a round's length."""
    out = tmp_path / "probe.json"
    probe = REPO / "benchmarks" / "probe_rounds.py"
    subprocess.run([sys.executable, str(probe), "--setup", "smoke", "--traces", str(traces),
                    "--rate", "3", "--window", "2,12", "--step", "1", "--out", str(out)],
                   cwd=REPO, check=True, timeout=300, capture_output=True)  # fmt: skip
    result = json.loads(out.read_text())
    arrivals = _array(result["latencies"]["arrival"])
    assert len(arrivals) == result["summary"]["requests"] > 0
    assert result["summary"]["finished"] == result["summary"]["requests"]
    assert arrivals.min() >= 0.0 and arrivals.max() < 10.0  # shifted to the window's start
    rows = result["intervals"]
    assert rows and sum(r["rounds"] for r in rows) <= result["summary"]["rounds"]
    for row in rows:
        assert row["host_ms"] + row["wait_ms"] <= row["round_ms"] * 1.01
