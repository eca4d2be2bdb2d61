"""Getting responses to the client: server-sent events, and noticing a client that left.

Either way a client that goes away cancels the work behind its request, and cancelled
work closes its engine streams, which aborts the engine requests and frees their KV.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (which aborts its
    engine requests); raises ClientDisconnected then."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


SSE_DONE = "data: [DONE]\n\n"


def documented_stream(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route whose 200 is server-sent events when the request asks to
    stream (besides the JSON body of its response model); the schema is of one event."""
    data = {
        "type": "string",
        "description": f"a {chunk.__name__} as JSON; an ErrorResponse if the generation "
        "fails midway; [DONE] last",
    }
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {
        200: {
            "description": "The response; with `stream: true`, server-sent events",
            "content": {"text/event-stream": {"schema": event}},
        }
    }


def sse(data: BaseModel) -> str:
    return f"data: {data.model_dump_json()}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends, so a
    client that disconnects mid-stream aborts its engine requests at once."""

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
