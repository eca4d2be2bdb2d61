"""The OpenAPI schema as the server really behaves: FastAPI's generated schema, less its
422 validation answers (Prism answers bad input with an OpenAI-shaped 400), plus the
bearer-key requirement and its 401 on every route but the open ones when a key is set."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from prism.server.auth import OPEN_PATHS
from prism.server.errors import documented

_SCHEME = "bearer"


def install_openapi(app: FastAPI, api_key_required: bool) -> None:
    """Make `app.openapi()` (and so `/openapi.json`) return the corrected schema."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)  # generates and caches in app.openapi_schema
            _drop_validation_errors(schema)
            if api_key_required:
                _require_bearer_key(schema)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _operations(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(path, op) for path, ops in schema["paths"].items() for op in ops.values()]


def _drop_validation_errors(schema: dict[str, Any]) -> None:
    for _, operation in _operations(schema):
        operation["responses"].pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def _require_bearer_key(schema: dict[str, Any]) -> None:
    unauthorized = _response_schema(documented(401)[401])
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[_SCHEME] = {"type": "http", "scheme": "bearer"}
    for path, operation in _operations(schema):
        if path not in OPEN_PATHS:
            operation["security"] = [{_SCHEME: []}]
            operation["responses"]["401"] = unauthorized


def _response_schema(response: dict[str, Any]) -> dict[str, Any]:
    """A `responses=` entry as it reads in the schema (the model as a $ref)."""
    model = response["model"]
    body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    return {
        "description": response["description"],
        "headers": response.get("headers", {}),
        "content": body,
    }
