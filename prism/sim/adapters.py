"""Thin adapters between the simulator's objects and `prism.serving.policies`.

The policies take plain frozen data (`PendingRequest`, `ModelDemand`, `DeviceInfo`,
`EvictionCandidate`) and return decisions; these functions build that data from
simulated GPUs, instances and requests, and map the decisions back. Nothing here
decides anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prism.serving.policies import (
    SLO,
    DeviceInfo,
    EvictionCandidate,
    LocalScheduler,
    LocalSchedulerConfig,
    ModelDemand,
    PendingRequest,
    RateWindow,
    RateWindowConfig,
)
from prism.sim.cost_model import CostModel
from prism.sim.gpu import SimGPU
from prism.sim.instance import Instance, State
from prism.sim.request import SimModel, SimRequest


def make_scheduler(
    cls: type[LocalScheduler], models: Sequence[SimModel], cost: CostModel, chunk_tokens: int
) -> LocalScheduler:
    """A local scheduler over every model, with prefill estimates from the cost model
    (chunked as the engine chunks prompts)."""
    slos = {m.name: SLO(m.ttft_slo_s, m.tpot_slo_s) for m in models}

    def estimator(model: SimModel) -> Callable[[int], float]:
        known: dict[int, float] = {}  # prompt lengths repeat: the scheduler asks again and again

        def prefill_s(tokens: int) -> float:
            seconds = known.get(tokens)
            if seconds is None:
                seconds, done = 0.0, 0
                while done < tokens:
                    n = min(chunk_tokens, tokens - done)
                    seconds += cost.prefill_s(model.shape, n, done)
                    done += n
                known[tokens] = seconds
            return seconds

        return prefill_s

    return cls(LocalSchedulerConfig(slos), {m.name: estimator(m) for m in models})


class SchedulerOrder:
    """`SimGPU`'s admission order, answered by a `LocalScheduler`."""

    def __init__(self, scheduler: LocalScheduler, models: Sequence[SimModel]) -> None:
        self.scheduler = scheduler
        self.names = [m.name for m in models]
        self.priority = [m.priority for m in models]

    def __call__(self, gpu: SimGPU, requests: list[SimRequest], now: float) -> list[SimRequest]:
        if len(requests) <= 1:
            return requests
        by_id = {r.id: r for r in requests}
        pending = [
            PendingRequest(
                str(r.id), self.names[r.model], r.arrival, r.to_prefill, self.priority[r.model]
            )
            for r in requests
        ]
        return [by_id[int(p.request_id)] for p in self.scheduler.order(pending, now)]


@dataclass(slots=True)
class ModelStats:
    """What the controller knows of a model's traffic: sliding-window rates and the
    mean lengths of its requests (outputs from finished ones: not known on arrival)."""

    window: RateWindow
    prompts: int = 0
    prompt_tokens: int = 0
    finished: int = 0
    output_tokens: int = 0
    default_output: int = 256  # assumed until a request of the model finishes

    @classmethod
    def new(cls, window_s: float) -> ModelStats:
        return cls(RateWindow(RateWindowConfig(window_s), start_s=0.0))

    @property
    def mean_output(self) -> float:
        return self.output_tokens / self.finished if self.finished else self.default_output

    @property
    def mean_prompt(self) -> float:
        return self.prompt_tokens / self.prompts if self.prompts else 1024.0

    def arrive(self, request: SimRequest, now: float) -> None:
        self.prompts += 1
        self.prompt_tokens += request.prompt
        self.window.record(now, round(self.mean_output))

    def finish(self, request: SimRequest) -> None:
        self.finished += 1
        self.output_tokens += request.output


def model_demand(
    model: SimModel, stats: ModelStats, now: float, cost: CostModel, overhead_bytes: int
) -> ModelDemand:
    """`ModelDemand` from observed rates; compute share = prefill seconds per second plus
    decode seconds per second at the batch Little's law gives (rate × TPOT SLO)."""
    rate = stats.window.rate(now)
    shape = model.shape
    prefill = rate.requests_per_s * cost.prefill_s(shape, max(1, round(stats.mean_prompt)))
    batch = max(1.0, min(128.0, rate.tokens_per_s * model.tpot_slo_s))
    context = stats.mean_prompt + stats.mean_output / 2
    step = cost.decode_s(shape, round(batch), round(batch * context))
    decode = rate.tokens_per_s / batch * step
    return ModelDemand(
        name=model.name,
        weight_bytes=shape.weight_bytes + overhead_bytes,
        kv_bytes_per_token=shape.kv_bytes_per_token,
        token_rate=rate.tokens_per_s,
        tpot_slo_s=model.tpot_slo_s,
        compute_share=prefill + decode,
        context_tokens=max(1, round(context)),
    )


def device_info(gpu: SimGPU) -> DeviceInfo:
    return DeviceInfo(str(gpu.index), gpu.config.budget_bytes)


def eviction_candidates(
    gpu: SimGPU, stats: Sequence[ModelStats], now: float
) -> list[EvictionCandidate]:
    """Resident models of a GPU with nothing queued or running."""
    page = gpu.config.page_size
    out = []
    for model, instance in gpu.instances.items():
        if instance.state is not State.ACTIVE or instance.has_work:
            continue
        weights, kv = instance.memory_bytes(page)
        out.append(
            EvictionCandidate(
                name=str(model),
                resident_bytes=weights + kv,
                weight_bytes=weights,
                idle_s=stats[model].window.idle_for(now),
                request_rate=stats[model].window.rate(now).requests_per_s,
            )
        )
    return out


def bytes_wanted(gpu: SimGPU, low_water_bytes: int) -> int:
    """Memory pressure on a GPU: what queued wakes need, plus what keeps free memory
    above the low-water mark, minus what is free."""
    page = gpu.config.page_size
    wakes = sum(_wake_pages(i) for i in gpu.wake_queue) * page
    return max(0, wakes + low_water_bytes - gpu.free_bytes)


def _wake_pages(instance: Instance) -> int:
    return instance.weights.num_pages + instance.kv.group_pages
