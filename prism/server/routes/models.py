"""`GET /v1/models`: every served model, with Prism's `state` and `max_model_len`."""

from __future__ import annotations

from fastapi import APIRouter, Request

from prism.server.errors import documented
from prism.server.protocol import ModelCard, ModelList
from prism.server.registry import ServedModel
from prism.server.state import resolve_model, server_state

router = APIRouter()


def _card(model: ServedModel) -> ModelCard:
    return ModelCard(
        id=model.name,
        created=model.created,
        state=model.state.value,
        max_model_len=model.max_model_len,
    )


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(m) for m in server_state(request).models])


@router.get("/v1/models/{model_id:path}", responses=documented(404))
async def get_model(request: Request, model_id: str) -> ModelCard:
    return _card(resolve_model(request, model_id))
