"""`benchmarks/sim_multimodel.py`: bench_multimodel's sweep in the simulator, on the
live run's SLOs. The modes stand where the live H200 run put them: `swap` and `static`
(a partition of the SMs) far behind at 1 req/s, `prism` and `spatial` alike while KV
memory never binds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sim_helpers import REPO, RESULTS

SCRIPT = REPO / "benchmarks" / "sim_multimodel.py"


@pytest.fixture(scope="module")
def sweep(traces: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    live = RESULTS / "bench_multimodel_h200.json"
    if not live.is_file():
        pytest.skip(f"{live} absent")
    out = tmp_path_factory.mktemp("simmm") / "sim.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--traces", str(traces), "--live", str(live),
         "--seconds", "20", "--grace", "10", "--rates", "1,3", "--out", str(out)],
        cwd=REPO / "benchmarks", check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    return json.loads(out.read_text())


def _row(sweep: dict[str, Any], mode: str, rate: float) -> dict[str, Any]:
    return next(r for r in sweep["runs"] if r["mode"] == mode and r["rate"] == rate)


def test_the_modes_stand_as_live(sweep: dict[str, Any]) -> None:
    assert sweep["weights_gib"] == pytest.approx(54.8, abs=0.1)
    swap, prism = _row(sweep, "swap", 1), _row(sweep, "prism", 1)
    assert swap["wakes"] > 0 and prism["wakes"] == 0  # prism starts with all resident
    assert swap["attainment"]["5.0"]["ttft"] < prism["attainment"]["5.0"]["ttft"] - 0.2
    for rate in (1, 3):  # memory never binds: the two elastic and fixed splits agree
        spatial = _row(sweep, "spatial", rate)
        assert _row(sweep, "prism", rate)["attainment"] == spatial["attainment"]
    assert sweep["best_rate"]["prism"]["10.0"] >= 3
    static = _row(sweep, "static", 1)  # each model on its SM share: TTFT misses even at x10
    assert static["attainment"]["10.0"]["ttft"] < prism["attainment"]["10.0"]["ttft"] - 0.3
    assert "static" not in sweep["best_rate"]


def test_share_fractions_follow_the_probe() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from sim_multimodel import PROBE, share_fractions

    probe = json.loads(PROBE.read_text())
    for row in probe["shares"]:
        assert share_fractions(row["sms"], probe) == (row["matmul_fraction"], row["copy_fraction"])
    matmul, copy = share_fractions(40, probe)  # between the 32- and 64-SM shares
    assert 0.279 < matmul < 0.544 and 0.549 < copy < 0.877
    assert share_fractions(probe["device_sms"], probe) == (1.0, 1.0)
    with pytest.raises(ValueError, match="SMs"):
        share_fractions(500, probe)


def test_the_sweep_is_deterministic(traces: Path, sweep: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "again.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--traces", str(traces), "--slos",
         str(RESULTS / "bench_multimodel_h200.json"), "--modes", "prism", "--seconds", "20",
         "--grace", "10", "--rates", "1,3", "--out", str(out)],
        cwd=REPO / "benchmarks", check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    again = json.loads(out.read_text())
    assert [r["attainment"] for r in again["runs"]] == [
        r["attainment"] for r in sweep["runs"] if r["mode"] == "prism"
    ]
