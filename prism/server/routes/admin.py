"""Prism's own routes: `/admin/models` (memory per model), `/health`, `/metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from prism.server.metrics import CONTENT_TYPE
from prism.server.registry import ModelState
from prism.server.state import server_state

router = APIRouter()


class AdminModel(BaseModel):
    name: str
    source: str
    state: str
    max_model_len: int
    num_running: int
    num_waiting: int
    kv_bytes_mapped: int
    kv_blocks_free: int  # mapped blocks no request holds
    kv_blocks_used: int


class AdminModels(BaseModel):
    models: list[AdminModel]


@router.get("/admin/models")
async def admin_models(request: Request) -> AdminModels:
    rows = []
    for model in server_state(request).models:
        stats = model.engine.stats
        rows.append(
            AdminModel(
                name=model.name,
                source=model.source,
                state=model.state.value,
                max_model_len=model.max_model_len,
                num_running=stats.num_running,
                num_waiting=stats.num_waiting,
                kv_bytes_mapped=stats.kv_mapped_bytes,
                kv_blocks_free=stats.kv_free_blocks,
                kv_blocks_used=stats.kv_used_blocks,
            )
        )
    return AdminModels(models=rows)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while every model's engine is serving, 503 otherwise."""
    states = {m.name: m.state.value for m in server_state(request).models}
    healthy = all(s == ModelState.ACTIVE.value for s in states.values())
    body = {"status": "ok" if healthy else "unavailable", "models": states}
    return JSONResponse(body, 200 if healthy else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE)
