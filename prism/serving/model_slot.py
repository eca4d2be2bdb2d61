"""`ModelSlot`: one model on a device worker — its host copy, device weights, engine.

States: CACHED (weights in host memory, nothing on the device) → ACTIVE (weights mapped
in the device's page pool, engine serving) ⇄ ASLEEP (every device page given back;
address ranges, the engine and its CUDA graphs kept). Waking maps pages and copies the
weights from the host copy: no re-initialisation, no graph capture.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from prism.engine.engine import Engine, EngineConfig
from prism.kvcache import ElasticKVCache, KVCacheConfig
from prism.memory import PagePool, WeightArena
from prism.memory.weight_arena import layout, views_over
from prism.models.checkpoint import open_checkpoint
from prism.models.config import ModelConfig
from prism.models.llama import LlamaModel
from prism.models.weights import init_dummy_weights, weight_specs


class ModelState(Enum):
    CACHED = "cached"
    ACTIVE = "active"
    ASLEEP = "asleep"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    source: str | ModelConfig  # HF directory, GGUF file, preset name or config
    load_format: str = "auto"
    dtype: torch.dtype | None = None  # default: fp32 on CPU, bf16 on CUDA
    priority: int = 0  # higher keeps its memory longer under pressure
    max_kv_bytes: int | None = None  # limit on this model's KV cache; None: the device budget
    engine: EngineConfig = field(default_factory=EngineConfig)


class ModelSlot:
    def __init__(self, spec: ModelSpec, device: str, pool: PagePool) -> None:
        self.spec = spec
        self.device = device
        self.pool = pool
        self.dtype = spec.dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
        checkpoint = open_checkpoint(spec.source, spec.load_format)  # type: ignore[arg-type]
        self.config: ModelConfig = checkpoint.config
        self.tokenizer = checkpoint.load_tokenizer()
        # The host copy that every wake copies from: one flat buffer laid out as the weight
        # arena is, pinned on CUDA so that it is copied at PCIe speed in large runs.
        specs = weight_specs(self.config, self.dtype)
        pinned = device.startswith("cuda")
        self.host_flat = torch.empty(layout(specs)[1], dtype=torch.uint8, pin_memory=pinned)
        self.host = views_over(self.host_flat, specs)
        if checkpoint.format == "dummy" and pinned:
            # Random weights are made on the GPU (fast) and copied down, a tensor at a time.
            for i, (name, host) in enumerate(self.host.items()):
                scratch = torch.empty_like(host, device=device)
                init_dummy_weights({name: scratch}, seed=i)
                host.copy_(scratch)
        else:
            checkpoint.fill(self.host)
        self.state = ModelState.CACHED
        self.arena: WeightArena | None = None
        self.engine: Engine | None = None
        self.wakes = 0
        self.sleeps = 0
        self.last_used = time.monotonic()
        self.last_wake_s = 0.0

    @property
    def weight_bytes(self) -> int:
        return self.config.weight_bytes(self.dtype)

    @property
    def idle(self) -> bool:
        """No request at all, running or queued."""
        return self.engine is None or not self.engine.has_unfinished()

    @property
    def holds_kv(self) -> bool:
        """Requests are running (and hold KV blocks); queued ones hold none."""
        return self.engine is not None and bool(self.engine.scheduler.running)

    def wake(self) -> bool:
        """Map weights and the KV padding group, copy the weights in; False if the pool
        cannot give the memory (nothing is left half-done)."""
        if self.state is ModelState.ACTIVE:
            return True
        start = time.perf_counter()
        if self.arena is None:
            self.arena = WeightArena(
                f"{self.spec.name}/weights",
                weight_specs(self.config, self.dtype),
                self.pool,
                priority=self.spec.priority,
            )
        if self.engine is not None and not self.engine.kv_cache.wake():
            return False

        # The copy of each run of pages overlaps the mapping of the next.
        if not self.arena.materialize(source=self.host_flat):
            if self.engine is not None:
                self.engine.kv_cache.sleep()
            return False
        if self.device.startswith("cuda"):
            torch.cuda.current_stream().synchronize()
        if self.engine is None:
            try:
                self.engine = self._build_engine()
            except MemoryError:  # no page for the KV cache's first group: try again later
                self.arena.evict()
                return False
        self.state = ModelState.ACTIVE
        self.wakes += 1
        self.last_used = time.monotonic()
        self.last_wake_s = time.perf_counter() - start
        return True

    def _build_engine(self) -> Engine:
        assert self.arena is not None
        model = LlamaModel(self.config, _attention_for(self.device))
        model.bind_weights(self.arena.views)
        cfg = self.spec.engine
        budget = self.spec.max_kv_bytes or self.pool.budget_pages * self.pool.page_size
        per_token = self.config.kv_bytes_per_token(self.dtype)
        kv = ElasticKVCache(
            KVCacheConfig(
                name=f"{self.spec.name}/kv",
                num_layers=self.config.num_layers,
                num_kv_heads=self.config.num_kv_heads,
                head_dim=self.config.head_dim,
                block_size=cfg.block_size,
                dtype=self.dtype,
                max_tokens=budget // per_token,
                priority=self.spec.priority,
                max_pages=budget // self.pool.page_size,
            ),
            self.pool,
        )
        return Engine(model, self.tokenizer, kv, cfg)

    def sleep(self) -> int:
        """Give back every device page; no request may be running (queued ones stay queued
        in the engine until the next wake). Returns pages released."""
        if self.state is not ModelState.ACTIVE:
            return 0
        if self.holds_kv:
            raise RuntimeError(f"model {self.spec.name!r} has requests running")
        assert self.engine is not None and self.arena is not None
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()  # no kernel may still read what is unmapped
        self.engine.kv.reset_prefix_cache()
        released = self.engine.kv_cache.sleep() + self.arena.evict()
        self.state = ModelState.ASLEEP
        self.sleeps += 1
        return released

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.arena is not None:
            self.arena.close()


def _attention_for(device: str):  # type: ignore[no-untyped-def]
    if device.startswith("cuda"):
        from prism.models.triton_attention import TritonAttention

        return TritonAttention()
    return None
