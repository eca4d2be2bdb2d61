"""Property-based fuzzing of the served OpenAPI schema with schemathesis.

Every operation of the schema the server publishes is called with generated inputs,
valid and invalid; the checks fail on any 5xx, on a status, header, content type or
body the schema does not document, on a 2xx to input the schema forbids, and on a 4xx
to input it allows. Valid requests name a served model (a random name would only ever
reach the 404) and their generation lengths are capped so a CPU run stays short; the
caps keep invalid values invalid, so the shape of every request is still the fuzzer's.
A valid request may still exceed the limits of the model it names (its context, its
vocabulary): the 400 that says so, with its documented code, is the one 4xx accepted.

The stateful run chains calls along the schema's links (the model one response names is
the one the next call uses), so completions and admin calls meet a real model asleep,
awake and under random KV limits, which the stateless run (random names: 404) never does.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import CheckContext, GenerationMode, openapi
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation.stateful.state_machine import StepInput, StepOutput
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance
from server_helpers import API_KEY, MODEL, LiveServer, idle, wait_until

from prism.server.errors import MODEL_LIMIT_CODES
from prism.server.protocol import MAX_N

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_GENERATED_TOKENS = 3
MAX_SAMPLES = 2


def _cap_lengths(body: dict[str, Any]) -> None:
    """Integers above a cap (JSON's 5.0 is one too) come down to it; without a limit
    (absent or null: the rest of the context) the output gets the cap."""
    limits = [key for key in ("max_tokens", "max_completion_tokens") if body.get(key) is not None]
    for key in limits:
        if _is_integer(body[key]) and body[key] > MAX_GENERATED_TOKENS:
            body[key] = MAX_GENERATED_TOKENS
    if not limits:
        body["max_tokens"] = MAX_GENERATED_TOKENS
    if _is_integer(body.get("n")) and MAX_SAMPLES < body["n"] <= MAX_N:
        body["n"] = MAX_SAMPLES


def _is_integer(value: Any) -> bool:
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


# Message framing is the HTTP client's: a generated value for one of these makes the
# request malformed HTTP, which h11 refuses with its own 400 before any route runs.
FRAMING_HEADERS = {"content-length", "transfer-encoding", "connection", "host", "expect", "upgrade"}


def _drop_framing_headers(case: Any) -> None:
    if case.headers:
        for name in [n for n in case.headers if n.lower() in FRAMING_HEADERS]:
            del case.headers[name]


def _prepare(case: Any) -> None:
    _drop_framing_headers(case)
    if not isinstance(case.body, dict):
        return
    if case.meta.generation.mode.is_positive and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL
    _cap_lengths(case.body)


def _excluded(case: Any) -> list[Any]:
    """Checks not to run on `case`. Every call carries a valid API key (`AUTH`), so a case
    made invalid in its headers (a required Authorization removed, say) is sent with it
    restored and served: for such a case the 2xx-to-invalid-input check cannot hold."""
    excluded = [positive_data_acceptance]
    components = case.meta.components if case.meta is not None else {}
    header = components.get(ParameterLocation.HEADER)
    if header is not None and not header.mode.is_positive:
        excluded.append(negative_data_rejection)
    return excluded


def _accepts_valid_data(ctx: CheckContext, response: Any, case: Any) -> bool | None:
    """schemathesis' positive_data_acceptance, but for a 400 naming a model's limit."""
    if response.status_code == 400 and _error_code(response) in MODEL_LIMIT_CODES:
        return None
    return positive_data_acceptance(ctx, response, case)


def _error_code(response: Any) -> str | None:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


def test_schema_documents_errors_as_served(server: LiveServer) -> None:
    """Bad input is a 400 with OpenAI's error body (never FastAPI's 422), and with a key
    set every route but /health says it needs one."""
    schema = httpx.get(f"{server.base_url}/openapi.json", headers=AUTH).json()
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            assert "422" not in responses
            assert ("401" in responses) == (path != "/health")
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(chat) == {"200", "400", "401", "404", "413", "429", "500", "503"}
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["429"]["headers"]["Retry-After"]
    error = chat["400"]["content"]["application/json"]["schema"]["$ref"]
    assert error == "#/components/schemas/ErrorResponse"
    links = schema["paths"]["/v1/models"]["get"]["responses"]["200"]["links"]
    assert links["CreateChatCompletion"]["requestBody"] == {"model": "$response.body#/data/0/id"}


def test_api_conforms_and_never_fails(server: LiveServer) -> None:
    """For every operation: no 5xx, responses match the schema, invalid input gets a 4xx."""
    schema = openapi.from_url(f"{server.base_url}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {operation.path for operation in operations}
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health"} <= paths
    for operation in operations:
        cases = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(
            GenerationMode.NEGATIVE
        )

        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            # no shrinking: over a live model it takes minutes, and a failure already
            # prints its request as a curl command
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
        )
        @given(case=cases)
        def check(case: Any) -> None:
            _prepare(case)
            case.call_and_validate(
                headers=AUTH,
                timeout=120,
                excluded_checks=_excluded(case),
                additional_checks=[_accepts_valid_data],
            )

        check()


SETTINGS = settings(
    max_examples=80,
    stateful_step_count=6,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


def test_stateful_runs_follow_the_model_links(server: LiveServer) -> None:
    """Sequences of calls that follow the schema's links: the model a response names
    (`GET /v1/models`, `GET /admin/models`, a wake, sleep or limit) is the one the next
    call wakes, sleeps, limits, retrieves or asks for a completion. So completions reach a
    model just put to sleep (and wake it) or given a random KV limit, and admin calls meet
    a model in each state; every response is checked as in the stateless run. The models'
    state and KV limits are restored afterwards for the other tests."""
    before = _admin_models(server)
    schema = openapi.from_url(f"{server.base_url}/openapi.json", headers=AUTH)
    followed: Counter[str] = Counter()

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def step(self, input: StepInput) -> StepOutput:
            if input.transition is not None and input.is_applied:
                followed[input.transition.id] += 1
            return super().step(input)

        def before_call(self, case: Any) -> None:
            _drop_framing_headers(case)
            if isinstance(case.body, dict):
                _cap_lengths(case.body)

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"headers": AUTH, "timeout": 120}

        def validate_response(
            self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any
        ) -> None:
            case.validate_response(
                response,
                excluded_checks=_excluded(case),
                additional_checks=[_accepts_valid_data],
                transport_kwargs=kwargs or None,
                recorder=self.recorder,
            )

    start = time.monotonic()
    try:
        Workflow.run(settings=SETTINGS)
    finally:
        _restore(server, before)
    targets: Counter[str] = Counter()
    for link, count in followed.items():  # "GET /v1/models -> [200] WakeModel -> POST /admin/..."
        targets[link.split(" ")[-1]] += count
    print(
        f"\nstateful: {len(followed)} links followed {targets.total()} times in "
        f"{time.monotonic() - start:.0f} s: {dict(targets)}"
    )
    assert {"/v1/completions", "/v1/chat/completions"} <= set(targets)
    assert {"/admin/models/{name}/sleep", "/admin/models/{name}/wake"} <= set(targets)


def _admin_models(server: LiveServer) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.base_url}/admin/models", headers=AUTH)
    return list(response.json()["models"])


def _restore(server: LiveServer, models: list[dict[str, Any]]) -> None:
    for name in (m["name"] for m in models):
        wait_until(lambda name=name: idle(server.engine(name)), timeout=60)
    for model in models:
        admin = f"{server.base_url}/admin/models/{model['name']}"
        assert httpx.post(f"{admin}/wake", headers=AUTH, timeout=60).status_code == 200
        limit = {"kv_bytes": model["kv_bytes_limit"]}
        response = httpx.post(f"{admin}/limit", json=limit, headers=AUTH, timeout=60)
        assert response.status_code == 200

    def settled(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(m["name"], m["state"], m["kv_bytes_limit"]) for m in rows]

    assert settled(_admin_models(server)) == settled(models)
