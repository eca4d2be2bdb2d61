"""The request body limit: ASGI middleware that refuses a body over it with 413 before the
body has been read (the limits on the request line and headers are uvicorn's, h11's)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prism.server import errors

# 8 MiB: a million prompt token ids as JSON, or a 2-million-token text prompt, fit.
DEFAULT_MAX_BODY_BYTES = 8 << 20


class BodyLimitMiddleware:
    """Refuses a request body over `max_bytes` with 413: at once when its Content-Length
    says so, otherwise (a chunked body) as soon as the bytes received pass the limit. The
    app so never holds more than `max_bytes` plus one chunk; uvicorn stops reading the
    socket while it buffers 64 KiB the app has not taken."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await errors.body_too_large(self.max_bytes).response()(scope, receive, send)
            return
        received = 0

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise errors.BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, receive_counted, send)


def _content_length(scope: Scope) -> int | None:
    """The declared length; h11 has already refused a request whose header is not a number."""
    value = Headers(scope=scope).get("content-length")
    return int(value) if value is not None and value.isdigit() else None
