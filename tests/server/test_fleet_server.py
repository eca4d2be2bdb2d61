"""`prism serve --config` over a two-device fleet: the real server (uvicorn) over the
controller and two CPU worker processes, driven with the real `openai` client and the
admin API; a worker killed mid-request ends its requests with an explicit error and is
restarted."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import gguf
import httpx
import openai
from server_helpers import API_KEY, run_server, wait_until

from prism.cli import _fleet_registry, build_parser
from prism.models import Tokenizer, default_model_path
from prism.server import create_app
from prism.server.fleet_registry import FleetRegistry
from prism.serving.worker_process import ProcessWorker

sys.path.insert(0, str(Path(__file__).parents[1] / "serving"))  # the controller's helpers
from controller_helpers import TINY_HF_CONFIG, fleet_yaml

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}<|im_start|>assistant\n"
)
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _tiny_with_tokenizer(directory: Path) -> Path:
    """Two layers and SmolLM2's vocabulary, its tokenizer.json and a chat template: random
    weights (`load_format: dummy`), a real tokenizer, as the server needs."""
    config = {**TINY_HF_CONFIG, "vocab_size": 49152, "tie_word_embeddings": True}
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    tokenizer = Tokenizer.from_gguf(gguf.GGUFReader(default_model_path()))
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    return directory


@contextmanager
def fleet_server(tmp_path: Path) -> Iterator[tuple[str, FleetRegistry]]:
    """Models a (home cpu:0) and b (home cpu:1), each device a worker process, served by
    the app `prism serve --config` builds; yields the base URL and the registry."""
    path = tmp_path / "fleet.yaml"
    path.write_text(fleet_yaml(_tiny_with_tokenizer(tmp_path / "tiny"), "ab", budget="256MiB"))
    args = build_parser({}).parse_args(["serve", "--config", str(path)])
    registry = _fleet_registry(args)
    assert isinstance(registry, FleetRegistry)
    with run_server(create_app(registry, api_key=API_KEY)) as url:
        assert registry.controller.homes() == {"a": "cpu:0", "b": "cpu:1"}
        yield url, registry
    assert not any(w.client.alive for w in registry.controller.workers.values())


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _states(client: openai.OpenAI) -> dict[str, str]:
    return {m.id: (m.model_extra or {})["state"] for m in client.models.list().data}


def test_a_two_device_fleet_serves_the_openai_api_and_the_admin_api(tmp_path: Path) -> None:
    """Completions and chat, streamed and not, for a model on each worker; /v1/models
    with states; admin wake and sleep, memory per device, health and metrics."""
    with fleet_server(tmp_path) as (url, _):
        client = _client(url)
        assert _states(client) == {"a": "cached", "b": "cached"}
        for model in ("a", "b"):
            done = client.completions.create(model=model, prompt="Hi", max_tokens=6, **GREEDY)
            assert done.choices[0].finish_reason == "length"
            assert done.usage is not None and done.usage.completion_tokens == 6
            chunks = client.completions.create(
                model=model, prompt="Hi", max_tokens=6, stream=True, **GREEDY
            )
            assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
            messages = [{"role": "user", "content": "Hello!"}]
            chat = client.chat.completions.create(
                model=model, messages=messages, max_tokens=5, **GREEDY
            )
            assert chat.usage.completion_tokens == 5 and chat.choices[0].finish_reason == "length"
            stream = client.chat.completions.create(
                model=model, messages=messages, max_tokens=5, stream=True, **GREEDY
            )
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text == chat.choices[0].message.content
        wait_until(lambda: _states(client) == {"a": "active", "b": "active"}, timeout=5)

        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as admin:
            asleep = admin.post("/admin/models/b/sleep")
            assert asleep.status_code == 200 and asleep.json()["state"] == "asleep"
            assert asleep.json()["device"] == "cpu:1"
            woken = admin.post("/admin/models/b/wake")
            assert woken.status_code == 200 and woken.json()["state"] == "active"
            rows = admin.get("/admin/models").json()["models"]
            assert {r["name"]: r["device"] for r in rows} == {"a": "cpu:0", "b": "cpu:1"}
            devices = admin.get("/admin/memory").json()["devices"]
            assert [d["device"] for d in devices] == ["cpu:0", "cpu:1"]
            assert {t["model"] for t in devices[1]["tenants"]} == {"b"}
            assert admin.get("/health").json() == {
                "status": "ok",
                "models": {"a": "active", "b": "active"},
            }
            metrics = admin.get("/metrics").text
            assert 'prism:model_state{model_name="b",state="active"} 1.0' in metrics
            assert 'prism:pool_budget_bytes{device="cpu:1"}' in metrics


def test_a_killed_worker_fails_its_requests_explicitly_and_serves_again(tmp_path: Path) -> None:
    """cpu:0 is killed with a stream and a plain request of model a in flight: the stream
    gets an error event then [DONE], the plain request a 503 with Retry-After; b, on
    cpu:1, is not touched; a is served again once the worker is restarted."""
    with fleet_server(tmp_path) as (url, registry):
        client = _client(url)
        body = {"model": "a", "prompt": "Hi", "max_tokens": 1800, "ignore_eos": True}
        with (
            ThreadPoolExecutor(1) as pool,
            httpx.Client(base_url=url, headers=AUTH, timeout=60) as http,
            http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream,
        ):
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # it runs
            plain = pool.submit(http.post, "/v1/completions", json=body)
            wait_until(lambda: registry.controller.in_flight() == 2, timeout=10)
            worker = registry.controller.workers["cpu:0"].client
            assert isinstance(worker, ProcessWorker) and worker.pid is not None
            os.kill(worker.pid, signal.SIGKILL)
            events = [line for line in lines if line.startswith("data: ")]
            failed = plain.result(timeout=20)
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == "service_unavailable" and "cpu:0" in error["message"]
        assert failed.status_code == 503 and failed.headers["retry-after"]
        assert failed.json()["error"]["code"] == "service_unavailable"

        other = client.completions.create(model="b", prompt="Hi", max_tokens=4, **GREEDY)
        assert other.usage is not None and other.usage.completion_tokens == 4
        again = client.completions.create(model="a", prompt="Hi", max_tokens=4, **GREEDY)
        assert again.usage is not None and again.usage.completion_tokens == 4
        assert [e.kind for e in registry.controller.events if e.worker == "cpu:0"][-2:] == [
            "crash",
            "restart",
        ]
        wait_until(lambda: registry.controller.in_flight() == 0, timeout=5)
