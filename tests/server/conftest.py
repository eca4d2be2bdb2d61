"""Fixtures for prism.server tests: one live server for the whole session (loading the
model is most of the suite's cost) serving the embedded SmolLM2-135M-Instruct twice,
as `smol` and `smol-b`, on the CPU, behind an API key. Helpers live in server_helpers.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from server_helpers import API_KEY, MAX_MODEL_LEN, MODEL, MODEL_B, LiveServer, run_server

from prism.engine import Engine, EngineConfig
from prism.engine.async_engine import AsyncEngine
from prism.models import default_model_path
from prism.server import ModelRegistry, create_app


def _registry() -> ModelRegistry:
    path = str(default_model_path())
    registry = ModelRegistry()
    for name, max_num_seqs, max_waiting in ((MODEL, 16, 16), (MODEL_B, 2, 1)):
        config = EngineConfig(name=name, max_model_len=MAX_MODEL_LEN, max_num_seqs=max_num_seqs)
        engine = AsyncEngine(Engine.create(path, config=config), max_waiting=max_waiting)
        registry.add(name, engine, path)
    return registry


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    registry = _registry()
    with run_server(create_app(registry, api_key=API_KEY)) as url:
        yield LiveServer(url, registry)
    assert not any(m.engine.is_running for m in registry), "the app did not stop its engines"


@pytest.fixture(scope="session")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def async_client(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.api_url, api_key=API_KEY, max_retries=0, timeout=120)
