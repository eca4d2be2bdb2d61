"""Routing between two served models, /metrics, /health and the admin API."""

from __future__ import annotations

import contextlib

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import API_KEY, MODEL, MODEL_B, LiveServer

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _metrics(server: LiveServer) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """metric sample name → {sorted labels: value}."""
    response = httpx.get(f"{server.base_url}/metrics", headers=HEADERS)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def _per_model(samples: dict[tuple[tuple[str, str], ...], float], model: str) -> float:
    return sum(v for labels, v in samples.items() if ("model_name", model) in labels)


def test_requests_are_routed_by_the_model_field(client: openai.OpenAI, server: LiveServer) -> None:
    before = _metrics(server)["prism:prompt_tokens_total"]
    out = client.completions.create(model=MODEL_B, prompt=[1, 2, 3, 4, 5], max_tokens=2)
    assert out.model == MODEL_B
    after = _metrics(server)["prism:prompt_tokens_total"]
    assert _per_model(after, MODEL_B) - _per_model(before, MODEL_B) == 5
    assert _per_model(after, MODEL) == _per_model(before, MODEL)

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert chat.model == MODEL and chat.usage is not None
    final = _metrics(server)["prism:prompt_tokens_total"]
    assert _per_model(final, MODEL) - _per_model(after, MODEL) == chat.usage.prompt_tokens
    assert _per_model(final, MODEL_B) == _per_model(after, MODEL_B)


def test_metrics_has_the_key_series(client: openai.OpenAI, server: LiveServer) -> None:
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    with contextlib.suppress(openai.NotFoundError):
        client.completions.create(model="missing", prompt="Hello", max_tokens=1)
    m = _metrics(server)
    for name in (
        "prism:num_requests_running",
        "prism:num_requests_waiting",
        "prism:kv_cache_free_blocks",
        "prism:kv_cache_used_blocks",
        "prism:time_to_first_token_seconds_bucket",
        "prism:time_per_output_token_seconds_bucket",
        "prism:e2e_request_latency_seconds_count",
        "prism:generation_tokens_total",
        "prism:request_success_total",
    ):
        assert name in m, name
    for model in (MODEL, MODEL_B):
        assert _per_model(m["prism:kv_cache_mapped_bytes"], model) > 0
        assert m["prism:model_state"][(("model_name", model), ("state", "active"))] == 1
    requests = m["prism:http_requests_total"]
    assert requests[(("model_name", MODEL), ("status", "200"))] >= 1
    assert requests[(("model_name", ""), ("status", "404"))] >= 1  # unknown names: no label
    assert _per_model(m["prism:e2e_request_latency_seconds_count"], MODEL) >= 1


def test_health_needs_no_key(server: LiveServer) -> None:
    response = httpx.get(f"{server.base_url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "models": {MODEL: "active", MODEL_B: "active"}}


def test_admin_models_reports_memory(server: LiveServer) -> None:
    response = httpx.get(f"{server.base_url}/admin/models", headers=HEADERS)
    assert response.status_code == 200
    rows = {row["name"]: row for row in response.json()["models"]}
    assert set(rows) == {MODEL, MODEL_B}
    for row in rows.values():
        assert row["state"] == "active"
        assert row["kv_bytes_mapped"] > 0
        assert row["kv_blocks_free"] >= 0 and row["kv_blocks_used"] >= 0
