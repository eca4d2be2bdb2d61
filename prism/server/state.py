"""What every route reaches through `request.app.state`: the registry, metrics, settings."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from prism.server import errors
from prism.server.metrics import MODEL_LABEL, ServerMetrics
from prism.server.registry import Registry, ServedModel


@dataclass(frozen=True, slots=True)
class ServerState:
    models: Registry
    metrics: ServerMetrics


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.prism
    return state


def resolve_model(request: Request, name: str) -> ServedModel:
    """The served model called `name` (404 if none); labels the request's metrics
    (unknown names are not used as labels: clients must not choose label values)."""
    model = server_state(request).models.get(name)
    if model is None:
        raise errors.model_not_found(name)
    setattr(request.state, MODEL_LABEL, name)
    return model
