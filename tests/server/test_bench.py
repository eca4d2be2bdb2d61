"""`prism bench` against the live server: synthetic load and the Azure trace, timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from server_helpers import API_KEY, MAX_MODEL_LEN, MODEL, MODEL_B, LiveServer

from prism.cli import main
from prism.server.bench import BenchClient, BenchRequest, azure, clip, summary, synthetic
from prism.sim.workloads import DEFAULT_TRACES


def test_synthetic_load_is_timed_and_summarised(server: LiveServer) -> None:
    requests = synthetic(6, prompt_tokens=16, output_tokens=4, rate=50.0, seed=1)
    assert [r.arrival_s for r in requests] == sorted(r.arrival_s for r in requests)
    results, duration = BenchClient(server.base_url, API_KEY).run(MODEL, requests, concurrency=3)
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.output_tokens for r in results] == [4] * 6  # ignore_eos: exact lengths
    for r in results:
        assert r.ttft_s is not None and 0 < r.ttft_s <= r.latency_s
        assert r.tpot_s is not None and r.tpot_s > 0
    s = summary(results, duration, model=MODEL, workload="synthetic", concurrency=3)
    assert (s["completed"], s["failed"], s["output_tokens"], s["prompt_tokens"]) == (6, 0, 24, 96)
    assert s["output_throughput"] == pytest.approx(24 / duration)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert 0 < s[key]["p50"] <= s[key]["p99"]


def test_cli_json_report(
    server: LiveServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    output = tmp_path / "bench.json"
    argv = ["bench", "--url", server.base_url, "--api-key", API_KEY, "--model", MODEL_B,
            "--num-requests", "3", "--prompt-tokens", "8", "--output-tokens", "3",
            "--concurrency", "2", "--json", "--output", str(output)]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(output.read_text())
    assert (printed["model"], printed["completed"], printed["output_tokens"]) == (MODEL_B, 3, 9)


def test_failures_are_counted_not_raised(server: LiveServer) -> None:
    """A prompt beyond the model's context is refused (400): a failed request."""
    too_long = [BenchRequest(0.0, MAX_MODEL_LEN, 4)]
    results, duration = BenchClient(server.base_url, API_KEY).run(MODEL, too_long, 1)
    s = summary(results, duration, model=MODEL, workload="x", concurrency=1)
    assert (s["completed"], s["failed"]) == (0, 1)
    [message] = s["errors"]
    assert message.startswith("400: This model's maximum context length")


@pytest.mark.skipif(not (DEFAULT_TRACES / "azure-llm-2023").is_dir(), reason="no traces here")
def test_azure_trace_lengths_clipped_to_the_model(
    server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = azure(5)
    assert trace[0].arrival_s == 0.0 and trace[0].prompt_tokens == 4808  # the CSV's first row
    clipped = clip(trace, MAX_MODEL_LEN, max_prompt=32, max_output=2)
    assert all(r.prompt_tokens <= 32 and r.output_tokens <= 2 for r in clipped)
    argv = ["bench", "--url", server.base_url, "--api-key", API_KEY, "--trace", "azure",
            "--num-requests", "4", "--rate-scale", "100", "--max-prompt-tokens", "32",
            "--max-output-tokens", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("azure-2023 (first 4, rate ×100): 4 requests to smol")
    assert "completed 4, failed 0" in out and "TTFT ms" in out
