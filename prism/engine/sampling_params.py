"""`SamplingParams`: how one request picks its tokens. Plain, frozen, validated data."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16  # tokens to generate at most
    temperature: float = 1.0  # 0 → greedy
    top_k: int = 0  # keep the k most likely tokens; 0 → off
    top_p: float = 1.0  # keep the smallest set whose probability reaches p
    min_p: float = 0.0  # drop tokens below min_p × the top token's probability
    seed: int | None = None  # reproducible sampling for this request
    repetition_penalty: float = 1.0  # > 1 discourages any token already in the sequence
    frequency_penalty: float = 0.0  # subtracted × count of the token in the output
    presence_penalty: float = 0.0  # subtracted once if the token is in the output
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end the request
    ignore_eos: bool = False
    logprobs: int | None = None  # also return the top-n log-probabilities per token
    include_stop_str_in_output: bool = False

    MAX_LOGPROBS = 20
    MAX_STOP_STRINGS = 64

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        checks: list[tuple[bool, str, str]] = [
            (self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}"),
            (0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]"),
            (self.top_k >= 0, "top_k", f"must be >= 0 (0 = off), got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}"),
            (0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be in (0, 10]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (
                self.logprobs is None or 0 <= self.logprobs <= self.MAX_LOGPROBS,
                "logprobs",
                f"must be in [0, {self.MAX_LOGPROBS}]",
            ),
            (
                len(self.stop) <= self.MAX_STOP_STRINGS,
                "stop",
                f"at most {self.MAX_STOP_STRINGS} stop strings",
            ),
            (all(s for s in self.stop), "stop", "stop strings must be non-empty"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be >= 0"),
        ]
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
        ):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name}: must be a finite number, got {value}")
        for ok, name, message in checks:
            if not ok:
                raise ValueError(f"{name}: {message}")
