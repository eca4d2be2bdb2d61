"""Oversized and hostile requests: a body over the limit is refused with 413 before it has
been read, a request line or headers over h11's 16 KiB with 400, hostile JSON with an
OpenAI-shaped 400; the server keeps serving after each. Raw sockets send what no HTTP
client library would."""

from __future__ import annotations

import http.client
import json
import select
import socket
from typing import Any

import httpx
import openai
import pytest
from server_helpers import (
    API_KEY,
    MAX_MODEL_LEN,
    MODEL,
    LiveServer,
    connect,
    request_head,
    run_server,
)

from prism.engine.sampling_params import SamplingParams
from prism.server import ModelRegistry, create_app
from prism.server.limits import DEFAULT_MAX_BODY_BYTES as LIMIT

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    response = http.client.HTTPResponse(sock, method="POST")
    response.begin()
    return response.status, response.read()


def error_of(body: bytes) -> dict[str, Any]:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


def still_serves(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    assert out.usage is not None and out.usage.completion_tokens == 1


def test_a_body_over_the_limit_is_413_naming_it(client: openai.OpenAI, server: LiveServer) -> None:
    """Through the `openai` client; a body of exactly the limit (JSON padded with blanks)
    is still served."""
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt="x" * LIMIT, max_tokens=1)
    assert e.value.status_code == 413
    error = error_of(e.value.response.content)
    assert error["code"] == "request_too_large" and str(LIMIT) in error["message"]
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 1}).encode()
    padded = body[:-1] + b" " * (LIMIT - len(body)) + b"}"
    assert len(padded) == LIMIT
    headers = {**AUTH, "Content-Type": "application/json"}
    response = httpx.post(f"{server.api_url}/completions", content=padded, headers=headers)
    assert response.status_code == 200


def test_the_limit_is_the_one_the_app_is_given() -> None:
    """`create_app(max_body_bytes=...)`, as `prism serve --max-body-bytes` passes it (a
    server without models: the body is refused before any route)."""
    with run_server(create_app(ModelRegistry([]), max_body_bytes=1000)) as url:
        response = httpx.post(f"{url}/v1/completions", content=b" " * 1001)
        assert response.status_code == 413 and "1000 bytes" in response.text
        response = httpx.post(f"{url}/v1/completions", content=b" " * 1000)
        assert response.status_code == 400  # read, and found not to be JSON


def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    client: openai.OpenAI, server: LiveServer
) -> None:
    """Content-Length says 10 GiB and no byte of the body follows: the 413 comes at once
    (a server that read the body first would wait for it, and the read time out)."""
    with connect(server, timeout=5) as sock:
        sock.sendall(request_head("/v1/completions", f"Content-Length: {10 << 30}"))
        status, body = read_response(sock)
    assert status == 413 and error_of(body)["code"] == "request_too_large"
    still_serves(client)


def test_a_chunked_body_is_refused_once_it_passes_the_limit(
    client: openai.OpenAI, server: LiveServer
) -> None:
    """A chunked body (no length up front) of the limit plus one byte, never ended: the
    413 comes once the bytes received pass the limit, not at the end of the body."""
    chunk = b" " * (64 << 10)
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    with connect(server, timeout=5) as sock:
        sock.sendall(request_head("/v1/completions", "Transfer-Encoding: chunked"))
        for _ in range(LIMIT // len(chunk)):
            sock.sendall(framed)
        sock.sendall(b"1\r\n \r\n")
        status, body = read_response(sock)
    assert status == 413 and str(LIMIT) in error_of(body)["message"]
    still_serves(client)


MiB = 1 << 20


@pytest.mark.parametrize(
    "head",
    [
        request_head("/v1/models", "X-Big: " + "a" * MiB, method="GET"),
        request_head("/v1/models", *["X-Small: b"] * (MiB // 12), method="GET"),
        request_head("/v1/models/" + "a" * MiB, method="GET"),
    ],
    ids=["1-MiB-header", "100k-headers", "1-MiB-URL"],
)
def test_a_huge_request_head_is_400_and_the_server_keeps_serving(
    head: bytes, client: openai.OpenAI, server: LiveServer
) -> None:
    """h11 refuses a request line and headers over 16 KiB: a 400, and the connection
    closed. The client sends in 64 KiB pieces and stops when the answer comes; it reads
    the status line only (the body runs to the close, which a reset may cut short)."""
    with connect(server) as sock:
        try:
            for start in range(0, len(head), 64 << 10):
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(head[start : start + (64 << 10)])
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = http.client.HTTPResponse(sock)
        response.begin()
    assert response.status in (400, 431)
    still_serves(client)


def _completion(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 1, **fields}).encode()


def _with_raw(field: str, raw: bytes) -> bytes:
    """A completion request whose `field` is `raw`, as is (NaN, Infinity, huge numbers)."""
    return _completion()[:-1] + b', "' + field.encode() + b'": ' + raw + b"}"


DEEP = 100_000
HOSTILE = {  # name → (body, the error's param, words of its message)
    "100k-nested-arrays": (b"[" * DEEP + b"]" * DEEP, None, "nested too deeply"),
    "100k-nested-objects-in-a-field": (
        _with_raw("user", b'{"a": ' * DEEP + b"1" + b"}" * DEEP),
        None,
        "nested too deeply",
    ),
    "invalid-utf8": (_completion()[:-1] + b', "user": "\xff\xfe"}', None, "not valid UTF-8"),
    "NaN-temperature": (_with_raw("temperature", b"NaN"), "temperature", "temperature"),
    "Infinity-max_tokens": (_with_raw("max_tokens", b"Infinity"), "max_tokens", "finite"),
    "1e999-top_p": (_with_raw("top_p", b"1e999"), "top_p", "top_p"),
    "5000-digit-max_tokens": (_with_raw("max_tokens", b"9" * 5000), None, "parsing the body"),
    "10k-stop-strings": (_completion(stop=["x"] * 10_000), "stop", "at most 64"),
    "n-10**9": (_completion(n=10**9), "n", "n"),
    "max_tokens-10**18": (_completion(max_tokens=10**18), None, "context length"),
    "1-MiB-text-prompt": (_completion(prompt="Hi " * 350_000), None, "context length"),
    "100k-token-prompt": (_completion(prompt=[1] * 100_000), None, "context length"),
    "100k-prompts": (_completion(prompt=[[1]] * 100_000), "n", "100000 sequences"),
}
assert SamplingParams.MAX_STOP_STRINGS == 64 and MAX_MODEL_LEN < 100_000


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_json_is_400_and_the_server_keeps_serving(
    name: str, client: openai.OpenAI, server: LiveServer
) -> None:
    """Each gets an OpenAI-shaped 400 that says what is wrong (and names the field where
    there is one), never a 500 or a crash: nesting past Python's recursion limit, bytes
    that are not UTF-8, numbers JSON allows and Python refuses (NaN, 1e999, 5000 digits),
    absurd counts and sizes."""
    body, param, words = HOSTILE[name]
    headers = {**AUTH, "Content-Type": "application/json"}
    response = httpx.post(f"{server.api_url}/completions", content=body, headers=headers)
    assert response.status_code == 400, response.text[:500]
    error = error_of(response.content)
    assert error["param"] == param and words in error["message"]
    still_serves(client)
