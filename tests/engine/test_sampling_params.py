"""`SamplingParams` validation: every bad value raises ValueError naming its field."""

from __future__ import annotations

import math
from typing import Any

import pytest

from prism.engine import SamplingParams

BAD: list[tuple[str, dict[str, Any]]] = [
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": -5}),
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": 101.0}),
    ("temperature", {"temperature": math.nan}),
    ("temperature", {"temperature": math.inf}),
    ("top_k", {"top_k": -1}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.01}),
    ("top_p", {"top_p": math.nan}),
    ("min_p", {"min_p": -0.1}),
    ("min_p", {"min_p": 1.5}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("repetition_penalty", {"repetition_penalty": math.nan}),
    ("frequency_penalty", {"frequency_penalty": 2.5}),
    ("frequency_penalty", {"frequency_penalty": -math.inf}),
    ("presence_penalty", {"presence_penalty": -3.0}),
    ("logprobs", {"logprobs": -1}),
    ("logprobs", {"logprobs": SamplingParams.MAX_LOGPROBS + 1}),
    ("stop", {"stop": tuple(f"s{i}" for i in range(SamplingParams.MAX_STOP_STRINGS + 1))}),
    ("stop", {"stop": ("ok", "")}),
    ("stop_token_ids", {"stop_token_ids": (3, -1)}),
]


@pytest.mark.parametrize(("field", "kwargs"), BAD, ids=[f"{f}={v}" for f, v in BAD])
def test_bad_value_names_the_field(field: str, kwargs: dict[str, Any]) -> None:
    """The message starts with the offending field's name."""
    with pytest.raises(ValueError, match=rf"^{field}: "):
        SamplingParams(**kwargs)


def test_boundary_values_are_accepted() -> None:
    """The documented ends of every range are valid."""
    SamplingParams(
        max_tokens=1, temperature=100.0, top_k=0, top_p=1.0, min_p=1.0,
        repetition_penalty=10.0, frequency_penalty=-2.0, presence_penalty=2.0,
        logprobs=SamplingParams.MAX_LOGPROBS,
        stop=tuple(f"s{i}" for i in range(SamplingParams.MAX_STOP_STRINGS)),
        stop_token_ids=(0,),
    )  # fmt: skip
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams().greedy


def test_params_are_frozen() -> None:
    """Validated params cannot be changed afterwards (and so stay valid)."""
    params = SamplingParams()
    with pytest.raises(AttributeError):
        params.temperature = -1.0  # type: ignore[misc]
