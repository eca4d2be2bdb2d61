"""The fleet file: which models Prism serves, on which devices, under which SLOs.

```yaml
devices: [cpu:0, cpu:1]   # auto | cpu | [0, 1] | [cuda:0, cuda:1] | [cpu:0, cpu:1]
budget: 2GiB              # per device (default: 4 GiB on the CPU, 90% of a GPU's free memory)
host_budget: 64GiB        # per device: host copies of weights beyond it are dropped, LRU first
mode: prism               # prism | static | swap
controller:               # optional: any field of ControllerConfig
  placement_interval_s: 10
models:
  - name: llama-3.1-8b
    path: /models/Llama-3.1-8B-Instruct   # HF directory or GGUF file; or `source: default`
    slo: {ttft_ms: 500, tpot_ms: 50}      # (the embedded model), or `preset: qwen3-8b`
    priority: high                        # low | normal | high | an integer
    min_memory: 1GiB                      # reserved beside its weights when placing it
    max_memory: 20GiB                     # weights + KV cache at most
    pinned: cuda:0                        # always on this device, never idle-evicted
    sms: 32                               # a fixed share of its GPU's SMs (isolation)
```

Several `cpu:N` devices are separate workers (separate page pools) on the host: how CPU
tests and laptops run a multi-device fleet. Every error names the file and the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from prism.engine.engine import EngineConfig
from prism.models.checkpoint import open_checkpoint
from prism.serving.async_worker import DEFAULT_MAX_WAITING, AsyncWorker
from prism.serving.model_slot import ModelSpec
from prism.serving.policies import SLO
from prism.serving.worker import DeviceWorker, WorkerConfig, WorkerMode
from prism.serving.worker_client import free_device_memory

DEFAULT_SLO = SLO(ttft_s=1.0, tpot_s=0.1)
DEFAULT_CPU_BUDGET = 4 << 30  # a device's budget when the file gives none
GPU_BUDGET_FRACTION = 0.9  # of a GPU's free memory, measured by its worker
PRIORITIES = {"low": -1, "normal": 0, "high": 1}
DEFAULT_SOURCE = "default"  # the embedded SmolLM2-135M-Instruct
LOAD_FORMATS = ("auto", "hf", "gguf", "dummy")

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_UNITS |= {f"{u}b": 1000 ** (i + 1) for i, u in enumerate("kmgt")}
_UNITS |= {f"{u}ib": 1 << (10 * (i + 1)) for i, u in enumerate("kmgt")}


class FleetConfigError(ValueError):
    """A fleet file that cannot be served; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """How the controller watches and rearranges the fleet."""

    tick_s: float | None = 1.0  # stats refresh and idle eviction; None: only explicit tick()
    placement_interval_s: float = 10.0  # re-placement on fresh rates
    rate_window_s: float = 60.0  # sliding window of the request and token rates
    idle_eviction_s: float = 45.0  # no model idle for less than this is put to sleep
    low_water_fraction: float = 0.05  # free memory below this share of a budget: pressure
    min_improvement: float = 0.1  # pressure a migration must gain (hysteresis)
    max_migrations: int = 2  # per migration_window_s
    migration_window_s: float = 60.0
    min_residence_s: float = 120.0  # a migrated model stays this long
    drain_timeout_s: float = 60.0  # wait for a migrated model's last requests on its source
    max_restarts: int = 3  # crashes of one worker within restart_window_s before giving up
    restart_window_s: float = 300.0
    worker_start_timeout_s: float = 300.0
    max_waiting: int = DEFAULT_MAX_WAITING  # per model, queued beyond those running
    max_inflight: int | None = None  # requests per device over all its models; None: no bound

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in ("tick_s", "max_inflight"):
                continue
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"{f.name}: must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{f.name}: must be a finite number >= 0, got {value!r}")
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ValueError(f"max_inflight: must be at least 1, got {self.max_inflight!r}")


@dataclass(frozen=True, slots=True)
class FleetModel:
    name: str
    source: str  # HF directory, GGUF file, preset name, or "default" (the embedded model)
    load_format: str = "auto"
    slo: SLO = DEFAULT_SLO
    priority: int = 0  # higher keeps its memory longer under pressure
    min_memory: int = 0  # bytes reserved beside its weights when placing it
    max_memory: int | None = None  # weights + KV cache at most; None: the device budget
    pinned: str | None = None  # device id it always lives on
    max_model_len: int | None = None  # tokens per request; None: the engine's default
    max_num_seqs: int | None = None  # requests running at once; None: the engine's default
    sms: int | None = None  # a fixed share of its GPU's SMs (`ModelSpec.sms`); None: shared

    def resolved_source(self) -> str:
        """`source`, with "default" resolved to the embedded model's path."""
        if self.source != DEFAULT_SOURCE:
            return self.source
        from prism.models.default import default_model_path

        return str(default_model_path())


@dataclass(frozen=True, slots=True)
class FleetConfig:
    models: tuple[FleetModel, ...]
    devices: tuple[str, ...] | None = None  # device ids ("cpu:0", "cuda:1"); None: auto
    budget_bytes: int | None = None  # per device; None: the device's default
    host_budget_bytes: int | None = None  # host copies per device; None: no bound
    mode: WorkerMode = WorkerMode.PRISM
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    path: str = "<fleet>"  # where it was read from, for messages

    def model(self, name: str) -> FleetModel:
        found = next((m for m in self.models if m.name == name), None)
        if found is None:
            raise KeyError(
                f"unknown model {name!r}; in {self.path}: {[m.name for m in self.models]}"
            )
        return found

    def worker_config(self, device: str, budget_bytes: int) -> WorkerConfig:
        """The worker of one of its devices (`device` as torch names it)."""
        return WorkerConfig(
            device=device,
            budget_bytes=budget_bytes,
            mode=self.mode,
            max_inflight=self.controller.max_inflight,
            host_budget_bytes=self.host_budget_bytes,
        )

    def device_ids(self) -> tuple[str, ...]:
        """The devices, with `auto` resolved: every CUDA device, else one CPU worker."""
        if self.devices is not None:
            return self.devices
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return tuple(f"cuda:{i}" for i in range(count)) or ("cpu:0",)


def torch_device(device_id: str) -> str:
    """What a device id's worker runs on: `cpu:N` → `cpu`, `cuda:N` as it is."""
    return "cpu" if device_id.split(":")[0] == "cpu" else device_id


def parse_size(value: object) -> int:
    """Bytes from `2GiB`, `512MiB`, `1.5G` (binary), `2GB` (decimal) or a number."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS or isinstance(value, bool):
        raise ValueError(f"not a size: {value!r} (e.g. 2GiB, 512MiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[unit])


def load_fleet(path: str | Path) -> FleetConfig:
    """Read and check a fleet file; `FleetConfigError` names the file and the field."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise FleetConfigError(f"{path}: cannot read the fleet file: {e.strerror}") from e
    return parse_fleet(text, str(path))


def parse_fleet(text: str, path: str = "<fleet>") -> FleetConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise FleetConfigError(f"{path}: not valid YAML: {e}") from e
    return _Parser(path).fleet(data)


class _Parser:
    """Turns the YAML tree into a `FleetConfig`; every error names `path` and the field."""

    def __init__(self, path: str) -> None:
        self.path = path

    def error(self, where: str, problem: str) -> FleetConfigError:
        return FleetConfigError(f"{self.path}: {where}: {problem}")

    def fleet(self, data: object) -> FleetConfig:
        top = self.mapping(data, "the file")
        fields = ("devices", "budget", "host_budget", "mode", "controller", "models")
        self.known(top, "the file", fields)
        self.require(top, "the file", "models")
        devices = self.devices(top.get("devices", "auto"))
        budget = self.size(top["budget"], "budget") if top.get("budget") is not None else None
        host = top.get("host_budget")
        host_budget = self.size(host, "host_budget") if host is not None else None
        mode = self.choice(top.get("mode", "prism"), "mode", [m.value for m in WorkerMode])
        items = top["models"]
        if not isinstance(items, list) or not items:
            raise self.error("models", "must be a non-empty list of models")
        models = tuple(self.model(item, f"models[{i}]") for i, item in enumerate(items))
        self.check_models(models, devices, WorkerMode(mode))
        return FleetConfig(
            models=models,
            devices=devices,
            budget_bytes=budget,
            host_budget_bytes=host_budget,
            mode=WorkerMode(mode),
            controller=self.controller(top.get("controller") or {}),
            path=self.path,
        )

    def devices(self, value: object) -> tuple[str, ...] | None:
        if value == "auto":
            return None
        items = value if isinstance(value, list) else [value]
        if not items:
            raise self.error("devices", "must name at least one device (or be `auto`)")
        ids = tuple(self.device(item, f"devices[{i}]") for i, item in enumerate(items))
        if len(set(ids)) != len(ids):
            raise self.error("devices", f"a device is listed twice: {list(ids)}")
        return ids

    def device(self, value: object, where: str) -> str:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return f"cuda:{value}"
        text = str(value).strip().lower()
        if text in ("cpu", "cuda"):
            return f"{text}:0"
        if re.fullmatch(r"(cpu|cuda):[0-9]+", text):
            return text
        raise self.error(where, f"not a device: {value!r} (cpu, cpu:N, cuda:N or a GPU index)")

    def model(self, data: object, where: str) -> FleetModel:
        item = self.mapping(data, where)
        self.known(
            item,
            where,
            ("name", "path", "source", "preset", "load_format", "slo", "priority",
             "min_memory", "max_memory", "pinned", "max_model_len", "max_num_seqs", "sms"),
        )  # fmt: skip
        self.require(item, where, "name")
        name = item["name"]
        if not isinstance(name, str) or not name.strip():
            raise self.error(f"{where}.name", f"must be a non-empty string, got {name!r}")
        where = f"{where} ({name})"
        source, load_format = self.source(item, where)
        min_memory = self.size(item.get("min_memory", 0), f"{where}.min_memory")
        max_memory = item.get("max_memory")
        if max_memory is not None:
            max_memory = self.size(max_memory, f"{where}.max_memory")
            if max_memory < min_memory:
                raise self.error(f"{where}.max_memory", "is below min_memory")
        pinned = item.get("pinned")
        return FleetModel(
            name=name,
            source=source,
            load_format=load_format,
            slo=self.slo(item.get("slo"), f"{where}.slo"),
            priority=self.priority(item.get("priority", "normal"), f"{where}.priority"),
            min_memory=min_memory,
            max_memory=max_memory,
            pinned=self.device(pinned, f"{where}.pinned") if pinned is not None else None,
            max_model_len=self.count(item.get("max_model_len"), f"{where}.max_model_len"),
            max_num_seqs=self.count(item.get("max_num_seqs"), f"{where}.max_num_seqs"),
            sms=self.count(item.get("sms"), f"{where}.sms"),
        )

    def source(self, item: Mapping[str, Any], where: str) -> tuple[str, str]:
        given = [k for k in ("path", "source", "preset") if k in item]
        if len(given) != 1:
            raise self.error(where, "needs exactly one of `path`, `source` or `preset`")
        value = item[given[0]]
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"{where}.{given[0]}", f"must be a non-empty string, got {value!r}")
        load_format = self.choice(
            item.get("load_format", "dummy" if given[0] == "preset" else "auto"),
            f"{where}.load_format",
            LOAD_FORMATS,
        )
        if given[0] == "preset":
            from prism.models.presets import PRESETS

            if value not in PRESETS:
                raise self.error(
                    f"{where}.preset", f"unknown preset {value!r}; known: {list(PRESETS)}"
                )
            if load_format != "dummy":
                raise self.error(f"{where}.load_format", "a preset has random weights: `dummy`")
        return value, load_format

    def slo(self, data: object, where: str) -> SLO:
        if data is None:
            return DEFAULT_SLO
        item = self.mapping(data, where)
        self.known(item, where, ("ttft_ms", "tpot_ms"))
        ttft = self.positive(item.get("ttft_ms", DEFAULT_SLO.ttft_s * 1e3), f"{where}.ttft_ms")
        tpot = self.positive(item.get("tpot_ms", DEFAULT_SLO.tpot_s * 1e3), f"{where}.tpot_ms")
        return SLO(ttft_s=ttft / 1e3, tpot_s=tpot / 1e3)

    def priority(self, value: object, where: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value in PRIORITIES:
            return PRIORITIES[value]
        raise self.error(where, f"must be low, normal, high or an integer, got {value!r}")

    def controller(self, data: object) -> ControllerConfig:
        item = self.mapping(data, "controller")
        names = [f.name for f in dataclasses.fields(ControllerConfig)]
        self.known(item, "controller", names)
        try:
            return ControllerConfig(**item)
        except ValueError as e:
            raise self.error("controller", str(e)) from None

    def check_models(
        self, models: tuple[FleetModel, ...], devices: tuple[str, ...] | None, mode: WorkerMode
    ) -> None:
        seen: set[str] = set()
        for i, m in enumerate(models):
            if m.name in seen:
                raise self.error(f"models[{i}].name", f"{m.name!r} is used by an earlier model")
            seen.add(m.name)
            if mode is WorkerMode.STATIC and m.max_memory is None:
                raise self.error(
                    f"models[{i}] ({m.name}).max_memory", "mode static needs it (the model's share)"
                )
            cpu = devices is not None and any(torch_device(d) == "cpu" for d in devices)
            if m.sms is not None and cpu:
                raise self.error(f"models[{i}] ({m.name}).sms", "an SM share needs CUDA devices")
            if m.pinned is not None and devices is not None and m.pinned not in devices:
                raise self.error(
                    f"models[{i}] ({m.name}).pinned",
                    f"{m.pinned} is not in devices {list(devices)}",
                )

    # ---- scalars -----------------------------------------------------------------------

    def mapping(self, data: object, where: str) -> Mapping[str, Any]:
        if not isinstance(data, Mapping):
            raise self.error(where, f"must be a mapping, got {type(data).__name__}")
        return data

    def require(self, item: Mapping[str, Any], where: str, key: str) -> None:
        if key not in item:
            raise self.error(where, f"`{key}` is required")

    def known(self, item: Mapping[str, Any], where: str, keys: tuple[str, ...] | list[str]) -> None:
        unknown = sorted(str(k) for k in item if k not in keys)
        if unknown:
            raise self.error(where, f"unknown field(s) {unknown}; known: {list(keys)}")

    def choice(self, value: object, where: str, options: tuple[str, ...] | list[str]) -> str:
        if value not in options:
            raise self.error(where, f"must be one of {list(options)}, got {value!r}")
        return str(value)

    def size(self, value: object, where: str) -> int:
        try:
            return parse_size(value)
        except ValueError as e:
            raise self.error(where, str(e)) from None

    def positive(self, value: object, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise self.error(where, f"must be a positive number, got {value!r}")
        if not math.isfinite(value):
            raise self.error(where, f"must be finite, got {value!r}")
        return float(value)

    def count(self, value: object, where: str) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.error(where, f"must be an integer >= 1, got {value!r}")
        return value


@dataclass(frozen=True, slots=True)
class ModelDescription:
    """A fleet model as a worker loads it, and its sizes (from its checkpoint's config)."""

    spec: ModelSpec
    weight_bytes: int
    kv_bytes_per_token: int


def describe_model(fleet: FleetConfig, index: int, dtype: torch.dtype) -> ModelDescription:
    """The `ModelSpec` of `fleet.models[index]`, reading only its checkpoint's config;
    `FleetConfigError` (naming the file and the model) if it cannot be served."""
    m = fleet.models[index]
    where = f"{fleet.path}: models[{index}] ({m.name})"
    try:
        source = m.resolved_source()
        config = open_checkpoint(source, m.load_format).config  # type: ignore[arg-type]
    except (OSError, ValueError) as e:
        raise FleetConfigError(f"{where}: {e}") from e
    weights = config.weight_bytes(dtype)
    max_kv = None
    if m.max_memory is not None:
        max_kv = m.max_memory - weights
        if max_kv <= 0:
            raise FleetConfigError(
                f"{where}.max_memory: {m.max_memory} bytes do not hold its weights "
                f"({weights} bytes)"
            )
    engine = EngineConfig(m.name)
    if m.max_model_len is not None:
        engine = dataclasses.replace(engine, max_model_len=m.max_model_len)
    if m.max_num_seqs is not None:
        engine = dataclasses.replace(engine, max_num_seqs=m.max_num_seqs)
    spec = ModelSpec(
        m.name, source, m.load_format, dtype=dtype, priority=m.priority, max_kv_bytes=max_kv,
        engine=engine, slo=m.slo, sms=m.sms,
    )  # fmt: skip
    return ModelDescription(spec, weights, config.kv_bytes_per_token(dtype))


def default_dtype(device_id: str) -> torch.dtype:
    return torch.float32 if torch_device(device_id) == "cpu" else torch.bfloat16


def in_process_worker(fleet: FleetConfig, *, preload: bool = False) -> AsyncWorker:
    """A one-device fleet served in this process (no controller): one `AsyncWorker`
    with every model loaded (CACHED), or woken now with `preload` as far as the budget
    allows. Budget default as the controller's: 4 GiB on the CPU, 90% of a GPU's free
    memory."""
    devices = fleet.device_ids()
    if len(devices) != 1:
        raise FleetConfigError(
            f"{fleet.path}: devices: {list(devices)}: in-process serving takes one device"
        )
    device = torch_device(devices[0])
    budget = fleet.budget_bytes
    if budget is None:
        budget = (
            DEFAULT_CPU_BUDGET
            if device == "cpu"
            else int(free_device_memory(device) * GPU_BUDGET_FRACTION)
        )
    worker = DeviceWorker(fleet.worker_config(device, budget))
    try:
        for i in range(len(fleet.models)):
            worker.add_model(describe_model(fleet, i, default_dtype(devices[0])).spec)
        if preload:
            for name in worker.models:
                worker.wake(name)
        return AsyncWorker(worker, max_waiting=fleet.controller.max_waiting)
    except BaseException:
        worker.close()
        raise
