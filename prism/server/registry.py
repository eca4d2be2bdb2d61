"""`ModelRegistry`: the models the server answers for, by name.

This is the seam where the multi-model controller plugs in later: routes only ever
`get(name)` a `ServedModel` and iterate `models()`; whether the engine behind it was
loaded at startup (as now) or is woken on demand by a controller is the registry's
business.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from prism.engine.async_engine import AsyncEngine
from prism.engine.engine import Engine, EngineConfig
from prism.models.tokenizer import Tokenizer


class ModelState(Enum):
    ACTIVE = "active"  # loaded, its engine thread serving
    STOPPED = "stopped"  # its engine is shut down


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    source: str  # HF directory or GGUF file


@dataclass(frozen=True, slots=True)
class ServedModel:
    name: str
    source: str
    engine: AsyncEngine
    tokenizer: Tokenizer
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def state(self) -> ModelState:
        return ModelState.ACTIVE if self.engine.is_running else ModelState.STOPPED

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}

    @classmethod
    def load(
        cls,
        specs: list[ModelSpec],
        *,
        device: str = "cpu",
        config: EngineConfig | None = None,
        max_waiting: int = 256,
    ) -> ModelRegistry:
        """Load every model (each with its own engine thread and KV pool)."""
        registry = cls()
        base = config or EngineConfig()
        try:
            for spec in specs:
                engine_config = dataclasses.replace(base, name=spec.name)
                engine = Engine.create(spec.source, device=device, config=engine_config)
                registry.add(spec.name, AsyncEngine(engine, max_waiting=max_waiting), spec.source)
        except BaseException:
            registry.close()
            raise
        return registry

    def add(self, name: str, engine: AsyncEngine, source: str = "") -> ServedModel:
        if name in self._models:
            raise ValueError(f"model {name!r} is already registered")
        tokenizer = engine.engine.tokenizer
        if tokenizer is None:
            engine.close()
            raise ValueError(f"model {name!r} has no tokenizer; the server needs one")
        model = ServedModel(name, source, engine, tokenizer)
        self._models[name] = model
        return model

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.models())

    def __len__(self) -> int:
        return len(self._models)

    def close(self) -> None:
        for model in self._models.values():
            model.engine.close()


def default_name(source: str | Path) -> str:
    """A model name from its path: the directory name, or the file name up to the first
    dot (`SmolLM2-135M-Instruct.Q4_1.gguf` → `SmolLM2-135M-Instruct`)."""
    path = Path(source)
    return path.name.split(".")[0] if path.suffix == ".gguf" else path.name
