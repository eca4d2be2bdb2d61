"""Errors reach the client as OpenAI error bodies with the right status, so the `openai`
client raises its typed exceptions."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest
import torch
from server_helpers import API_KEY, MAX_MODEL_LEN, MODEL, MODEL_B, LiveServer, idle, wait_until

from prism.engine.scheduler import ScheduledBatch

CHAT: list[Any] = [{"role": "user", "content": "Hi"}]


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert _error(e.value)["code"] == "model_not_found"
    assert _error(e.value)["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


@pytest.mark.parametrize(
    ("args", "param"),
    [
        ({"temperature": 3.0}, "temperature"),  # schema check
        ({"top_p": 0.0}, "top_p"),
        ({"presence_penalty": -5.0}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"stop": [""]}, "stop.0"),  # a union's branch: the telling error, not "not a str"
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs=True
        ({"logit_bias": {"1": 5}}, "logit_bias"),  # not supported
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(
    client: openai.OpenAI, args: dict[str, Any], param: str
) -> None:
    request = {"model": MODEL, "messages": CHAT, "max_tokens": 1, **args}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**request)
    error = _error(e.value)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split(".")[0] in error["message"]


def test_bad_prompts_are_400(client: openai.OpenAI, server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError, match="token ids must be in") as e:
        client.completions.create(model=MODEL, prompt=[[1, 2], [10**9]])
    assert _error(e.value)["code"] == "invalid_token_id"  # the model's limit, not the API's
    for prompt, param in (("", "prompt"), ([], "prompt"), ([[1], [-1]], "prompt.1.0")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=prompt)
        assert _error(e.value)["param"] == param
    with pytest.raises(openai.BadRequestError) as e:  # no token of SmolLM2's vocabulary
        client.completions.create(model=MODEL, prompt="\x13")
    assert _error(e.value)["code"] == "empty_prompt"
    response = httpx.post(
        f"{server.api_url}/completions",
        content=b"{oops",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_prompt_too_long_is_400_with_the_limit(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1] * MAX_MODEL_LEN, max_tokens=1)
    error = _error(e.value)
    assert error["code"] == "context_length_exceeded"
    assert str(MAX_MODEL_LEN) in error["message"]
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=MODEL, prompt=[1] * 10, max_tokens=MAX_MODEL_LEN)


def test_a_kv_limit_below_the_least_a_cache_holds_is_400_with_the_least(
    server: LiveServer,
) -> None:
    """The least differs from model to model (a group of pages per layer), so the schema
    allows any size and the 400 carries a model-limit code."""
    response = httpx.post(
        f"{server.base_url}/admin/models/{MODEL}/limit",
        json={"kv_bytes": 1},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "kv_limit_too_small" and error["param"] == "kv_bytes"
    assert error["message"].startswith("kv_bytes: 1 is below the least smol's KV cache holds: ")
    assert error["message"].endswith(" bytes")


def test_api_key_is_required_except_for_health(server: LiveServer) -> None:
    wrong = openai.OpenAI(base_url=server.api_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert _error(e.value)["code"] == "invalid_api_key"
    for path in ("/v1/models", "/metrics", "/admin/models", "/no-such-route"):
        assert httpx.get(server.base_url + path).status_code == 401
    assert httpx.get(server.base_url + "/health").status_code == 200
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(server.base_url + "/admin/models", headers=headers).status_code == 200


def test_overload_is_429_with_retry_after(server: LiveServer) -> None:
    """smol-b takes 2 running + 1 waiting requests; a fourth is refused until they end."""
    client = openai.AsyncOpenAI(base_url=server.api_url, api_key=API_KEY, max_retries=0)

    async def run() -> openai.RateLimitError:
        streams = [
            await client.completions.create(
                model=MODEL_B,
                prompt="Once upon",
                max_tokens=400,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for _ in range(3)
        ]
        try:
            with pytest.raises(openai.RateLimitError) as e:
                await client.completions.create(model=MODEL_B, prompt="Hi", max_tokens=1)
            with pytest.raises(openai.BadRequestError, match="at most 3"):
                await client.completions.create(model=MODEL_B, prompt="Hi", max_tokens=1, n=4)
        finally:
            for stream in streams:
                await stream.close()
            await client.close()
        return e.value

    error = asyncio.run(run())
    assert error.response.headers["Retry-After"].isdigit()
    assert _error(error)["code"] == "rate_limit_exceeded"
    wait_until(lambda: idle(server.engine(MODEL_B)), timeout=30)
    out = openai.OpenAI(base_url=server.api_url, api_key=API_KEY).completions.create(
        model=MODEL_B, prompt="Hi", max_tokens=1
    )
    assert out.usage is not None and out.usage.completion_tokens == 1


def test_engine_failure_is_500_and_the_engine_recovers(
    client: openai.OpenAI, server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = server.engine(MODEL_B).engine
    assert engine is not None
    runner = engine.runner

    def fail(batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        raise RuntimeError("simulated device error")

    with monkeypatch.context() as patch:
        patch.setattr(runner, "execute", fail)
        with pytest.raises(openai.InternalServerError, match="simulated device error"):
            client.completions.create(model=MODEL_B, prompt="Hi", max_tokens=2)
    wait_until(lambda: idle(server.engine(MODEL_B)))
    out = client.completions.create(model=MODEL_B, prompt="Hi", max_tokens=2)
    assert out.choices[0].text is not None
