"""Scheduling policies of the serving layer: plain Python over ints and floats.

No torch, no clocks, no I/O: every decision takes the time (`now`) and the state it needs
as arguments, so the live device worker and the cluster simulator run the same code.

- `slo` — policy inputs: `SLO`, `PendingRequest`, `RunningDecode`.
- `local_scheduler` — per device: admission order (Moore–Hodgson; FIFO and EDF
  baselines) and preemption victims.
- `demand` — `RateWindow`: sliding-window request and token rates of one model;
  `StepCostWindow`: engine seconds per output token (a model's compute share).
- `placement` — global: which model lives on which device (`KVPressurePlacement`, the
  paper's rule; `ComputeAwarePlacement`, with a compute term, hysteresis, rate limit).
- `eviction` — `EvictionPolicy`: which idle models to sleep when memory is short.
- `memory` — `fair_kv_share`, `kv_to_lend`: how much live KV a busy model gives another
  on the same device when the pool is dry.
"""

from prism.serving.policies.demand import Rate, RateWindow, RateWindowConfig, StepCostWindow
from prism.serving.policies.eviction import EvictionCandidate, EvictionConfig, EvictionPolicy
from prism.serving.policies.local_scheduler import (
    EDFOrder,
    FIFOOrder,
    LocalScheduler,
    LocalSchedulerConfig,
    PrefillEstimator,
    RotatingOrder,
)
from prism.serving.policies.memory import KVClaim, fair_kv_share, kv_to_lend
from prism.serving.policies.placement import (
    ComputeAwareConfig,
    ComputeAwarePlacement,
    DeviceInfo,
    KVPressurePlacement,
    Migration,
    ModelDemand,
    Placement,
    PlacementConfig,
    PlacementPolicy,
)
from prism.serving.policies.slo import SLO, PendingRequest, RunningDecode

__all__ = [
    "SLO",
    "ComputeAwareConfig",
    "ComputeAwarePlacement",
    "DeviceInfo",
    "EDFOrder",
    "EvictionCandidate",
    "EvictionConfig",
    "EvictionPolicy",
    "FIFOOrder",
    "KVClaim",
    "KVPressurePlacement",
    "LocalScheduler",
    "LocalSchedulerConfig",
    "Migration",
    "ModelDemand",
    "PendingRequest",
    "Placement",
    "PlacementConfig",
    "PlacementPolicy",
    "PrefillEstimator",
    "Rate",
    "RateWindow",
    "RateWindowConfig",
    "RotatingOrder",
    "RunningDecode",
    "StepCostWindow",
    "fair_kv_share",
    "kv_to_lend",
]
