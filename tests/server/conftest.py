"""Fixtures for prism.server tests: one live server for the whole session (loading the
model is most of the suite's cost) serving the embedded SmolLM2-135M-Instruct twice,
as `smol` and `smol-b`, woken at start on one CPU worker whose budget holds both, behind
an API key. Helpers live in server_helpers.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from server_helpers import API_KEY, MAX_MODEL_LEN, MODEL, MODEL_B, LiveServer, run_uvicorn

from prism.engine import EngineConfig
from prism.models import default_model_path
from prism.server import ModelRegistry, create_app
from prism.serving.async_worker import AsyncWorker
from prism.serving.model_slot import ModelSpec
from prism.serving.worker import DeviceWorker, WorkerConfig

BUDGET = 3 << 30  # both models' weights (2 × 0.5 GiB) and all the KV they can use: no pressure


def _registry() -> ModelRegistry:
    path = str(default_model_path())
    worker = DeviceWorker(WorkerConfig(budget_bytes=BUDGET))
    max_waiting = {}
    for name, max_num_seqs, waiting in ((MODEL, 16, 16), (MODEL_B, 2, 1)):
        config = EngineConfig(name=name, max_model_len=MAX_MODEL_LEN, max_num_seqs=max_num_seqs)
        worker.add_model(ModelSpec(name, path, engine=config))
        assert worker.wake(name)
        max_waiting[name] = waiting
    return ModelRegistry([AsyncWorker(worker, max_waiting=max_waiting)])


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    registry = _registry()
    with run_uvicorn(create_app(registry, api_key=API_KEY)) as (url, http):
        yield LiveServer(url, registry, http)
    assert not any(m.engine.is_running for m in registry), "the app did not stop its engines"


@pytest.fixture(scope="session")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def async_client(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.api_url, api_key=API_KEY, max_retries=0, timeout=120)
