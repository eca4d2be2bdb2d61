"""`create_app(models, api_key)`: the FastAPI application around a model registry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from prism.server.auth import ApiKeyMiddleware
from prism.server.errors import install_error_handlers
from prism.server.limits import DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware
from prism.server.metrics import RequestCounter, ServerMetrics
from prism.server.openapi import install_openapi
from prism.server.registry import Registry
from prism.server.routes import admin, chat, completions, models
from prism.server.state import ServerState


def create_app(
    registry: Registry,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The app serves `registry`, starting it on the server's event loop (a fleet's
    controller and worker processes) and shutting its engines down when it stops. With
    an `api_key`, every route but /health requires `Authorization: Bearer <api_key>`. A
    request body over `max_body_bytes` is refused with 413."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        try:
            yield
        finally:
            await registry.stop()

    app = FastAPI(title="Prism", summary="OpenAI-compatible LLM server", lifespan=lifespan)
    metrics = ServerMetrics(registry)
    app.state.prism = ServerState(registry, metrics)
    install_error_handlers(app)
    install_openapi(app, api_key_required=bool(api_key))
    for module in (models, completions, chat, admin):
        app.include_router(module.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:  # outside the body limit: a client without the key learns nothing more
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(RequestCounter, metrics=metrics)
    return app
