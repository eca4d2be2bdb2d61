"""What the simulator moves around: models (with SLOs) and requests (with timings)."""

from __future__ import annotations

from dataclasses import dataclass

from prism.sim.cost_model import ModelShape
from prism.sim.workloads import RequestSpec


@dataclass(frozen=True, slots=True)
class SimModel:
    index: int  # the workload's model number
    name: str
    shape: ModelShape
    ttft_slo_s: float = 1.0  # time to first token allowed
    tpot_slo_s: float = 0.1  # time per output token allowed (mean over the request)
    priority: int = 0  # higher keeps its memory longer under pressure


@dataclass(slots=True, eq=False)
class SimRequest:
    """One request in flight. A preempted request loses its KV and recomputes it: its
    prompt and the tokens it had generated are prefilled again (no new first token)."""

    id: int
    model: int
    arrival: float
    prompt: int
    output: int  # tokens to generate, the first included
    deadline: float  # arrival + the model's TTFT SLO: what the local scheduler orders by
    to_prefill: int = 0  # tokens still to prefill before decoding (re)starts
    kv_tokens: int = 0  # tokens whose KV the request holds
    generated: int = 0  # output tokens produced
    first_token: float = -1.0  # time of the first output token; -1 until then
    finish: float = -1.0  # time of the last one; -1 until then
    preemptions: int = 0
    blocks: list[int] | None = None  # KV blocks held; None while waiting

    @classmethod
    def from_spec(cls, spec: RequestSpec, ttft_slo_s: float) -> SimRequest:
        return cls(
            spec.id,
            spec.model,
            spec.arrival,
            spec.prompt_tokens,
            spec.output_tokens,
            spec.arrival + ttft_slo_s,
            to_prefill=spec.prompt_tokens,
        )

    def preempt(self) -> None:
        """Drop the KV; everything computed so far is prefilled again on re-admission."""
        self.to_prefill = self.prompt + self.generated
        self.kv_tokens = 0
        self.preemptions += 1

    @property
    def remaining(self) -> int:
        return self.output - self.generated
