"""What completions and chat share: from a validated request to engine requests, and from
their outputs back to choices.

One API request becomes `len(prompts) × n` engine requests (choice index = prompt × n +
sample); a `Generation` adds them all before any response is sent, so a bad request
still gets a proper status, then merges their outputs as they arrive.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from prism.engine.async_engine import EngineClosed, EngineError, EngineOverloaded
from prism.engine.output import RequestOutput
from prism.engine.request import TokenLogprobs
from prism.engine.sampling_params import SamplingParams
from prism.models.tokenizer import Tokenizer
from prism.server import errors
from prism.server.errors import APIError
from prism.server.metrics import RequestTimer, ServerMetrics
from prism.server.protocol import SamplingRequest, Usage
from prism.server.registry import OutputStream, ServedModel
from prism.serving.async_worker import Overloaded, RequestRejected, WakeTimeout
from prism.serving.worker_client import WorkerCrashed


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---- request → engine --------------------------------------------------------------------


def check_prompt(ids: list[int], model: ServedModel, param: str) -> None:
    if not ids:
        raise errors.beyond_model_limit(
            f"{param}: the prompt is empty (as tokens)", "empty_prompt", param
        )
    vocab = model.engine.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise errors.beyond_model_limit(
            f"{param}: token ids must be in [0, {vocab})", "invalid_token_id", param
        )


def output_limit(num_prompt_tokens: int, max_tokens: int | None, model: ServedModel) -> int:
    """max_tokens, or the rest of the context when None; 400 when the two do not fit."""
    limit = model.max_model_len
    room = limit - num_prompt_tokens
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = f" and {max_tokens} output tokens" if max_tokens is not None else ""
        raise errors.beyond_model_limit(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num_prompt_tokens} prompt tokens{asked}. Please reduce the length of the "
            "prompt or the maximum number of output tokens.",
            "context_length_exceeded",
        )
    return room if max_tokens is None else max_tokens


# A temperature this close to zero is served as greedy (vLLM's threshold).
GREEDY_BELOW = 1e-5


def sampling_params(
    body: SamplingRequest,
    max_tokens: int,
    logprobs: int | None,
    sample: int,
    renames: Mapping[str, str] | None = None,
) -> SamplingParams:
    """Engine parameters of one sample; sample i of a seeded request uses seed + i (modulo
    2**64, the range of torch's seeds), so the n choices differ and the request as a whole
    is reproducible."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=_temperature(body.temperature),
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=None if body.seed is None else (body.seed + sample) % 2**64,
            stop=body.stop_strings,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
        )
    except ValueError as e:
        raise errors.from_value_error(e, renames) from e


def _temperature(value: float | None) -> float:
    if value is None:
        return 1.0
    return 0.0 if value < GREEDY_BELOW else value


# ---- engine → choices --------------------------------------------------------------------


@dataclass(slots=True)
class Choice:
    """One engine request's output so far."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0
    timer: RequestTimer = field(default_factory=RequestTimer)


class Generation:
    """The engine requests of one API request; close() aborts whatever is unfinished."""

    def __init__(self, model: ServedModel, metrics: ServerMetrics, request_id: str) -> None:
        self.model = model
        self.metrics = metrics
        self.request_id = request_id
        self.choices: list[Choice] = []
        self.num_prompt_tokens = 0
        self._streams: list[OutputStream] = []

    async def start(self, prompts: list[list[int]], params: list[list[SamplingParams]]) -> None:
        """params[p][i]: sample i of prompts[p]. All requests are in the engine on return."""
        engine = self.model.engine
        total = sum(len(p) for p in params)
        if total > engine.max_requests:
            raise errors.beyond_model_limit(
                f"this request needs {total} sequences; the model runs at most "
                f"{engine.max_requests} at once",
                "too_many_sequences",
                "n",
            )
        try:
            engine.check_capacity(total)
        except Overloaded as e:
            raise engine_error(e) from e
        self.num_prompt_tokens = sum(len(p) for p in prompts)
        requests = [
            (prompt, sample)
            for prompt, samples in zip(prompts, params, strict=True)
            for sample in samples
        ]
        self.choices = [Choice(i) for i in range(len(requests))]
        tasks = [
            asyncio.ensure_future(engine.add_request(prompt, sample, f"{self.request_id}-{i}"))
            for i, (prompt, sample) in enumerate(requests)
        ]
        try:
            self._streams = list(await asyncio.gather(*tasks))
        except BaseException as e:
            _discard(tasks)
            if isinstance(e, Exception):
                raise engine_error(e) from e
            raise

    async def outputs(self) -> AsyncGenerator[tuple[Choice, RequestOutput], None]:
        """Every output of every choice as it arrives, the choice already updated."""
        streams = self._streams
        pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    i = pending.pop(future)
                    try:
                        output = future.result()
                    except StopAsyncIteration:
                        continue
                    except EngineError as e:
                        raise engine_error(e) from e
                    yield self._update(self.choices[i], output), output
                    if not output.finished:
                        pending[asyncio.ensure_future(anext(streams[i]))] = i
        finally:
            for future in pending:
                future.cancel()
            self.close()

    async def collect(self) -> list[Choice]:
        async with aclosing(self.outputs()) as outputs:
            async for _ in outputs:
                pass
        return self.choices

    def _update(self, choice: Choice, output: RequestOutput) -> Choice:
        choice.timer.on_output(output)
        choice.text += output.text_delta
        choice.logprobs += output.logprobs
        choice.num_output_tokens = output.num_output_tokens
        if output.finished:
            reason = output.finish_reason
            choice.finish_reason = reason.value if reason is not None else None
            self.metrics.record_finished(self.model.name, choice.timer, output)
        return choice

    def usage(self) -> Usage:
        completion = sum(c.num_output_tokens for c in self.choices)
        return Usage(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.num_prompt_tokens + completion,
        )

    def close(self) -> None:
        """Abort every engine request still running (the client is gone or failed)."""
        for choice, stream in zip(self.choices, self._streams, strict=False):
            if not stream.finished and choice.finish_reason is None:
                choice.finish_reason = "abort"
                self.metrics.record_aborted(self.model.name)
            stream.close()


def _discard(adds: Sequence[asyncio.Future[OutputStream]]) -> None:
    """Abort what was added of a request that failed as a whole."""
    for add in adds:
        if not add.done():
            add.cancel()  # add_request aborts its own request when cancelled
        elif not add.cancelled() and add.exception() is None:
            add.result().close()


def engine_error(error: Exception) -> APIError:
    if isinstance(error, Overloaded):
        return errors.overloaded(str(error), error.retry_after_s)
    if isinstance(error, WakeTimeout):
        return errors.unavailable(str(error), error.retry_after_s)
    if isinstance(error, RequestRejected):
        return errors.bad_request(str(error))
    if isinstance(error, EngineOverloaded):
        return errors.overloaded(str(error))
    if isinstance(error, EngineClosed | WorkerCrashed):  # shut down; or restarting
        return errors.unavailable(str(error))
    if isinstance(error, EngineError):
        return errors.server_error(str(error))
    if isinstance(error, ValueError):
        return errors.from_value_error(error)
    return errors.server_error(f"internal error: {type(error).__name__}")


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)
