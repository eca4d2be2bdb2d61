"""Fixtures for prism.models tests; the helpers themselves live in models_helpers.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from models_helpers import PagedRunner, build_tiny_hf_model


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Callable[[str], tuple[Any, Path]]:
    """variant -> (transformers model, directory it was saved to as safetensors)."""

    def make(variant: str) -> tuple[Any, Path]:
        model = build_tiny_hf_model(variant)
        out = tmp_path / variant
        model.save_pretrained(out)
        return model, out

    return make


@pytest.fixture
def paged_runner() -> type[PagedRunner]:
    return PagedRunner
