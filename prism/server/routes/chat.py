"""`POST /v1/chat/completions`: messages rendered by the model's chat template."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from fastapi import APIRouter, Request, Response

from prism.engine.output import RequestOutput
from prism.engine.request import TokenLogprobs
from prism.models.chat_template import ChatTemplateError
from prism.models.tokenizer import Tokenizer
from prism.server import errors
from prism.server.errors import APIError
from prism.server.generation import (
    Generation,
    check_prompt,
    new_id,
    output_limit,
    sampling_params,
    token_text,
)
from prism.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    Delta,
    FieldError,
    TokenLogprob,
    TopLogprob,
)
from prism.server.registry import ServedModel
from prism.server.state import resolve_model, server_state
from prism.server.streaming import (
    SSE_DONE,
    ClientDisconnected,
    EventStream,
    documented_stream,
    sse,
    until_disconnected,
)

router = APIRouter()

# SamplingParams field → the chat request's field of the same meaning.
_RENAMES = {"logprobs": "top_logprobs"}


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=documented_stream(ChatCompletionChunk) | errors.documented(400, 404, 429, 500, 503),
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request
) -> ChatCompletionResponse | Response:
    model = resolve_model(request, body.model)
    try:
        body.check()
    except FieldError as e:
        raise errors.from_value_error(e) from e
    prompt = _prompt_ids(model, body.messages)
    max_tokens = output_limit(len(prompt), body.output_limit, model)
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = [sampling_params(body, max_tokens, top, i, _RENAMES) for i in range(body.n)]
    generation = Generation(model, server_state(request).metrics, new_id("chatcmpl"))
    await generation.start([prompt], [params])
    if body.stream:
        return EventStream(_events(generation, body))
    try:
        choices = await until_disconnected(request, generation.collect())
    except ClientDisconnected:
        return Response(status_code=499)
    return ChatCompletionResponse(
        id=generation.request_id,
        model=body.model,
        choices=[
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=_logprobs(c.logprobs, model.tokenizer) if body.logprobs else None,
                finish_reason=c.finish_reason,
            )
            for c in choices
        ],
        usage=generation.usage(),
    )


def _prompt_ids(model: ServedModel, messages: list[ChatMessage]) -> list[int]:
    tokenizer = model.tokenizer
    if not tokenizer.has_chat_template:
        raise errors.beyond_model_limit(
            f"model {model.name!r} has no chat template", "chat_template_error", "model"
        )
    try:
        text = tokenizer.apply_chat_template([m.as_template_input() for m in messages])
    except ChatTemplateError as e:
        raise errors.beyond_model_limit(f"messages: {e}", "chat_template_error", "messages") from e
    ids = tokenizer.encode(text, add_special_tokens=False)
    check_prompt(ids, model, "messages")
    return ids


async def _events(generation: Generation, body: ChatCompletionRequest) -> AsyncGenerator[str, None]:
    def chunk(choices: list[ChatChunkChoice]) -> str:
        return sse(ChatCompletionChunk(id=generation.request_id, model=body.model, choices=choices))

    try:
        for choice in generation.choices:
            yield chunk([ChatChunkChoice(index=choice.index, delta=Delta(role="assistant"))])
        async with aclosing(generation.outputs()) as outputs:
            async for choice, output in outputs:
                if output.text_delta or output.finished or (body.logprobs and output.logprobs):
                    yield chunk([_chunk_choice(choice.index, output, body, generation.model)])
        if body.include_usage:
            usage = generation.usage()
            yield sse(
                ChatCompletionChunk(
                    id=generation.request_id, model=body.model, choices=[], usage=usage
                )
            )
    except APIError as e:
        yield sse(e.body())
    finally:
        generation.close()  # the client may have left before the outputs were read
    yield SSE_DONE


def _chunk_choice(
    index: int, output: RequestOutput, body: ChatCompletionRequest, model: ServedModel
) -> ChatChunkChoice:
    reason = output.finish_reason.value if output.finished and output.finish_reason else None
    return ChatChunkChoice(
        index=index,
        delta=Delta(content=output.text_delta or None),
        logprobs=_logprobs(output.logprobs, model.tokenizer) if body.logprobs else None,
        finish_reason=reason,
    )


def _logprobs(logprobs: list[TokenLogprobs], tokenizer: Tokenizer) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = token_text(tokenizer, token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = []
    for lp in logprobs:
        token = entry(lp.token_id, lp.logprob)
        top = [entry(t, v) for t, v in lp.top]
        content.append(TokenLogprob(**token.model_dump(), top_logprobs=top))
    return ChatLogprobs(content=content)
