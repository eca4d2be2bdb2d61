"""Prism's own routes: the admin API (`/admin/models`, wake, sleep, KV limits,
`/admin/memory`), `/health` and `/metrics`."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Literal, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from prism.engine.async_engine import EngineClosed
from prism.server import errors
from prism.server.errors import APIError, documented
from prism.server.metrics import CONTENT_TYPE
from prism.server.registry import ModelWorker, ServedModel
from prism.server.state import server_state
from prism.serving.async_worker import ModelConflict
from prism.serving.worker_client import WorkerCrashed

router = APIRouter()

T = TypeVar("T")


class AdminModel(BaseModel):
    name: str
    source: str
    device: str
    state: str  # cached | active | asleep | stopped
    max_model_len: int
    num_running: int
    num_waiting: int  # queued in its engine, or for its wake
    weight_bytes: int  # what its weights take when resident
    weights_bytes_mapped: int
    kv_bytes_mapped: int
    kv_bytes_limit: int | None  # the cap on its KV cache; None before its first wake
    kv_blocks_free: int  # mapped blocks no request holds
    kv_blocks_used: int
    wakes: int
    sleeps: int
    preemptions: int  # its requests preempted by recompute so far
    last_wake_ms: float


class AdminModels(BaseModel):
    models: list[AdminModel]


class KVLimit(BaseModel):
    kv_bytes: int = Field(ge=0, description="the most KV-cache memory the model may map")


class AdminTenant(BaseModel):
    name: str  # <model>/weights or <model>/kv
    model: str
    kind: str  # weights | kv
    pages: int
    bytes: int
    limit_bytes: int


class AdminDevice(BaseModel):
    device: str
    mode: str  # prism | static | swap
    page_size: int
    budget_bytes: int  # = used_bytes + free_bytes
    used_bytes: int  # = the sum of the tenants' bytes
    free_bytes: int
    tenants: list[AdminTenant]


class AdminMemory(BaseModel):
    devices: list[AdminDevice]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    models: dict[str, str]  # name → state


@router.get("/admin/models")
async def admin_models(request: Request) -> AdminModels:
    return AdminModels(models=[_row(model) for model in server_state(request).models])


@router.post("/admin/models/{name}/wake", responses=documented(404, 409, 503))
async def wake_model(request: Request, name: str) -> AdminModel:
    """Make the model resident now (its first request would otherwise do it)."""
    model = _model(request, name)
    if not await _admin_call(model.engine.wake()):
        stats = model.worker.stats().worker
        weights, free, budget = model.engine.weight_bytes, stats.free_bytes, stats.budget_bytes
        raise errors.conflict(
            f"model {name!r} cannot be woken now: its weights take {_mib(weights)} and "
            f"{_mib(free)} of {_mib(budget)} are free; the other models' memory is in use",
            code="insufficient_memory",
        )
    return _row(model)


@router.post("/admin/models/{name}/sleep", responses=documented(404, 409, 503))
async def sleep_model(request: Request, name: str) -> AdminModel:
    """Give the model's device memory back to the pool; its next request wakes it."""
    model = _model(request, name)
    await _admin_call(model.engine.sleep())
    return _row(model)


@router.post("/admin/models/{name}/limit", responses=documented(400, 404, 409, 503))
async def limit_model(request: Request, name: str, body: KVLimit) -> AdminModel:
    """Cap the model's KV cache; memory beyond the cap goes back to the pool (running
    requests that hold more are preempted until they fit: they wait, to be recomputed)."""
    model = _model(request, name)
    try:
        await _admin_call(model.engine.set_kv_limit(body.kv_bytes))
    except APIError as e:
        if e.status != 400:
            raise
        raise _limit_too_small(model, body.kv_bytes, e.info.message) from e
    return _row(model)


def _limit_too_small(model: ServedModel, kv_bytes: int, message: str) -> APIError:
    """The 400 for a limit below the least the model's KV cache holds (a group of pages
    per layer), which differs from model to model: no schema can state it."""
    pool = model.worker.stats().pool
    kv = next((t for t in pool.tenants if t.name == f"{model.name}/kv"), None)
    if kv is not None:
        least = kv.min_pages * pool.page_size
        message = f"kv_bytes: {kv_bytes} is below the least {model.name}'s KV cache holds: "
        message += f"{least} bytes"
    return errors.beyond_model_limit(message, "kv_limit_too_small", param="kv_bytes")


@router.get("/admin/memory")
async def admin_memory(request: Request) -> AdminMemory:
    return AdminMemory(devices=[_device(w) for w in server_state(request).models.workers])


@router.get(
    "/health",
    response_model=Health,
    responses={503: {"model": Health, "description": "A device's worker is not serving"}},
)
async def health(request: Request) -> JSONResponse:
    """200 while every device's worker is serving (a cached or sleeping model is woken by
    its next request), 503 otherwise."""
    registry = server_state(request).models
    healthy = all(w.is_running for w in registry.workers)
    body = Health(
        status="ok" if healthy else "unavailable",
        models={m.name: m.state.value for m in registry},
    )
    return JSONResponse(body.model_dump(), 200 if healthy else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE)


def _model(request: Request, name: str) -> ServedModel:
    model = server_state(request).models.get(name)
    if model is None:
        raise errors.model_not_found(name)
    return model


async def _admin_call(call: Awaitable[T]) -> T:
    """Await a worker call, its refusals turned into API errors."""
    try:
        return await call
    except (EngineClosed, WorkerCrashed) as e:  # shut down; or restarting after a crash
        raise errors.unavailable(str(e)) from e
    except ModelConflict as e:
        raise errors.conflict(str(e)) from e
    except ValueError as e:
        raise errors.from_value_error(e) from e


def _row(model: ServedModel) -> AdminModel:
    snapshot = model.worker.stats()
    stats = snapshot.model(model.name)
    engine = snapshot.engines.get(model.name)
    pool = snapshot.pool
    kv = next((t for t in pool.tenants if t.name == f"{model.name}/kv"), None)
    return AdminModel(
        name=model.name,
        source=model.source,
        device=model.worker.device,
        state=model.state.value,
        max_model_len=model.max_model_len,
        num_running=engine.num_running if engine else 0,
        num_waiting=engine.num_waiting if engine else 0,
        weight_bytes=model.engine.weight_bytes,
        weights_bytes_mapped=stats.weights_mapped_bytes if stats else 0,
        kv_bytes_mapped=engine.kv_mapped_bytes if engine else 0,
        kv_bytes_limit=kv.max_pages * pool.page_size if kv else None,
        kv_blocks_free=engine.kv_free_blocks if engine else 0,
        kv_blocks_used=engine.kv_used_blocks if engine else 0,
        wakes=stats.wakes if stats else 0,
        sleeps=stats.sleeps if stats else 0,
        preemptions=stats.preemptions if stats else 0,
        last_wake_ms=stats.last_wake_s * 1e3 if stats else 0.0,
    )


def _device(worker: ModelWorker) -> AdminDevice:
    snapshot = worker.stats()
    pool = snapshot.pool
    tenants = []
    for t in pool.tenants:
        model, _, kind = t.name.rpartition("/")
        tenants.append(
            AdminTenant(
                name=t.name,
                model=model,
                kind=kind,
                pages=t.owned_pages,
                bytes=t.owned_pages * pool.page_size,
                limit_bytes=t.max_pages * pool.page_size,
            )
        )
    budget, used = pool.budget_pages * pool.page_size, pool.owned_pages * pool.page_size
    return AdminDevice(
        device=worker.device,
        mode=worker.mode.value,
        page_size=pool.page_size,
        budget_bytes=budget,
        used_bytes=used,
        free_bytes=budget - used,
        tenants=tenants,
    )


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.0f} MiB"
