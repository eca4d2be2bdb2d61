"""`prism simulate` end to end through the real command line: a tiny workload, every
sweep axis with two values, a fewest-GPU search; JSON and PNGs in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prism.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def test_simulate_writes_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """2 policies × 2 GPU counts × 2 SLO scales × 2 rate scales = 16 runs, each in the
    JSON with its attainment; one plot per swept axis, the fewest-GPU bars, and memory
    over time per policy."""
    argv = [
        "simulate", "--models", "4", "--duration", "60", "--rate", "2", "--seed", "1",
        "--policy", "spatial,prism+", "--gpus", "1,2", "--slo-scale", "5,10",
        "--rate-scale", "1,2", "--fewest-gpus", "2", "--out", str(tmp_path),
        "--name", "tiny", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert len(report["runs"]) == 16
    assert len(report["solo_p95"]["ttft_s"]) == 4
    for run in report["runs"]:
        assert run["policy"] in ("spatial", "prism+") and run["gpus"] in (1, 2)
        assert 0.0 <= run["attainment"]["ttft"] <= 1.0
        assert run["requests"] > 0 and run["busy_throughput_tokens_s"] > 0
    assert set(report["fewest_gpus"]) == {"spatial", "prism+"}
    assert report["cost_model"]["gpu"] == "H200"
    pngs = ["vs_rate_scale", "vs_slo_scale", "vs_gpus", "fewest_gpus", "memory_spatial",
            "memory_prismplus"]  # fmt: skip
    for name in pngs:
        assert (tmp_path / f"tiny_{name}.png").read_bytes()[:8] == PNG, name
    assert "fewest GPUs" in capsys.readouterr().out


def test_unknown_policy_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["simulate", "--policy", "nope"])
    assert "unknown policy" in capsys.readouterr().err
