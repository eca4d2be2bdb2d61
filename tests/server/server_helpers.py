"""Helpers for prism.server tests: a live uvicorn server in a thread, waiting on engines.

A uniquely named module rather than `conftest`, so `import` cannot pick up another
folder's conftest.py.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import torch
import uvicorn
from fastapi import FastAPI

from prism.engine import Engine, EngineConfig
from prism.engine.async_engine import AsyncEngine
from prism.kvcache import ElasticKVCache, KVCacheConfig
from prism.memory import PagePool, make_vmm
from prism.models import ModelConfig, load_model
from prism.server import ModelRegistry
from prism.server.connection import DEFAULT_READ_TIMEOUT_S, http_protocol
from prism.serving.async_worker import AsyncModel

API_KEY = "test-key"
MODEL = "smol"
MODEL_B = "smol-b"  # capacity 3: 2 running + 1 waiting
MAX_MODEL_LEN = 512


@dataclass(frozen=True)
class LiveServer:
    base_url: str  # http://127.0.0.1:PORT
    registry: ModelRegistry
    http: uvicorn.Server | None = None  # for tests that look at its connections

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"

    def engine(self, name: str = MODEL) -> AsyncModel:
        model = self.registry.get(name)
        assert model is not None
        return model.engine


@contextmanager
def run_server(app: FastAPI) -> Iterator[str]:
    """uvicorn serving `app` in a thread on a free 127.0.0.1 port; yields the base URL."""
    with run_uvicorn(app) as (url, _):
        yield url


@contextmanager
def run_uvicorn(
    app: FastAPI, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S, max_connections: int | None = None
) -> Iterator[tuple[str, uvicorn.Server]]:
    """`run_server`, yielding the uvicorn server as well (h11 with read deadlines, as
    `prism serve` runs it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app, log_level="warning", http=http_protocol(read_timeout_s, max_connections)
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), timeout=30)
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def connect(
    server: LiveServer, timeout: float = 10.0, receive_buffer: int | None = None
) -> socket.socket:
    """A raw connection to the server, for what no HTTP client library sends. A small
    `receive_buffer` is set before connecting, so the window is small from the start."""
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(timeout)
    sock.connect((host, int(port)))
    return sock


def request_head(target: str, *headers: str, method: str = "POST") -> bytes:
    """A request line and headers (with the API key, a JSON body) as raw bytes."""
    lines = [
        f"{method} {target} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {API_KEY}",
        "Content-Type: application/json",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def aborted_requests(server: LiveServer, model: str = MODEL) -> float:
    """Engine requests of `model` abandoned by their clients, from /metrics."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    text = httpx.get(f"{server.base_url}/metrics", headers=headers).text
    key = f'prism:request_success_total{{finished_reason="abort",model_name="{model}"}}'
    lines = [line for line in text.splitlines() if line.startswith(key)]
    return float(lines[0].split()[-1]) if lines else 0.0


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s"
        time.sleep(0.02)


def idle(engine: AsyncEngine | AsyncModel) -> bool:
    """No request in flight, running or waiting, and no KV block held by a request."""
    stats = engine.stats
    return (
        engine.num_in_flight == 0
        and stats.num_running == 0
        and stats.num_waiting == 0
        and stats.kv_used_blocks == 0
    )


def kv_cache_all_free(model: AsyncEngine | AsyncModel) -> bool:
    """The cache's own count: every mapped block but padding block 0 is free or an
    evictable prefix-cache block. Read from the test thread, so only once idle."""
    engine = model.engine
    assert engine is not None, "the model was never woken"
    kv_cache = engine.kv_cache
    mapped = kv_cache.mapped_groups * kv_cache.blocks_per_group
    return kv_cache.free_blocks + engine.kv.num_evictable == mapped - 1


TINY = ModelConfig(
    architecture="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=256,
)


def tiny_engine(max_num_seqs: int = 8) -> Engine:
    """A two-layer random-weight model without a tokenizer: the real engine, fast."""
    config = EngineConfig(
        name="tiny", max_model_len=256, max_num_seqs=max_num_seqs, kv_cache_bytes=4 << 20
    )
    loaded = load_model(TINY, dtype=torch.float32, load_format="dummy")
    pool = PagePool(make_vmm("cpu", config.host_page_size), config.kv_cache_bytes)
    kv_config = KVCacheConfig(
        name=config.name,
        num_layers=TINY.num_layers,
        num_kv_heads=TINY.num_kv_heads,
        head_dim=TINY.head_dim,
        block_size=config.block_size,
        dtype=torch.float32,
        max_tokens=1024,
    )
    return Engine(loaded.model, None, ElasticKVCache(kv_config, pool), config)
