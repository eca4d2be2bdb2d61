"""Read deadlines (prism.server.connection): a connection that owes a request must send it.

A small app (no model: what is tested is the connection, not the routes) behind the real
uvicorn server with `http_protocol(1.0)`, driven over raw sockets for what no HTTP
client library sends: nothing at all, a head a byte at a time, a body that stops. A
request read in full is answered however long the answer takes, and a client within the
deadlines is served as usual.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from server_helpers import run_uvicorn

from prism.server.connection import http_protocol

DEADLINE_S = 1.0
SLACK_S = 1.5  # the event loop's timer and a loaded CI machine


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    @app.get("/slow")
    async def slow() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(5):  # 2.5 s of answer: longer than the read deadline
                await asyncio.sleep(0.5)
                yield f"chunk {i}\n".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    return app


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with run_uvicorn(_app(), read_timeout_s=DEADLINE_S) as (base, _):
        yield base


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _closed_with_408(sock: socket.socket, started: float) -> float:
    reply = _read_all(sock)
    elapsed = time.monotonic() - started
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply[:200]
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and f"{DEADLINE_S:g} s" in error["message"]
    return elapsed


def test_a_connection_that_sends_nothing_is_closed(url: str) -> None:
    with _connect(url) as sock:
        started = time.monotonic()
        elapsed = _closed_with_408(sock, started)
    assert DEADLINE_S * 0.9 <= elapsed <= DEADLINE_S + SLACK_S


def test_a_head_that_trickles_is_cut_at_the_deadline_from_its_first_byte(url: str) -> None:
    """A byte every 0.2 s keeps arriving, but the head as a whole is late (slowloris)."""
    head = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    with _connect(url) as sock:
        started = time.monotonic()
        sock.settimeout(0.2)
        sent = 0
        reply = b""
        while time.monotonic() < started + DEADLINE_S + SLACK_S:
            try:
                sock.sendall(head[sent : sent + 1])
                sent += 1
                reply += sock.recv(65536)
                if reply:
                    break
            except TimeoutError:
                continue
            except OSError:  # closed under our feet: the reply was read already
                break
        sock.settimeout(10)
        with_rest = reply + _read_all(sock)
    assert sent < len(head), "the head was sent in full before the deadline"
    assert with_rest.startswith(b"HTTP/1.1 408")


def test_a_body_that_stops_is_cut_after_the_deadline(url: str) -> None:
    body = b'{"x": "' + b"a" * 100 + b'"}'
    head = f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    with _connect(url) as sock:
        sock.sendall(head + body[:10])
        time.sleep(DEADLINE_S * 0.6)
        sock.sendall(body[10:20])  # a read within the deadline: the clock restarts
        started = time.monotonic()
        elapsed = _closed_with_408(sock, started)
    assert DEADLINE_S * 0.9 <= elapsed <= DEADLINE_S + SLACK_S


def test_an_answer_longer_than_the_deadline_is_not_cut(url: str) -> None:
    """The request was read in full: streaming its 2.5 s answer owes the client nothing."""
    with httpx.Client(timeout=10) as client:
        started = time.monotonic()
        response = client.get(f"{url}/slow")
        elapsed = time.monotonic() - started
    assert response.status_code == 200 and response.text.count("chunk") == 5
    assert elapsed > 2 * DEADLINE_S


def test_clients_within_the_deadlines_are_served_on_one_connection(url: str) -> None:
    """Keep-alive requests with pauses shorter than the deadline between them, and a
    body sent in two reads, all answered on the same connection."""
    with _connect(url) as sock:
        sock.settimeout(5)
        for size in (10, 1000, 5):
            body = b"a" * size
            head = f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n"
            sock.sendall(head.encode() + body[: size // 2])
            time.sleep(DEADLINE_S * 0.4)
            sock.sendall(body[size // 2 :])
            want = json.dumps({"bytes": size}, separators=(",", ":")).encode()
            reply = b""
            while not reply.endswith(want) and (chunk := sock.recv(65536)):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(want), reply[:200]
            time.sleep(DEADLINE_S * 0.6)


def test_connections_beyond_the_bound_get_503_and_are_closed() -> None:
    """With room for two, a third connection is answered 503 and closed at once; when
    one of the two leaves, the next is served."""
    with run_uvicorn(_app(), read_timeout_s=10.0, max_connections=2) as (base, server):
        first, second = _connect(base), _connect(base)
        try:
            deadline = time.monotonic() + 5
            while len(server.server_state.connections) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            with _connect(base) as third:
                reply = _read_all(third)
            assert reply.startswith(b"HTTP/1.1 503"), reply[:200]
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "overloaded"
            first.close()
            deadline = time.monotonic() + 5
            while len(server.server_state.connections) > 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            with httpx.Client(timeout=10) as client:
                assert client.post(f"{base}/echo", content=b"abc").json() == {"bytes": 3}
        finally:
            first.close()
            second.close()


def test_zero_turns_the_deadlines_off_and_negative_is_refused() -> None:
    assert http_protocol(0.0).read_timeout_s == 0.0
    with pytest.raises(ValueError, match="read timeout must be >= 0"):
        http_protocol(-1.0)
    with pytest.raises(ValueError, match="max connections must be at least 1"):
        http_protocol(1.0, 0)
