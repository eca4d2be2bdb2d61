"""Slow and stalled clients: a client that stops reading its stream is held back (the
server buffers a bounded amount for it), stalls no one, and is aborted when it leaves;
connections that send their request head a byte at a time (slowloris) do not keep the
server from serving others (and are closed at the read deadline: test_read_deadline.py)."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import openai
from server_helpers import (
    MODEL,
    MODEL_B,
    LiveServer,
    aborted_requests,
    connect,
    idle,
    kv_cache_all_free,
    request_head,
    wait_until,
)

# asyncio pauses a transport's writer above this many buffered bytes (its default
# high-water mark); uvicorn's `send` then waits until the buffer drains below the low one.
HIGH_WATER = 64 << 10
OTHERS_BOUND_S = 5.0  # a short completion beside the stalled client, on 2 shared cores


def server_side(server: LiveServer, sock: socket.socket) -> Any:
    """uvicorn's protocol object of `sock`'s connection, or None before it is accepted."""
    assert server.http is not None
    # a copy (atomic under the GIL): the server's thread adds and removes connections
    for protocol in server.http.server_state.connections.copy():
        if getattr(protocol, "client", None) == sock.getsockname():
            return protocol
    return None


def timed_completion(client: openai.OpenAI) -> float:
    start = time.monotonic()
    out = client.completions.create(model=MODEL_B, prompt="Hi", max_tokens=8)
    assert out.usage is not None and out.usage.completion_tokens == 8
    return time.monotonic() - start


def test_a_client_that_stops_reading_is_held_back_and_aborted_when_it_leaves(
    client: openai.OpenAI, server: LiveServer
) -> None:
    """A streamed chat (450 tokens, 20 logprobs each: ~2.5 KB an event) whose client
    never reads. Loopback's send buffer grows to ~4 MiB, so the test shrinks this
    connection's to 16 KiB for the server's own flow control to show within seconds:
    the writer pauses, the bytes uvicorn holds stay under the high-water mark plus one
    event while the engine goes on, another client's completion returns within the
    bound; when the client closes, its request is aborted and its KV blocks freed."""
    engine = server.engine(MODEL)
    wait_until(lambda: idle(engine))
    aborted = aborted_requests(server)
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 450,
            "ignore_eos": True,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 20,
        }
    ).encode()
    with connect(server, receive_buffer=4096) as sock:
        wait_until(lambda: server_side(server, sock) is not None, timeout=5)
        conn = server_side(server, sock)
        conn.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10
        )
        sock.sendall(request_head("/v1/chat/completions", f"Content-Length: {len(body)}") + body)
        wait_until(lambda: conn.flow.write_paused, timeout=15)
        others_s = timed_completion(client)
        held = [conn.transport.get_write_buffer_size()]
        for _ in range(20):
            time.sleep(0.05)
            held.append(conn.transport.get_write_buffer_size())
        assert conn.flow.write_paused
        assert engine.num_in_flight == 1, "the request ended before the client left"
    print(
        f"\nstalled reader: uvicorn holds at most {max(held)} B; another client's 8-token "
        f"completion took {others_s:.2f} s"
    )
    assert max(held) <= HIGH_WATER + (16 << 10)
    assert others_s <= OTHERS_BOUND_S
    wait_until(lambda: idle(engine), timeout=15)
    wait_until(lambda: kv_cache_all_free(engine))
    assert aborted_requests(server) == aborted + 1


SLOW_CONNECTIONS = 20


def test_slowloris_connections_do_not_block_others(
    client: openai.OpenAI, server: LiveServer
) -> None:
    """Twenty connections send a request head a byte every 0.2 s for 6 s or more (past
    uvicorn's 5 s keep-alive timeout, which does not apply before a first request);
    meanwhile completions and /health are answered within the bound. Within the read
    deadline (30 s here) they stay open; `test_read_deadline.py` checks the cut."""
    head = request_head("/v1/completions", "X-Padding: " + "a" * 100)
    socks = [connect(server) for _ in range(SLOW_CONNECTIONS)]
    latencies = []
    try:
        wait_until(lambda: all(server_side(server, s) is not None for s in socks), timeout=5)
        start = time.monotonic()
        sent = 0
        while time.monotonic() < start + 6 or len(latencies) < 4:
            for sock in socks:
                sock.sendall(head[sent : sent + 1])
            sent += 1
            if sent % 5 == 0:
                latencies.append(timed_completion(client))
                assert httpx.get(f"{server.base_url}/health").status_code == 200
            time.sleep(0.2)
        still_open = sum(server_side(server, s) is not None for s in socks)
        held_s = time.monotonic() - start
    finally:
        for sock in socks:
            sock.close()
    print(
        f"\nslowloris: {SLOW_CONNECTIONS} connections, {len(latencies)} completions, max "
        f"{max(latencies):.2f} s; {still_open} still open after {sent} bytes in {held_s:.1f} s"
    )
    assert sent < len(head)  # the heads were still incomplete
    assert max(latencies) <= OTHERS_BOUND_S
