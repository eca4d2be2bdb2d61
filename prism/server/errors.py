"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with a status.

Routes raise `APIError`; the handlers installed by `install_error_handlers` also give
FastAPI's validation errors, unknown routes and unexpected exceptions the same shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from prism.server.protocol import ErrorInfo, ErrorResponse, FieldError

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.headers = dict(headers or {})

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=self.info)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), self.status, headers=self.headers)


# The codes of 400s for a request the schema allows but the model it names cannot serve:
# limits that differ from model to model, so that no schema shared by all can state them.
MODEL_LIMIT_CODES = {
    "context_length_exceeded": "the prompt and max_tokens exceed its context length",
    "empty_prompt": "the prompt text encodes to no tokens of its vocabulary",
    "invalid_token_id": "a prompt token id is beyond its vocabulary",
    "too_many_sequences": "prompts × n exceed the sequences it runs at once",
    "chat_template_error": "its chat template has none, or refuses the messages",
    "kv_limit_too_small": "a KV limit below the least its KV cache holds",
}

# What each error status means on Prism's routes, for the OpenAPI schema.
_MEANINGS = {
    400: "A bad request: the message names the field (`param`). Besides what the schema "
    "states, the model's own limits apply; `code` then says which: "
    + "; ".join(f"`{code}`: {text}" for code, text in MODEL_LIMIT_CODES.items()),
    401: "A missing or wrong API key (when the server requires one)",
    404: "No model of that name",
    409: "The model's state rules it out now (requests in flight, no memory, ...)",
    413: "The request body is larger than the server's limit (`prism serve "
    "--max-body-bytes`); the message states it",
    429: "The model's queue (or the device's bound on requests in flight) is full; the "
    "message states the limit; retry after `Retry-After` seconds",
    500: "The engine failed while running the request",
    503: "The model's worker is shut down, or the model could not be woken in time (the "
    "device's memory held by other models' running requests); retry after `Retry-After` "
    "seconds",
}
_HEADERS = {
    401: {"WWW-Authenticate": "The scheme to authenticate with: Bearer"},
    429: {"Retry-After": "Seconds to wait before retrying"},
    503: {"Retry-After": "Seconds to wait before retrying"},
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that may answer these error statuses: the OpenAI error
    body, what the status means here, and the headers sent with it."""
    return {status: _documented(status) for status in statuses}


def _documented(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {"model": ErrorResponse, "description": _MEANINGS[status]}
    if status in _HEADERS:
        response["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in _HEADERS[status].items()
        }
    return response


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def beyond_model_limit(message: str, code: str, param: str | None = None) -> APIError:
    """A 400 for a limit of the model, not of the API (one of MODEL_LIMIT_CODES)."""
    assert code in MODEL_LIMIT_CODES, code
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str) -> APIError:
    return APIError(
        404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
    )


def conflict(message: str, code: str = "conflict") -> APIError:
    """The resource's current state rules the operation out (a model busy, not woken)."""
    return APIError(409, message, code=code)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def overloaded(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(
        429,
        message,
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_after_s)},
    )


def unavailable(message: str, retry_after_s: int = 5) -> APIError:
    return APIError(
        503,
        message,
        type="server_error",
        code="service_unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )


def body_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than this server's limit of {limit} bytes.",
        code="request_too_large",
    )


class BodyTooLarge(HTTPException):
    """A request body found over the limit while it is read. An HTTPException because
    FastAPI answers any other exception raised while it reads a body with a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, body_too_large(limit).info.message)
        self.limit = limit


def server_error(message: str) -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


def from_value_error(error: ValueError, params: Mapping[str, str] | None = None) -> APIError:
    """A 400 from our `"field: message"` ValueErrors (SamplingParams, FieldError);
    `params` renames engine fields to the request's (e.g. logprobs → top_logprobs)."""
    if isinstance(error, FieldError):
        return bad_request(str(error), param=error.param)
    field, sep, _ = str(error).partition(": ")
    if not sep or " " in field:
        return bad_request(str(error))
    param = (params or {}).get(field, field)
    message = str(error) if param == field else f"{param}{str(error)[len(field) :]}"
    return bad_request(message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(BodyTooLarge, _body_too_large)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)


async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return error.response()


async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    """400 naming the first offending field, e.g. `messages.0.role: Input should be ...`."""
    first = _most_telling(error.errors())
    message = str(first.get("msg", "invalid request"))
    if first.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {message}").response()
    param = _field_path(first.get("loc", ()))
    return bad_request(f"{param}: {message}" if param else message, param=param).response()


def _most_telling(errors: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The first error that is more than a type mismatch: a value that fails a union
    fails each branch, and "[] is too short" says more than "[] is not a string"."""
    for e in errors:
        if not str(e.get("type", "")).endswith("_type"):
            return e
    return errors[0] if errors else {}


def _field_path(loc: Sequence[Any]) -> str | None:
    """("body", "messages", 0, "role") → "messages.0.role"; pydantic's union branches
    (like "str", "constrained-str" or "list[int]") are dropped."""
    parts = [str(p) for p in loc[1:] if isinstance(p, int) or not _is_branch(str(p))]
    return ".".join(parts) or None


def _is_branch(part: str) -> bool:
    return "[" in part or "-" in part or part in ("str", "int", "float", "bool")


async def _http_error(_: Request, error: HTTPException) -> JSONResponse:
    if isinstance(error.__cause__, RecursionError | UnicodeDecodeError):
        return _unreadable_body(error.__cause__).response()
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    body = ErrorResponse(error=ErrorInfo(message=str(error.detail), type=kind))
    return JSONResponse(body.model_dump(), error.status_code, headers=error.headers)


def _unreadable_body(cause: RecursionError | UnicodeDecodeError) -> APIError:
    """FastAPI's 400 for a body that `json.loads` fails on other than by its syntax."""
    if isinstance(cause, RecursionError):
        return bad_request("the request body is not valid JSON: it is nested too deeply")
    return bad_request(f"the request body is not valid UTF-8: {cause.reason} at byte {cause.start}")


async def _body_too_large(_: Request, error: BodyTooLarge) -> JSONResponse:
    return body_too_large(error.limit).response()


async def _unexpected_error(_: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=error)
    return server_error(f"internal error: {type(error).__name__}").response()
