"""`LocalScheduler`: admission order and preemption victims on one device, across its models.

Admission (Moore–Hodgson). Request i gets a deadline d_i = arrival_i + TTFT_SLO(model_i)
and an estimated service time p_i = prefill_s[model_i](prompt_tokens_i). The device's
prefills share its compute, so they are modelled as one machine serving them back to back
from `now`; request i meets its deadline iff its completion C_i ≤ d_i. Its slack is
d_i − now − p_i. The order is, front to back:

1. hopeless requests (slack < 0: late even if started now) are set aside;
2. the rest go through Moore–Hodgson: take them by earliest deadline, keep a running
   completion time t, and whenever t exceeds the deadline of the request just added,
   move the longest request taken so far to the back (it is dropped from the on-time
   set, and t falls by its p). What remains is a largest set that can all meet their
   deadlines, and EDF is an order in which they do: the number of misses is minimal;
3. the order is: on-time set (EDF), then the dropped (EDF), then the hopeless (EDF).

Preemption. Running decodes are protected by a headroom of `headroom_pages`: a shortage
up to the headroom is absorbed (the asker waits or the headroom is spent); only the excess
beyond it is taken from running decodes, lowest priority first, then latest arrival, and
only if the eligible victims can cover it (all or nothing: preempting without making room
destroys work for nothing).

`FIFOOrder` and `EDFOrder` are the baselines: the same interface, only `order` differs.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from prism.serving.policies.slo import SLO, PendingRequest, RunningDecode

PrefillEstimator = Callable[[int], float]  # prompt tokens → seconds of prefill on this device


@dataclass(frozen=True, slots=True)
class LocalSchedulerConfig:
    slos: Mapping[str, SLO]  # per model served on this device


@dataclass(frozen=True, slots=True)
class _Job:
    deadline: float
    prefill_s: float
    request: PendingRequest


class LocalScheduler:
    """Moore–Hodgson admission order; headroom-protected, priority-ordered preemption."""

    def __init__(
        self, config: LocalSchedulerConfig, prefill_s: Mapping[str, PrefillEstimator]
    ) -> None:
        self.config = config
        self.prefill_s = prefill_s  # measured (or calibrated) per model: not configuration

    def deadline(self, request: PendingRequest) -> float:
        return request.arrival_s + self.config.slos[request.model].ttft_s

    def estimate(self, request: PendingRequest) -> float:
        """Estimated prefill seconds of `request` on this device."""
        return self.prefill_s[request.model](request.prompt_tokens)

    def slack(self, request: PendingRequest, now: float) -> float:
        return self.deadline(request) - now - self.estimate(request)

    def order(self, pending: Sequence[PendingRequest], now: float) -> list[PendingRequest]:
        """Admission order, front first, that minimises deadline misses (see module doc)."""
        jobs = self._edf_jobs(pending)
        hopeless = [j for j in jobs if now + j.prefill_s > j.deadline]
        on_time, dropped = _moore_hodgson([j for j in jobs if now + j.prefill_s <= j.deadline], now)
        return [j.request for j in (*on_time, *dropped, *hopeless)]

    def missed(self, ordered: Sequence[PendingRequest], now: float) -> list[PendingRequest]:
        """The requests that miss their deadlines if prefilled back to back in this order."""
        t = now
        late = []
        for request in ordered:
            t += self.estimate(request)
            if t > self.deadline(request):
                late.append(request)
        return late

    def choose_preemption_victims(
        self,
        running: Sequence[RunningDecode],
        pages_needed: int,
        headroom_pages: int,
        *,
        below_priority: int | None = None,
    ) -> list[RunningDecode]:
        """Running decodes to preempt so that `pages_needed` pages can be found.

        `pages_needed` is the shortage (pages wanted beyond what is free); `headroom_pages`
        what the running decodes are protected by. Only `pages_needed − headroom_pages`
        is taken from them, lowest priority first, then latest arrival. With
        `below_priority`, only requests of strictly lower priority are eligible (equals
        preempting each other would recompute forever). Returns [] when there is no
        excess, or when the eligible requests together hold too few pages to cover it.
        """
        excess = pages_needed - headroom_pages
        if excess <= 0:
            return []
        eligible = [r for r in running if below_priority is None or r.priority < below_priority]
        eligible.sort(key=lambda r: (r.priority, -r.arrival_s, r.request_id))
        victims, freed = [], 0
        for request in eligible:
            if freed >= excess:
                break
            victims.append(request)
            freed += request.pages
        return victims if freed >= excess else []

    def _edf_jobs(self, pending: Sequence[PendingRequest]) -> list[_Job]:
        jobs = [_Job(self.deadline(r), self.estimate(r), r) for r in pending]
        jobs.sort(key=lambda j: (j.deadline, j.request.arrival_s, j.request.request_id))
        return jobs


class EDFOrder(LocalScheduler):
    """Baseline: earliest deadline first, hopeless or not."""

    def order(self, pending: Sequence[PendingRequest], now: float) -> list[PendingRequest]:
        return [j.request for j in self._edf_jobs(pending)]


class FIFOOrder(LocalScheduler):
    """Baseline: arrival order."""

    def order(self, pending: Sequence[PendingRequest], now: float) -> list[PendingRequest]:
        return sorted(pending, key=lambda r: (r.arrival_s, r.request_id))


class RotatingOrder(LocalScheduler):
    """Baseline: the `DeviceWorker`'s order without SLOs — models in turn, the first
    model moving one place on at every call, each model's requests in arrival order."""

    def __init__(
        self, config: LocalSchedulerConfig, prefill_s: Mapping[str, PrefillEstimator]
    ) -> None:
        super().__init__(config, prefill_s)
        self._turn = 0

    def order(self, pending: Sequence[PendingRequest], now: float) -> list[PendingRequest]:
        models = sorted({r.model for r in pending})
        if not models:
            return []
        self._turn = (self._turn + 1) % len(models)
        rank = {m: (i - self._turn) % len(models) for i, m in enumerate(models)}
        return sorted(pending, key=lambda r: (rank[r.model], r.arrival_s, r.request_id))


def _moore_hodgson(edf: list[_Job], now: float) -> tuple[list[_Job], list[_Job]]:
    """Split EDF-sorted jobs into a largest on-time set and the dropped, both in EDF order."""
    taken: list[tuple[float, int]] = []  # max-heap of (−prefill_s, −EDF index)
    dropped: set[int] = set()
    t = now
    for i, job in enumerate(edf):
        heapq.heappush(taken, (-job.prefill_s, -i))
        t += job.prefill_s
        if t > job.deadline:
            neg_p, neg_i = heapq.heappop(taken)  # the longest so far; ties: latest deadline
            dropped.add(-neg_i)
            t += neg_p
    on_time = [j for i, j in enumerate(edf) if i not in dropped]
    late = [j for i, j in enumerate(edf) if i in dropped]
    return on_time, late
