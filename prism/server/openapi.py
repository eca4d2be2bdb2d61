"""The OpenAPI schema as the server really behaves: FastAPI's generated schema, less its
422 validation answers (Prism answers bad input with an OpenAI-shaped 400), plus the 413
of a body over the limit, the bearer-key requirement and its 401 on every route but the
open ones when a key is set, and links from each response that names a model to the
operations that take a model's name."""

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
            _document_body_limit(schema)
            _link_model_names(schema)
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


def _document_body_limit(schema: dict[str, Any]) -> None:
    too_large = _response_schema(documented(413)[413])
    for _, operation in _operations(schema):
        if "requestBody" in operation:
            operation["responses"]["413"] = too_large


# The 200s that name a model, with where (a JSON pointer into the body); and the operations
# that take a model's name, with where it goes: a path parameter, or the body's `model`.
_NAMED_BY = {
    ("/v1/models", "get"): "/data/0/id",
    ("/v1/models/{model_id}", "get"): "/id",
    ("/admin/models", "get"): "/models/0/name",
    ("/admin/models/{name}/wake", "post"): "/name",
    ("/admin/models/{name}/sleep", "post"): "/name",
    ("/admin/models/{name}/limit", "post"): "/name",
}
_TAKE_A_NAME = {
    "RetrieveModel": ("/v1/models/{model_id}", "get", "model_id"),
    "CreateCompletion": ("/v1/completions", "post", None),
    "CreateChatCompletion": ("/v1/chat/completions", "post", None),
    "WakeModel": ("/admin/models/{name}/wake", "post", "name"),
    "SleepModel": ("/admin/models/{name}/sleep", "post", "name"),
    "LimitModel": ("/admin/models/{name}/limit", "post", "name"),
}


def _link_model_names(schema: dict[str, Any]) -> None:
    """OpenAPI links: the model a response names is one the linked operations can take.
    A body link puts the expression inside the body, as schemathesis reads it (its
    stateful runs follow these links)."""
    paths = schema["paths"]
    for (path, method), pointer in _NAMED_BY.items():
        name = f"$response.body#{pointer}"
        links = {}
        for link, (target, target_method, parameter) in _TAKE_A_NAME.items():
            where = (
                {"parameters": {parameter: name}} if parameter else {"requestBody": {"model": name}}
            )
            links[link] = {"operationId": paths[target][target_method]["operationId"], **where}
        paths[path][method]["responses"]["200"]["links"] = links


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
