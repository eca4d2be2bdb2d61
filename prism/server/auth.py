"""API-key check: ASGI middleware in front of every route but the open ones (/health)."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from prism.server import errors

OPEN_PATHS = frozenset({"/health"})


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <api_key>`, compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            problem = self._problem(Headers(scope=scope).get("authorization"))
            if problem is not None:
                await errors.unauthorized(problem).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, header: str | None) -> str | None:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "Missing API key: send it as 'Authorization: Bearer <key>'."
        if not hmac.compare_digest(token.strip().encode(), self._key):
            return "Incorrect API key provided."
        return None
