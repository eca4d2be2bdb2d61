"""The OpenAI API driven by the real `openai` client, sync and async, against a live server."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
from server_helpers import MODEL, MODEL_B, LiveServer

from prism.server.registry import ModelState

PROMPT = "The capital of France is"
CHAT: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY: dict[str, Any] = {"temperature": 0.0}
NO_EOS = {"ignore_eos": True}  # vLLM's extension: always produce max_tokens tokens


def _chat_prompt_tokens(server: LiveServer) -> int:
    model = server.registry.get(MODEL)
    assert model is not None
    text = model.tokenizer.apply_chat_template(CHAT)
    return len(model.tokenizer.encode(text, add_special_tokens=False))


def test_models_lists_every_model_with_its_state(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {MODEL, MODEL_B}
    assert all(getattr(m, "state", None) == ModelState.ACTIVE.value for m in models.values())
    assert client.models.retrieve(MODEL_B).id == MODEL_B


def test_completion_text_and_usage(client: openai.OpenAI, server: LiveServer) -> None:
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, extra_body=NO_EOS, **GREEDY
    )
    model = server.registry.get(MODEL)
    assert model is not None
    assert out.object == "text_completion" and out.model == MODEL
    assert len(out.choices) == 1 and out.choices[0].finish_reason == "length"
    assert out.choices[0].text
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(model.tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens == 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5


def test_completion_n_and_prompt_batch_usage(client: openai.OpenAI) -> None:
    """Two prompts × n=2 → four choices indexed 0..3; prompt tokens counted once each."""
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    out = client.completions.create(
        model=MODEL, prompt=prompts, n=2, max_tokens=3, seed=7, extra_body=NO_EOS
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage is not None
    assert out.usage.prompt_tokens == 7
    assert out.usage.completion_tokens == 12


def test_chat_completion(client: openai.OpenAI, server: LiveServer) -> None:
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, **GREEDY)
    choice = out.choices[0]
    assert out.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert out.usage is not None
    assert out.usage.prompt_tokens == _chat_prompt_tokens(server)
    assert 1 <= out.usage.completion_tokens <= 8


def test_chat_stream_equals_the_whole_answer(client: openai.OpenAI) -> None:
    """Deltas concatenate to the non-streamed text; the last chunk carries usage."""
    args: dict[str, Any] = {"model": MODEL, "messages": CHAT, "max_completion_tokens": 8}
    whole = client.chat.completions.create(**args, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            **args, **GREEDY, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason
    assert all(r is None for r in reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_async_client_streams_and_runs_concurrently(async_client: openai.AsyncOpenAI) -> None:
    async def stream_text() -> str:
        stream = await async_client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=6, stream=True, **GREEDY
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def whole_text() -> str:
        out = await async_client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=6, **GREEDY
        )
        return out.choices[0].text

    async def chat() -> str | None:
        out = await async_client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=4, **GREEDY
        )
        return out.choices[0].message.content

    async def run() -> tuple[str, str, list[str | None]]:
        async with async_client:
            return await asyncio.gather(
                stream_text(), whole_text(), asyncio.gather(*(chat() for _ in range(3)))
            )

    streamed, whole, chats = asyncio.run(run())
    assert streamed == whole and whole
    assert len(set(chats)) == 1 and chats[0]


def test_stop_strings_cut_the_text(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 10, **GREEDY}
    full = client.completions.create(**args, extra_body=NO_EOS).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.index(stop)]
    for stops in (stop, ["never-appears", stop]):
        choice = client.completions.create(**args, stop=stops).choices[0]
        assert choice.text == expected
        assert choice.finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        out = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, seed=seed, n=2
        )
        return [c.message.content or "" for c in sorted(out.choices, key=lambda c: c.index)]

    first = sample(1234)
    assert sample(1234) == first
    assert first[0] != first[1] or sample(99) != first  # n samples use distinct seeds


def test_logprobs(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=3, **GREEDY
    )
    logprobs = chat.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and chat.usage is not None
    content = logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob == max(t.logprob for t in token.top_logprobs)
        assert token.logprob == token.top_logprobs[0].logprob  # greedy takes the top token

    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=2, extra_body=NO_EOS, **GREEDY
    )
    logprobs = out.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert "".join(logprobs.tokens) == out.choices[0].text
    assert len(logprobs.token_logprobs or []) == 4
    assert all(len(top) <= 2 for top in logprobs.top_logprobs or [])


def test_penalties_and_vllm_extensions_are_accepted(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        top_p=0.9,
        extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1},
    )
    assert out.usage is not None and 1 <= out.usage.completion_tokens <= 3
