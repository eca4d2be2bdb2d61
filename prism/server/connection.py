"""Read deadlines and a bound on connections: a client that owes a request must send it.

uvicorn's h11 protocol has a keep-alive timeout that runs only between requests and
stops at the next byte, and no timeout for reading a request: a connection that sends
nothing, or its head or body a byte at a time (slowloris), stays open as long as the
client likes, holding a socket and a file descriptor. `http_protocol(seconds)` is
uvicorn's h11 protocol with the deadlines a reverse proxy would apply:

- the request head (the first byte of a connection, or of the next request on it, up to
  the blank line) must arrive within `seconds` of its start, however it trickles;
- a request body may pause for at most `seconds` between reads (unless the server
  itself stopped reading: flow control);
- once the request is read, nothing more: answering, streaming included, takes as long
  as it takes, and between requests uvicorn's keep-alive timeout applies.

A connection past its deadline gets a 408 in the API's error shape when no response
has started, and is closed. With `max_connections`, a connection beyond that many open
ones gets a 503 at once and is closed (uvicorn's own `limit_concurrency` accepts it and
answers each of its requests with 503, holding it open meanwhile). uvicorn is pinned
(pyproject.toml): this subclasses its `H11Protocol`, which `uvicorn.Config(http=...)`
accepts as the HTTP protocol class.
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

DEFAULT_READ_TIMEOUT_S = 30.0


def _closing_response(status: str, message: str, code: str) -> bytes:
    """A whole response written before closing (h11 can send none before a request)."""
    body = json.dumps({"error": {"message": message, "type": code, "param": None,
                                 "code": code}}).encode()  # fmt: skip
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _timeout_response(seconds: float) -> bytes:
    message = f"the request did not arrive within {seconds:g} s; the connection is closed"
    return _closing_response("408 Request Timeout", message, "request_timeout")


class ReadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with read deadlines (the module's docstring); the seconds
    come from the subclass `http_protocol` makes."""

    read_timeout_s = DEFAULT_READ_TIMEOUT_S
    max_connections: int | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # counts it in self.connections
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            message = f"the server holds its limit of {self.max_connections} connections"
            transport.write(_closing_response("503 Service Unavailable", message, "overloaded"))
            transport.close()
            return
        self._arm()  # the first request is owed from the start

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _follow(self) -> None:
        """Arm, keep or drop the deadline for what the client owes now."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._arm()  # between reads of a body: from the last one
        elif state is h11.IDLE and self.conn.trailing_data[0]:
            if self._deadline is None:  # a head has begun: from its first byte
                self._arm()
        else:  # read in full, or nothing owed yet (keep-alive is uvicorn's)
            self._disarm()

    def _arm(self) -> None:
        self._disarm()
        if self.read_timeout_s > 0:
            self._deadline = self.loop.call_later(self.read_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # the server stopped reading, not the client
            self._arm()
            return
        state = self.conn.their_state
        if state not in (h11.IDLE, h11.SEND_BODY):
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.warning("%s: no request within %g s; closing", client, self.read_timeout_s)
        # IDLE: no request of this cycle yet (a cycle left over is the last request's)
        if state is h11.IDLE or not self.cycle.response_started:
            self.transport.write(_timeout_response(self.read_timeout_s))
        self.transport.close()


def http_protocol(
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S, max_connections: int | None = None
) -> type[ReadDeadlineProtocol]:
    """The protocol class for `uvicorn.Config(http=...)`; a 0 s timeout turns the
    deadlines off, `max_connections` None leaves the count of connections unbounded."""
    if read_timeout_s < 0:
        raise ValueError(f"read timeout must be >= 0 seconds, got {read_timeout_s}")
    if max_connections is not None and max_connections < 1:
        raise ValueError(f"max connections must be at least 1, got {max_connections}")
    settings = {"read_timeout_s": read_timeout_s, "max_connections": max_connections}
    return type("ReadDeadlineProtocol", (ReadDeadlineProtocol,), settings)
