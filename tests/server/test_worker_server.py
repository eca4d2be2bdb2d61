"""Two models on one CPU worker whose budget holds only one of them at a time, served by
a live server: the `openai` client, the admin API, /metrics and `prism ctl`.

The embedded SmolLM2-135M-Instruct is served twice, as `alpha` and `beta`, built the way
`prism serve` builds it (`ModelRegistry.load`); both start cached, not woken.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import API_KEY, LiveServer, idle, run_server, wait_until

from prism.cli import main
from prism.engine import EngineConfig
from prism.models import default_model_path
from prism.server import ModelRegistry, ModelSpec, create_app
from prism.serving.worker import WorkerConfig

ALPHA, BETA = "alpha", "beta"
BUDGET = 800 << 20  # one model's weights (513 MiB) and its KV; not two models' weights
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    path = str(default_model_path())
    registry = ModelRegistry.load(
        [ModelSpec(ALPHA, path), ModelSpec(BETA, path)],
        worker=WorkerConfig(budget_bytes=BUDGET),
        engine=EngineConfig(max_model_len=256, max_num_seqs=4),
        max_waiting=4,
    )
    with run_server(create_app(registry, api_key=API_KEY)) as url:
        yield LiveServer(url, registry)
    assert not any(w.is_running for w in registry.workers), "the app did not stop its worker"


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.api_url, api_key=API_KEY, max_retries=0, timeout=120)


def _admin(live: LiveServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{live.base_url}/admin{path}", headers=HEADERS, **kwargs)


def _rows(live: LiveServer) -> dict[str, dict[str, Any]]:
    response = _admin(live, "GET", "/models")
    assert response.status_code == 200
    return {row["name"]: row for row in response.json()["models"]}


def _states(client: openai.OpenAI) -> dict[str, str]:
    return {m.id: getattr(m, "state", "") for m in client.models.list()}


def _complete(client: openai.OpenAI, model: str) -> str:
    out = client.completions.create(model=model, prompt=PROMPT, **GREEDY)
    assert out.model == model and out.usage is not None and out.usage.completion_tokens == 8
    return out.choices[0].text


def test_models_start_cached_and_take_turns_in_the_pool(
    client: openai.OpenAI, live: LiveServer
) -> None:
    """Both start cached; a request wakes its model, and as the budget holds one model at
    a time, waking one puts the other (idle) to sleep. Every request succeeds."""
    assert _states(client) == {ALPHA: "cached", BETA: "cached"}
    assert httpx.get(f"{live.base_url}/health").json()["status"] == "ok"
    limit = _admin(live, "POST", f"/models/{BETA}/limit", json={"kv_bytes": 1 << 26})
    assert limit.status_code == 409 and "first wake" in limit.json()["error"]["message"]

    first = _complete(client, ALPHA)
    assert _states(client) == {ALPHA: "active", BETA: "cached"}
    chat = client.chat.completions.create(
        model=BETA, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert chat.model == BETA and chat.choices[0].message.content is not None
    assert _states(client) == {ALPHA: "asleep", BETA: "active"}
    assert _complete(client, ALPHA) == first  # woken again: the same weights, the same answer
    assert _states(client) == {ALPHA: "active", BETA: "asleep"}
    rows = _rows(live)
    assert (rows[ALPHA]["wakes"], rows[ALPHA]["sleeps"]) == (2, 1)
    assert (rows[BETA]["wakes"], rows[BETA]["sleeps"]) == (1, 1)
    assert rows[BETA]["weights_bytes_mapped"] == 0 and rows[BETA]["kv_bytes_mapped"] == 0


def test_admin_sleep_then_the_next_request_wakes_it_with_the_same_answer(
    client: openai.OpenAI, live: LiveServer
) -> None:
    """Admin sleep unmaps all of the model's memory; its next request wakes it and the
    greedy answer is the one it gave before."""
    woken = _admin(live, "POST", f"/models/{BETA}/wake")
    assert woken.status_code == 200 and woken.json()["state"] == "active"
    before = _complete(client, BETA)
    wakes = _rows(live)[BETA]["wakes"]

    slept = _admin(live, "POST", f"/models/{BETA}/sleep")
    assert slept.status_code == 200
    row = slept.json()
    assert row["state"] == "asleep"
    assert row["weights_bytes_mapped"] == 0 and row["kv_bytes_mapped"] == 0
    assert _states(client)[BETA] == "asleep"

    assert _complete(client, BETA) == before
    row = _rows(live)[BETA]
    assert row["state"] == "active" and row["wakes"] == wakes + 1
    assert row["weights_bytes_mapped"] >= row["weight_bytes"] > 0


def test_sleep_is_refused_while_requests_run(live: LiveServer) -> None:
    """409 naming the running request while a stream is open; once it ends, sleep works."""
    body = {"model": ALPHA, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}
    body["stream"] = True
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{live.api_url}/completions", json=body, headers=HEADERS) as stream,
    ):
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert sum(1 for line in (next(lines) for _ in range(4)) if line.startswith("data:")) >= 2
        refused = _admin(live, "POST", f"/models/{ALPHA}/sleep")
        assert refused.status_code == 409
        error = refused.json()["error"]
        assert error["code"] == "conflict" and "1 running" in error["message"]
    wait_until(lambda: idle(live.engine(ALPHA)), timeout=30)
    assert _admin(live, "POST", f"/models/{ALPHA}/sleep").json()["state"] == "asleep"
    unknown = _admin(live, "POST", "/models/nosuch/sleep")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_memory_accounting_adds_up(client: openai.OpenAI, live: LiveServer) -> None:
    """Budget = used + free; used = the tenants' pages; each model's tenants are what
    /admin/models reports for it."""
    _complete(client, BETA)
    response = _admin(live, "GET", "/memory")
    assert response.status_code == 200
    [device] = response.json()["devices"]
    page = device["page_size"]
    assert (device["device"], device["mode"]) == ("cpu", "prism")
    assert device["budget_bytes"] == BUDGET // page * page
    assert device["used_bytes"] + device["free_bytes"] == device["budget_bytes"]
    tenants = {t["name"]: t for t in device["tenants"]}
    assert all(t["bytes"] == t["pages"] * page for t in tenants.values())
    assert sum(t["bytes"] for t in tenants.values()) == device["used_bytes"]
    for name, row in _rows(live).items():
        assert tenants[f"{name}/weights"]["bytes"] == row["weights_bytes_mapped"]
        assert tenants[f"{name}/kv"]["bytes"] >= row["kv_bytes_mapped"]
        assert tenants[f"{name}/kv"]["limit_bytes"] == row["kv_bytes_limit"]
    assert tenants[f"{BETA}/weights"]["bytes"] >= _rows(live)[BETA]["weight_bytes"]


def test_kv_limit(live: LiveServer) -> None:
    """A limit becomes the KV tenant's limit in the pool; bad values are 400s naming the
    field (0 is below the cache's always-mapped padding group)."""
    limited = _admin(live, "POST", f"/models/{BETA}/limit", json={"kv_bytes": 64 << 20})
    assert limited.status_code == 200 and limited.json()["kv_bytes_limit"] == 64 << 20
    tenants = {t["name"]: t for t in _admin(live, "GET", "/memory").json()["devices"][0]["tenants"]}
    assert tenants[f"{BETA}/kv"]["limit_bytes"] == 64 << 20
    for bad in ({"kv_bytes": -1}, {"kv_bytes": 0}, {}):
        response = _admin(live, "POST", f"/models/{BETA}/limit", json=bad)
        assert response.status_code == 400 and "kv_bytes" in response.json()["error"]["message"]
    restored = _admin(live, "POST", f"/models/{BETA}/limit", json={"kv_bytes": BUDGET})
    assert restored.status_code == 200


def test_metrics_give_each_models_state_wakes_sleeps_and_weights(live: LiveServer) -> None:
    """The per-model series agree with /admin/models; the pool's budget is there too."""
    text = httpx.get(f"{live.base_url}/metrics", headers=HEADERS).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    rows = _rows(live)
    for name, row in rows.items():
        label = (("model_name", name),)
        state = (("model_name", name), ("state", row["state"]))
        assert samples[("prism:model_state", state)] == 1
        assert samples[("prism:model_wakes_total", label)] == row["wakes"]
        assert samples[("prism:model_sleeps_total", label)] == row["sleeps"]
        assert samples[("prism:weights_bytes_mapped", label)] == row["weights_bytes_mapped"]
        assert samples[("prism:num_preemptions_total", label)] == row["preemptions"] >= 0
    device = (("device", "cpu"),)
    assert samples[("prism:pool_budget_bytes", device)] == BUDGET
    assert 0 <= samples[("prism:pool_free_bytes", device)] < BUDGET


def test_prism_ctl(live: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    """`prism ctl` lists, sleeps, wakes and limits through the admin API; errors are the
    server's message and a non-zero exit."""
    auth = ["--url", live.base_url, "--api-key", API_KEY]

    def ctl(*argv: str) -> tuple[int, str, str]:
        code = main(["ctl", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = ctl("list", *auth)
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split()[:3] == ["NAME", "STATE", "DEVICE"]
    assert {line.split()[0]: line.split()[1] for line in lines} == {
        name: row["state"] for name, row in _rows(live).items()
    }
    code, out, _ = ctl(*auth, "sleep", BETA)  # the options before the action work too
    assert code == 0 and out.splitlines()[1].split()[:2] == [BETA, "asleep"]
    code, out, _ = ctl("wake", BETA, *auth)
    assert code == 0 and out.splitlines()[1].split()[:2] == [BETA, "active"]
    code, out, _ = ctl("limit", BETA, "128MiB", *auth)
    assert code == 0 and "128.0 MiB" in out
    code, out, _ = ctl("memory", *auth)
    assert code == 0 and f"{BETA}/weights" in out and "budget 800.0 MiB" in out

    code, out, err = ctl("sleep", "nosuch", *auth)
    assert code == 1 and out == ""
    assert "404" in err and "The model `nosuch` does not exist." in err
    code, _, err = ctl("list", "--url", live.base_url, "--api-key", "wrong")
    assert code == 1 and "Incorrect API key" in err
