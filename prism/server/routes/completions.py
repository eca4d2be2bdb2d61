"""`POST /v1/completions`: text in, text out (OpenAI's legacy completions API)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from fastapi import APIRouter, Request, Response

from prism.engine.output import RequestOutput
from prism.engine.request import TokenLogprobs
from prism.models.tokenizer import Tokenizer
from prism.server import errors
from prism.server.errors import APIError
from prism.server.generation import (
    Choice,
    Generation,
    check_prompt,
    new_id,
    output_limit,
    sampling_params,
    token_text,
)
from prism.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    FieldError,
)
from prism.server.protocol import CompletionResponse as Completion
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


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses=documented_stream(Completion) | errors.documented(400, 404, 429, 500, 503),
)
async def create_completion(body: CompletionRequest, request: Request) -> Completion | Response:
    model = resolve_model(request, body.model)
    try:
        body.check()
    except FieldError as e:
        raise errors.from_value_error(e) from e
    prompts = [_prompt_ids(model, p) for p in body.prompts]
    params = [
        [
            sampling_params(body, output_limit(len(ids), body.max_tokens, model), body.logprobs, i)
            for i in range(body.n)
        ]
        for ids in prompts
    ]
    generation = Generation(model, server_state(request).metrics, new_id("cmpl"))
    await generation.start(prompts, params)
    if body.stream:
        return EventStream(_events(generation, body))
    try:
        choices = await until_disconnected(request, generation.collect())
    except ClientDisconnected:
        return Response(status_code=499)
    return Completion(
        id=generation.request_id,
        model=body.model,
        choices=[_choice(c, body, model.tokenizer) for c in choices],
        usage=generation.usage(),
    )


def _prompt_ids(model: ServedModel, prompt: str | list[int]) -> list[int]:
    ids = model.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    check_prompt(ids, model, "prompt")
    return ids


def _choice(choice: Choice, body: CompletionRequest, tokenizer: Tokenizer) -> CompletionChoice:
    return CompletionChoice(
        index=choice.index,
        text=choice.text,
        logprobs=_logprobs(choice.logprobs, tokenizer, 0) if body.logprobs is not None else None,
        finish_reason=choice.finish_reason,
    )


async def _events(generation: Generation, body: CompletionRequest) -> AsyncGenerator[str, None]:
    tokenizer = generation.model.tokenizer
    try:
        async with aclosing(generation.outputs()) as outputs:
            async for choice, output in outputs:
                chunk = _chunk(choice, output, body, tokenizer)
                if chunk is not None:
                    completion = Completion(
                        id=generation.request_id, model=body.model, choices=[chunk]
                    )
                    yield sse(completion)
        if body.include_usage:
            usage = generation.usage()
            yield sse(
                Completion(id=generation.request_id, model=body.model, choices=[], usage=usage)
            )
    except APIError as e:
        yield sse(e.body())
    finally:
        generation.close()
    yield SSE_DONE


def _chunk(
    choice: Choice, output: RequestOutput, body: CompletionRequest, tokenizer: Tokenizer
) -> CompletionChoice | None:
    """The stream chunk for one output; None when it carries nothing."""
    logprobs = None
    if body.logprobs is not None and output.logprobs:
        offset = len(choice.text) - len(output.text_delta)
        logprobs = _logprobs(output.logprobs, tokenizer, offset)
    if not (output.text_delta or logprobs or output.finished):
        return None
    return CompletionChoice(
        index=choice.index,
        text=output.text_delta,
        logprobs=logprobs,
        finish_reason=choice.finish_reason,
    )


def _logprobs(
    logprobs: list[TokenLogprobs], tokenizer: Tokenizer, offset: int
) -> CompletionLogprobs:
    """The legacy format: parallel lists, top alternatives as {token text: logprob}."""
    result = CompletionLogprobs()
    for lp in logprobs:
        token = token_text(tokenizer, lp.token_id)
        result.tokens.append(token)
        result.token_logprobs.append(lp.logprob)
        result.top_logprobs.append({token_text(tokenizer, t): v for t, v in lp.top})
        result.text_offset.append(offset)
        offset += len(token)
    return result
