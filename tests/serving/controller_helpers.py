"""Helpers for the controller tests: a tiny checkpoint directory, fleet files, a fake
clock, and a request runner that records how every request ended.

A uniquely named module rather than `conftest`, so `import` cannot pick up another
folder's conftest.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prism.engine import SamplingParams
from prism.engine.request import FinishReason
from prism.serving.controller import Controller
from prism.serving.fleet import FleetConfig, parse_fleet

# 2 layers, 2 KV heads of 32, fp32: 1 KiB of KV per token; weights 1.6 MiB. No tokenizer:
# prompts are token ids. Random weights from a fixed seed: every worker that loads the
# model computes the same outputs.
TINY_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
TINY_WEIGHT_BYTES = 1_706_496


def write_tiny(directory: Path) -> Path:
    """An HF-style directory with only config.json: served with `load_format: dummy`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    return directory


def fleet_yaml(
    model_dir: Path,
    names: str = "abcd",
    *,
    devices: str = "[cpu:0, cpu:1]",
    budget: str = "8MiB",
    controller: str = "{tick_s: null, placement_interval_s: 0, min_improvement: 0}",
    extra: dict[str, str] | None = None,
) -> str:
    """A fleet of tiny models named by the letters of `names`; `extra` adds fields to a
    model's flow mapping (e.g. {"a": "pinned: cpu:1"})."""
    lines = [f"devices: {devices}", f"budget: {budget}", f"controller: {controller}", "models:"]
    for name in names:
        more = f", {extra[name]}" if extra and name in extra else ""
        lines.append(
            f"  - {{name: {name}, path: {model_dir}, load_format: dummy, "
            f"max_model_len: 2048, max_num_seqs: 8{more}}}"
        )
    return "\n".join(lines) + "\n"


def tiny_fleet(model_dir: Path, **kwargs: object) -> FleetConfig:
    return parse_fleet(fleet_yaml(model_dir, **kwargs), "test-fleet.yaml")  # type: ignore[arg-type]


class FakeClock:
    """The controller's clock for rates, idleness and placement: moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def prompt(seed: int, length: int = 40) -> list[int]:
    return [(seed * 7919 + i * 31) % 500 + 1 for i in range(length)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@dataclass
class Ended:
    """How one request ended, as its stream showed it."""

    request_id: str
    worker: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    first_output: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def completed(self) -> bool:
        return self.error is None and self.finish_reason is FinishReason.LENGTH


async def run_request(
    controller: Controller, model: str, request_id: str, max_tokens: int = 8, seed: int = 0
) -> Ended:
    """Submit and consume one request; never raises: the outcome is in `Ended`."""
    ended = Ended(request_id)
    try:
        stream = await controller.add_request(model, prompt(seed), greedy(max_tokens), request_id)
        ended.worker = stream.worker_id
        async for output in stream:
            ended.tokens += output.new_token_ids
            ended.first_output.set()
            if output.finished:
                ended.finish_reason = output.finish_reason
    except Exception as e:
        ended.error = e
    ended.first_output.set()
    return ended


def kinds(controller: Controller, kind: str) -> list[tuple[str | None, str | None]]:
    """(model, worker) of the controller's events of one kind, in order."""
    return [(e.model, e.worker) for e in controller.events if e.kind == kind]


async def states(controller: Controller) -> dict[str, dict[str, str]]:
    """Worker id → model → state, freshly read."""
    snapshots = await controller.stats()
    return {w: {m.name: m.state for m in s.worker.models} for w, s in snapshots.items()}


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch ops on one thread while in the block. Each in-process worker runs its ops on
    its own thread with a team of torch's threads: two workers on a small shared machine
    oversubscribe its cores, and a test that takes 5 s took over a minute under load.
    (Worker processes get their share of the cores from the controller.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
