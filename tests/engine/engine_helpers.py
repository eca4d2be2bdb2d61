"""Helpers for prism.engine tests: a tiny checkpoint directory, a fake block pool, and a
bounded drive loop.

A uniquely named module rather than `conftest`, so `import` cannot pick up another
folder's conftest.py.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import torch
from safetensors.torch import save_file

from prism.engine import Engine, EngineConfig, FinishReason, RequestOutput, SamplingParams
from prism.engine.request import Request
from prism.models import ModelConfig, Tokenizer, default_model_path

# A 2-layer Llama with SmolLM2's vocabulary and tokenizer, so text paths (stop strings,
# streaming) run on a model that steps in milliseconds.
TINY_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# Weights this large make greedy output depend on context (std 0.02 repeats one token).
TINY_WEIGHT_STD = 0.5
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
_fake_ids = itertools.count()


def write_tiny_checkpoint(out: Path, seed: int = 0) -> Path:
    """config.json + model.safetensors (random weights) + SmolLM2's tokenizer.json."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    config = ModelConfig.from_hf_dict(TINY_HF_CONFIG)
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in config.weight_shapes().items():
        w = torch.randn(shape, generator=gen) * TINY_WEIGHT_STD
        weights[name] = 1.0 + 0.1 * w if name.endswith("norm.weight") else w
    save_file(weights, str(out / "model.safetensors"))
    tokenizer = Tokenizer.from_gguf(gguf.GGUFReader(default_model_path()))
    tokenizer.backend.save(str(out / "tokenizer.json"))
    special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    (out / "tokenizer_config.json").write_text(json.dumps(special))
    return out


def tiny_engine(checkpoint: Path, **overrides: object) -> Engine:
    """An fp32 CPU engine on the tiny checkpoint with a small private KV pool."""
    settings: dict[str, object] = {"kv_cache_bytes": 4 << 20, "max_model_len": 512}
    settings.update(overrides)
    return Engine.create(str(checkpoint), config=EngineConfig(**settings))  # type: ignore[arg-type]


@dataclass
class Finished:
    """One request's whole run as seen through its RequestOutputs."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0
    outputs: list[RequestOutput] = field(default_factory=list)


def record(runs: dict[str, Finished], outputs: list[RequestOutput]) -> None:
    """Fold one step's outputs into `runs`, by request id."""
    for out in outputs:
        run = runs.setdefault(out.request_id, Finished())
        run.outputs.append(out)
        run.token_ids += out.new_token_ids
        run.text += out.text_delta
        if out.finished:
            run.finish_reason = out.finish_reason
            run.num_cached_tokens = out.num_cached_tokens


def drain(
    engine: Engine, runs: dict[str, Finished] | None = None, max_steps: int = 2000
) -> dict[str, Finished]:
    """Step until nothing is unfinished, adding to `runs`; fails instead of hanging."""
    runs = {} if runs is None else runs
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return runs
        record(runs, engine.step())
    raise AssertionError(f"engine still has unfinished requests after {max_steps} steps")


def generate(
    engine: Engine,
    prompts: Sequence[str | list[int]],
    params: SamplingParams | Sequence[SamplingParams] = GREEDY,
) -> list[Finished]:
    """Add every prompt at once, run to completion; results in prompt order."""
    per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else params
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, per_prompt, strict=True)]
    runs = drain(engine)
    return [runs[i] for i in ids]


def used_blocks(engine: Engine) -> int:
    """KV blocks handed out (the padding block included) in mapped groups."""
    cache = engine.kv_cache
    return cache.mapped_groups * cache.blocks_per_group - cache.free_blocks


def fake_request(
    token_ids: Sequence[int], params: SamplingParams, prompt_len: int | None = None
) -> Request:
    """A Request whose first `prompt_len` tokens are the prompt and the rest its output."""
    split = len(token_ids) if prompt_len is None else prompt_len
    req = Request(f"fake-{next(_fake_ids)}", list(token_ids[:split]), params)
    req.token_ids = list(token_ids)
    return req


class FakeBlockSource:
    """A fixed pool of `num_blocks` block ids (block 0 never handed out, like the real
    cache's padding block), checking every free against what it handed out."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))
        self.allocated: set[int] = set()

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def growth_blocks(self) -> int:
        return 0  # a fixed pool: it never grows

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        if count > len(self._free):
            return None
        blocks = [self._free.pop() for _ in range(count)]
        self.allocated.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            assert block in self.allocated, f"block {block} freed but not allocated"
            self.allocated.remove(block)
            self._free.append(block)
