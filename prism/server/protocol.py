"""Request and response bodies of the OpenAI API, as pydantic models.

Fields follow the OpenAI schema; a few vLLM extensions (`top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`) are accepted too. Fields we cannot honour are
rejected by name rather than silently ignored; unknown fields are ignored.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from prism.engine.sampling_params import SamplingParams

MAX_N = 128
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy `logprobs` integer


class FieldError(ValueError):
    """A request field that passed schema validation but cannot be served."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


# ---- requests --------------------------------------------------------------------------

# Prompts and their parts are never empty (an empty prompt gives the model nothing to
# continue); token ids are never negative (their upper bound is the model's vocabulary).
Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
StopTexts = Annotated[list[Text], Field(max_length=SamplingParams.MAX_STOP_STRINGS)]


def _needs(field: str, kind: str, other: str) -> dict[str, Any]:
    """JSON schema for what `check()` enforces: `field`, when given (as a `kind`, not
    null), needs `other` to be true."""
    return {
        "if": {"required": [field], "properties": {field: {"type": kind}}},
        "then": {"required": [other], "properties": {other: {"const": True}}},
    }


_STREAM_OPTIONS_NEED_STREAM = _needs("stream_options", "object", "stream")
_TOP_LOGPROBS_NEED_LOGPROBS = _needs("top_logprobs", "integer", "logprobs")


class StreamOptions(BaseModel):
    include_usage: bool = False


_EMPTY = [
    {"type": "null"},
    {"const": False},
    {"const": ""},
    {"type": "array", "maxItems": 0},
    {"type": "object", "maxProperties": 0},
]


def _schema_extra(schema: dict[str, Any], cls: type) -> None:
    """Document what the schema cannot say by type alone: each unsupported field accepts
    only empty values (or its one harmless value), and the cross-field rules."""
    properties = schema.setdefault("properties", {})
    for name, harmless in getattr(cls, "UNSUPPORTED", {}).items():
        accepted = _EMPTY if harmless is None else [*_EMPTY, {"const": harmless}]
        properties[name] = {"anyOf": accepted, "description": "not supported by Prism"}
    schema["allOf"] = list(getattr(cls, "SCHEMA_RULES", []))


class SamplingRequest(BaseModel):
    """What completions and chat completions share."""

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | StopTexts | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None  # any integer: the engine takes it modulo 2**64
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False

    # Fields we cannot honour → the one non-empty value that is harmless (None: none is).
    UNSUPPORTED: ClassVar[dict[str, Any]] = {"logit_bias": None}
    SCHEMA_RULES: ClassVar[list[dict[str, Any]]] = [_STREAM_OPTIONS_NEED_STREAM]

    model_config = ConfigDict(extra="allow", json_schema_extra=_schema_extra)

    def check(self) -> None:
        """Raise FieldError for what the schema allows but we cannot serve."""
        extra = self.model_extra or {}
        for name, harmless in self.UNSUPPORTED.items():
            value = extra.get(name)
            empty = value is None or value is False or value in ("", [], {})
            if not empty and not (type(value) is type(harmless) and value == harmless):
                raise FieldError(name, "not supported")
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "only allowed when stream is true")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "logit_bias": None,
        "echo": None,
        "suffix": None,
        "best_of": 1,
    }

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a batch: texts, or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [cast("list[int]", p)]
        return cast("list[str] | list[list[int]]", p)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        """The {"role", "content"} dict chat templates expect (developer → system)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "logit_bias": None,
        "tools": None,
        "functions": None,
        "audio": None,
        "response_format": {"type": "text"},
    }
    SCHEMA_RULES: ClassVar[list[dict[str, Any]]] = [
        _STREAM_OPTIONS_NEED_STREAM,
        _TOP_LOGPROBS_NEED_LOGPROBS,
    ]

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "needs logprobs to be true")

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- responses -------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "prism"
    state: str  # Prism's extension: the model's serving state
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
