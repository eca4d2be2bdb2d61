"""`ModelSlot`: one model on a device worker — its host copy, device weights, engine.

States: REGISTERED (known, weights only on disk) → CACHED (weights in host memory,
nothing on the device) → ACTIVE (weights mapped in the device's page pool, engine
serving) ⇄ ASLEEP (every device page given back; address ranges, the engine and its
CUDA graphs kept). Waking maps pages and copies the weights from the host copy: no
re-initialisation, no graph capture. A model that is not active may drop its host copy
(back to REGISTERED, the worker does so under its host-memory budget); its next wake
reads the checkpoint again first.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
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
from prism.serving.policies.slo import SLO

log = logging.getLogger("prism.serving")


class ModelState(Enum):
    REGISTERED = "registered"
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
    slo: SLO | None = None  # orders admission across the device's models (`DeviceWorker`)
    # SMs this model's kernels may use: a fixed share of the GPU's compute, no matter how
    # busy the others are (`SmPartitions`; CUDA only). None: all of them, shared.
    sms: int | None = None


class ModelSlot:
    def __init__(self, spec: ModelSpec, device: str, pool: PagePool) -> None:
        self.spec = spec
        self.device = device
        self.pool = pool
        self.dtype = spec.dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
        self.checkpoint = open_checkpoint(spec.source, spec.load_format)  # type: ignore[arg-type]
        self.config: ModelConfig = self.checkpoint.config
        self.tokenizer = self.checkpoint.load_tokenizer()
        self.host_flat: torch.Tensor | None = None
        self.host: dict[str, torch.Tensor] = {}
        self.state = ModelState.REGISTERED
        self.load_host()  # -> CACHED
        self.arena: WeightArena | None = None
        self.engine: Engine | None = None
        self.wakes = 0
        self.sleeps = 0
        self.last_used = time.monotonic()
        self.last_wake_s = 0.0
        self.busy_s = 0.0  # wall time of its engine steps (the worker adds to it)
        self.output_tokens = 0  # tokens those steps produced
        self.steps = 0  # engine steps scheduled (the worker counts them)
        self.prefill_tokens = 0  # prompt tokens they computed, recomputation included
        # Its own CUDA stream: co-located models' steps are queued before any is waited for.
        # A worker gives a model with an SM share a stream of that share instead, before
        # the first wake (the engine's CUDA graphs are captured on this stream).
        cuda = self.device.startswith("cuda")
        self.stream: torch.cuda.Stream | None = (
            torch.cuda.Stream(device=self.device) if cuda else None
        )

    def load_host(self) -> None:
        """Read the checkpoint into the host copy: one flat buffer laid out as the weight
        arena is, pinned on CUDA so that a wake copies it at PCIe speed in large runs."""
        if self.host_flat is not None:
            return
        start = time.perf_counter()
        specs = weight_specs(self.config, self.dtype)
        pinned = self.device.startswith("cuda")
        flat = torch.empty(layout(specs)[1], dtype=torch.uint8, pin_memory=pinned)
        host = views_over(flat, specs)
        source = self.checkpoint.path or self.spec.source
        if self.checkpoint.format == "dummy" and pinned:
            # Random weights are made on the GPU (fast) and copied down, a tensor at a time.
            for i, (name, view) in enumerate(host.items()):
                scratch = torch.empty_like(view, device=self.device)
                init_dummy_weights({name: scratch}, seed=i)
                view.copy_(scratch)
        else:
            log.info("%s: loading %.2f GiB of weights from %s", self.spec.name,
                     flat.numel() / 2**30, source)  # fmt: skip
            self.checkpoint.fill(host, progress=_Progress(self.spec.name, len(specs)))
        self.host_flat, self.host = flat, host
        if self.state is ModelState.REGISTERED:
            self.state = ModelState.CACHED
        seconds = time.perf_counter() - start
        log.info("%s: host copy ready (%.2f GiB, %.1f s)", self.spec.name,
                 flat.numel() / 2**30, seconds)  # fmt: skip

    def drop_host(self) -> int:
        """Free the host copy of a model that is not active; returns bytes freed."""
        if self.state is ModelState.ACTIVE or self.host_flat is None:
            return 0
        freed = self.host_bytes
        self.host_flat, self.host = None, {}
        if self.state is ModelState.CACHED:
            self.state = ModelState.REGISTERED
        log.info("%s: host copy dropped (%.2f GiB)", self.spec.name, freed / 2**30)
        return freed

    @property
    def host_bytes(self) -> int:
        return 0 if self.host_flat is None else self.host_flat.numel()

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

    def stream_context(self) -> contextlib.AbstractContextManager[object]:
        """Run on the model's stream, after what the device's default stream has queued
        (a wake's weight copies); a no-op on the CPU."""
        if self.stream is None:
            return contextlib.nullcontext()
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        return torch.cuda.stream(self.stream)

    def wake(self) -> bool:
        """Map weights and the KV padding group, copy the weights in; False if the pool
        cannot give the memory (nothing is left half-done)."""
        if self.state is ModelState.ACTIVE:
            return True
        start = time.perf_counter()
        self.load_host()  # from disk, if the host copy was dropped
        assert self.host_flat is not None
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
                with self.stream_context():  # graphs captured on the model's stream
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
        # Its KV can never have more than the budget less its own weights (resident
        # whenever it runs): what lies beyond is no limit but a request that never fits.
        beside = (self.pool.budget_pages - self.arena.num_pages) * self.pool.page_size
        budget = min(self.spec.max_kv_bytes or beside, beside)
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
        if cfg.max_model_len > kv.max_tokens_held:
            log.warning(
                "%s: max_model_len %d lowered to %d, what its KV memory can hold beside its "
                "weights (%.1f MiB of %.1f MiB); longer prompts are refused, and outputs stop "
                "there with finish reason 'length'", self.spec.name, cfg.max_model_len,
                kv.max_tokens_held, budget / 2**20,
                self.pool.budget_pages * self.pool.page_size / 2**20,
            )  # fmt: skip
            cfg = replace(cfg, max_model_len=kv.max_tokens_held)
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


class _Progress:
    """Logs a model's load at every quarter (server logs show where a slow load is)."""

    def __init__(self, name: str, tensors: int) -> None:
        self.name, self.tensors, self.done, self.reported = name, max(1, tensors), 0, 0

    def __call__(self, nbytes: int) -> None:
        self.done += 1
        quarter = min(4, 4 * self.done // self.tensors)
        if quarter > self.reported:
            self.reported = quarter
            log.info("%s: loading weights %d%%", self.name, 25 * quarter)
