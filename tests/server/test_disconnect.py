"""A client that goes away mid-request aborts its engine request and frees its KV blocks."""

from __future__ import annotations

import httpx
import pytest
from server_helpers import (
    API_KEY,
    MODEL,
    LiveServer,
    aborted_requests,
    idle,
    kv_cache_all_free,
    wait_until,
)

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
# Long enough to be still running when the client leaves; the abort counter then
# tells an aborted request from one that ran to its end.
LONG = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "max_tokens": 400,
    "ignore_eos": True,
}


def test_closing_a_stream_aborts_the_request(server: LiveServer) -> None:
    engine = server.engine(MODEL)
    wait_until(lambda: idle(engine))
    aborted = aborted_requests(server)
    url = f"{server.api_url}/chat/completions"
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", url, json={**LONG, "stream": True}, headers=HEADERS) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        data = [line for line in (next(lines) for _ in range(6)) if line.startswith("data:")]
        assert len(data) >= 2  # the role chunk and at least one token
        assert engine.num_in_flight == 1
        assert engine.stats.kv_used_blocks > 0
    wait_until(lambda: idle(engine), timeout=15)
    wait_until(lambda: kv_cache_all_free(engine))
    assert aborted_requests(server) == aborted + 1


def test_a_non_streaming_client_that_times_out_aborts_the_request(server: LiveServer) -> None:
    engine = server.engine(MODEL)
    wait_until(lambda: idle(engine))
    aborted = aborted_requests(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.api_url}/chat/completions", json=LONG, headers=HEADERS, timeout=1.5)
    wait_until(lambda: idle(engine), timeout=15)
    wait_until(lambda: kv_cache_all_free(engine))
    assert aborted_requests(server) == aborted + 1
