"""Global placement: which device each model lives on.

Inputs are one `ModelDemand` per model and one `DeviceInfo` per device. Formulas:

- KV demand of a model (bytes it needs resident to serve its rate within its TPOT SLO):

      demand = token_rate × tpot_slo_s × context_tokens × kv_bytes_per_token

  A decoding sequence emits at most one token per step, and at the SLO a step may take
  tpot_slo_s, so producing token_rate tokens/s keeps token_rate × tpot_slo_s sequences
  decoding at once (Little's law); each holds about context_tokens tokens of KV. (The
  paper weights a request rate by 1/SLO; this byte-valued reading differs in direction: at
  a given rate a tighter TPOT SLO means fewer sequences in flight, so less KV.)
- A model is *active* when token_rate > 0; only active models' weights are resident. An
  idle model is placed too (it sleeps on its device and is woken there), but holds no pages.
- Pressure of a device (the paper's KV pressure ratio):

      pressure = Σ demand / (memory_bytes − Σ weight_bytes of its active models)

  (0 when Σ demand = 0; inf when demand > 0 and no memory is left for KV).
- Feasible: a model's weights fit the device on their own; with the model, the active
  weights fit (Σ ≤ memory_bytes); no other member of its anti-affinity groups is there;
  the device is the model's pinned one, if it has one.

`KVPressurePlacement` (the paper's rule): models by demand, largest first, each to the
feasible device with the least resulting pressure (ties: least share of its memory
promised to weights, asleep or not, then device order). `ComputeAwarePlacement`
("prism+"): the same greedy on

      score = pressure + overload_penalty × max(0, Σ compute_share − 1)

with hysteresis (a model stays on its current device unless moving lowers the score by
more than `min_improvement`), at most `max_migrations` moves per `migration_window_s`, and
no model moved again within `min_residence_s` of its last move (so load that oscillates
faster than a move pays back is not chased). A move is forced, and always made, when the
current device is gone or no longer feasible. Given the placement in force it re-places
incrementally: every model stays where it is (in the greedy's order, so that where a
device no longer holds them all, the smallest demands are the ones forced out), the
forced and the new ones are placed greedily around them, then each model in turn, those
on the worst-scoring devices first (on one device, the smallest demand first: the cheapest
to move), moves if the best other device scores it lower by
more than `min_improvement` — each move judged against every other model where it is,
so that no move is undone by the next re-placement unless the load itself changed.
(`incremental=False`: the greedy is re-run from scratch and a model's stay is judged
against the partial placement built so far — the paper's rule with τ, which can split a
pair and rejoin it at the next call.)
Greedy bin packing can leave a model unplaced where a feasible placement exists; such
models are reported in `Placement.unplaced`, never placed infeasibly.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ModelDemand:
    name: str
    weight_bytes: int
    kv_bytes_per_token: int  # all layers, K and V
    token_rate: float  # output tokens/s the model must produce (0: idle, asleep)
    tpot_slo_s: float
    compute_share: float  # fraction of a device's compute it uses at this rate (1: always busy)
    context_tokens: int = 1024  # mean tokens of KV a running sequence holds

    @property
    def active(self) -> bool:
        return self.token_rate > 0

    @property
    def resident_weight_bytes(self) -> int:
        return self.weight_bytes if self.active else 0

    @property
    def kv_demand_bytes(self) -> float:
        return self.token_rate * self.tpot_slo_s * self.context_tokens * self.kv_bytes_per_token


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    device_id: str
    memory_bytes: int  # what the device's pool can give models (its budget)


@dataclass(frozen=True, slots=True)
class Migration:
    model: str
    source: str  # device id
    target: str  # device id


@dataclass(slots=True)
class Placement:
    assignment: dict[str, str]  # model → device id
    migrations: list[Migration]  # models whose device differs from `current`
    unplaced: list[str] = field(default_factory=list)  # no feasible device (not in assignment)
    pressure: dict[str, float] = field(default_factory=dict)  # device id → resulting pressure


@dataclass(frozen=True, slots=True)
class PlacementConfig:
    # Groups of models (TP shards of one model) whose members must be on different devices.
    anti_affinity: frozenset[frozenset[str]] = frozenset()
    # Models that may live on one device only: model → device id.
    pinned: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ComputeAwareConfig(PlacementConfig):
    overload_penalty: float = 1.0  # score per unit of compute share beyond one device
    min_improvement: float = 0.1  # score a move must gain to leave the current device
    max_migrations: int = 2  # moves allowed per window (forced moves always happen)
    migration_window_s: float = 60.0
    min_residence_s: float = 120.0  # a model that moved stays this long (unless forced)
    incremental: bool = True  # re-place from the current placement (module doc)


def pressure(demand_bytes: float, kv_bytes: float) -> float:
    """KV demand over the memory left for KV; 0 without demand, inf without memory."""
    if demand_bytes <= 0:
        return 0.0
    return demand_bytes / kv_bytes if kv_bytes > 0 else math.inf


@dataclass(slots=True)
class _Load:
    """What the greedy has put on one device so far."""

    device: DeviceInfo
    index: int
    models: set[str] = field(default_factory=set)
    demand: float = 0.0  # Σ kv_demand_bytes
    resident_weights: int = 0  # Σ weights of active models
    placed_weights: int = 0  # Σ weights of all models, asleep or not
    compute: float = 0.0  # Σ compute_share

    def fits(self, m: ModelDemand) -> bool:
        memory = self.device.memory_bytes
        resident = self.resident_weights + m.resident_weight_bytes
        return m.weight_bytes <= memory and resident <= memory

    def pressure_with(self, m: ModelDemand) -> float:
        kv_bytes = self.device.memory_bytes - self.resident_weights - m.resident_weight_bytes
        return pressure(self.demand + m.kv_demand_bytes, kv_bytes)

    def add(self, m: ModelDemand, sign: int = 1) -> None:
        if sign > 0:
            self.models.add(m.name)
        else:
            self.models.remove(m.name)
        self.demand += sign * m.kv_demand_bytes
        self.resident_weights += sign * m.resident_weight_bytes
        self.placed_weights += sign * m.weight_bytes
        self.compute += sign * m.compute_share

    def remove(self, m: ModelDemand) -> None:
        self.add(m, -1)

    @property
    def pressure(self) -> float:
        return pressure(self.demand, self.device.memory_bytes - self.resident_weights)


class PlacementPolicy(ABC):
    @abstractmethod
    def place(
        self,
        models: Sequence[ModelDemand],
        devices: Sequence[DeviceInfo],
        current: dict[str, str] | None = None,
        now: float = 0.0,
    ) -> Placement:
        """Assign every model a device; `current` is the assignment in force (for moves)."""


class KVPressurePlacement(PlacementPolicy):
    """The paper's rule: by demand, largest first, onto the least-pressured feasible device.

    Stateless: `current` only names the moves; the paper's migration threshold τ is
    `ComputeAwarePlacement`'s hysteresis.
    """

    def __init__(self, config: PlacementConfig | None = None) -> None:
        self.config = config or PlacementConfig()
        self._partners = _partners(self.config.anti_affinity)

    def place(
        self,
        models: Sequence[ModelDemand],
        devices: Sequence[DeviceInfo],
        current: dict[str, str] | None = None,
        now: float = 0.0,
    ) -> Placement:
        _check_names(models, devices)
        current = current or {}
        loads = [_Load(d, i) for i, d in enumerate(devices)]
        placement = Placement({}, [])
        for m in _greedy_order(models):
            options = [load for load in loads if self._allowed(load, m)]
            if not options:
                placement.unplaced.append(m.name)
                continue
            target = self._choose(m, options, current.get(m.name), now)
            target.add(m)
            placement.assignment[m.name] = target.device.device_id
        return _finish(placement, loads, current)

    def _score(self, load: _Load, m: ModelDemand) -> float:
        """What the greedy minimises: the device's pressure with `m` on it."""
        return load.pressure_with(m)

    def _choose(
        self, m: ModelDemand, options: list[_Load], current: str | None, now: float
    ) -> _Load:
        return self._best(m, options)

    def _best(self, m: ModelDemand, options: list[_Load]) -> _Load:
        def key(o: _Load) -> tuple[float, float, int]:
            weight_share = (o.placed_weights + m.weight_bytes) / o.device.memory_bytes
            return self._score(o, m), weight_share, o.index

        return min(options, key=key)

    def _allowed(self, load: _Load, m: ModelDemand) -> bool:
        pinned = self.config.pinned.get(m.name)
        if pinned is not None and pinned != load.device.device_id:
            return False
        return load.fits(m) and not (load.models & self._partners.get(m.name, set()))


class ComputeAwarePlacement(KVPressurePlacement):
    """Prism+: KV pressure plus a compute-overload term, with hysteresis and a move cap.

    Stateful: it remembers when it decided each move, to cap moves per rolling window.
    Re-places incrementally from the placement in force (module doc).
    """

    config: ComputeAwareConfig

    def __init__(self, config: ComputeAwareConfig | None = None) -> None:
        super().__init__(config or ComputeAwareConfig())
        self._moves: deque[float] = deque()  # times of the moves decided, oldest first
        self._last_move: dict[str, float] = {}  # model → time of its last move

    def place(
        self,
        models: Sequence[ModelDemand],
        devices: Sequence[DeviceInfo],
        current: dict[str, str] | None = None,
        now: float = 0.0,
    ) -> Placement:
        if not (self.config.incremental and current):
            return super().place(models, devices, current, now)
        _check_names(models, devices)
        loads = [_Load(d, i) for i, d in enumerate(devices)]
        by_id = {load.device.device_id: load for load in loads}
        placement = Placement({}, [])
        at: dict[str, _Load] = {}
        homeless = []  # new models, and those whose device is gone or no longer holds them
        for m in _greedy_order(models):
            home = by_id.get(current.get(m.name, ""))
            if home is not None and self._allowed(home, m):
                home.add(m)
                at[m.name] = home
            else:
                homeless.append(m)
        for m in homeless:
            options = [load for load in loads if self._allowed(load, m)]
            if not options:
                placement.unplaced.append(m.name)
                continue
            target = self._best(m, options)
            target.add(m)
            at[m.name] = target
            if m.name in current:  # forced: its device is gone or cannot keep it
                self._record_move(m.name, now)
        by_name = {m.name: m for m in models}

        def turn(name: str) -> tuple[float, float, int, str]:  # the worst devices first, and
            m = by_name[name]  # on one, the smallest model (the cheapest to move) first
            return -self._device_score(at[name]), m.kv_demand_bytes, m.weight_bytes, name

        for name in sorted(at, key=turn):
            m, here = by_name[name], at[name]
            here.remove(m)
            options = [load for load in loads if self._allowed(load, m)]
            best = self._best(m, options)  # `here` is among them: it held m a moment ago
            if best is not here and self._worth_moving(m, here, best, now):
                self._record_move(name, now)
                here = at[name] = best
            here.add(m)
        placement.assignment = {name: load.device.device_id for name, load in at.items()}
        return _finish(placement, loads, current)

    def _device_score(self, load: _Load) -> float:
        return load.pressure + self.config.overload_penalty * max(0.0, load.compute - 1.0)

    def _score(self, load: _Load, m: ModelDemand) -> float:
        overload = max(0.0, load.compute + m.compute_share - 1.0)
        return load.pressure_with(m) + self.config.overload_penalty * overload

    def _record_move(self, name: str, now: float) -> None:
        self._moves.append(now)
        self._last_move[name] = now

    def migrations_in_window(self, now: float) -> int:
        horizon = now - self.config.migration_window_s
        while self._moves and self._moves[0] <= horizon:
            self._moves.popleft()
        return len(self._moves)

    def _choose(
        self, m: ModelDemand, options: list[_Load], current: str | None, now: float
    ) -> _Load:
        best = self._best(m, options)
        if current is None or best.device.device_id == current:
            return best
        stay = next((load for load in options if load.device.device_id == current), None)
        if stay is not None and not self._worth_moving(m, stay, best, now):
            return stay
        self._record_move(m.name, now)  # a chosen move, or a forced one (current infeasible)
        return best

    def _worth_moving(self, m: ModelDemand, stay: _Load, best: _Load, now: float) -> bool:
        gain = self._score(stay, m) - self._score(best, m)
        if not gain > self.config.min_improvement:  # also false for inf − inf
            return False
        moved = self._last_move.get(m.name, -math.inf)
        if now - moved < self.config.min_residence_s:
            return False
        return self.migrations_in_window(now) < self.config.max_migrations


def _greedy_order(models: Sequence[ModelDemand]) -> list[ModelDemand]:
    """Largest KV demand first (then heaviest weights, then name)."""
    return sorted(models, key=lambda m: (-m.kv_demand_bytes, -m.weight_bytes, m.name))


def _finish(placement: Placement, loads: list[_Load], current: Mapping[str, str]) -> Placement:
    """The moves against `current` (in model order) and each device's resulting pressure."""
    placement.migrations = [
        Migration(name, current[name], device)
        for name, device in sorted(placement.assignment.items())
        if name in current and current[name] != device
    ]
    placement.pressure = {load.device.device_id: load.pressure for load in loads}
    return placement


def _partners(groups: frozenset[frozenset[str]]) -> dict[str, set[str]]:
    """Model → the models it must not share a device with."""
    partners: dict[str, set[str]] = {}
    for group in groups:
        for name in group:
            partners.setdefault(name, set()).update(group - {name})
    return partners


def _check_names(models: Sequence[ModelDemand], devices: Sequence[DeviceInfo]) -> None:
    _check_unique([m.name for m in models], "model")
    _check_unique([d.device_id for d in devices], "device")


def _check_unique(names: list[str], what: str) -> None:
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate {what} names in {sorted(names)}")
