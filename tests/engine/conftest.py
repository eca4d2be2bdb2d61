"""Fixtures for prism.engine tests; the helpers themselves live in engine_helpers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_helpers import write_tiny_checkpoint


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Engine tests run on one intra-op thread: their steps are tiny, and on a shared
    2-core machine torch's thread hand-offs made them 30x slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama directory with SmolLM2's tokenizer (see engine_helpers)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))
