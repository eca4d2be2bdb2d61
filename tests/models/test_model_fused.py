"""Fused projections: q/k/v and gate/up laid out back to back run as one GEMM each, and
give what the three (and two) separate GEMMs give."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from models_helpers import TINY_VARIANTS, PagedRunner

from prism.models import load_model
from prism.models.llama import LlamaModel, back_to_back

PROMPTS = [[5, 17, 200, 3, 9], list(range(20, 31))]


def test_back_to_back_needs_adjacent_parts_of_one_storage() -> None:
    flat = torch.arange(24.0)
    a, b, c = flat[:8].view(2, 4), flat[8:16].view(2, 4), flat[16:24].view(2, 4)
    fused = back_to_back([a, b, c])
    assert fused is not None and fused.shape == (6, 4)
    assert torch.equal(fused, torch.cat([a, b, c]))
    fused[3, 0] = -1.0  # a view, not a copy
    assert b[1, 0] == -1.0
    assert back_to_back([a, c]) is None  # a gap
    assert back_to_back([b, a]) is None  # out of order
    assert back_to_back([a, torch.zeros(2, 4)]) is None  # another storage
    assert back_to_back([flat[:8].view(4, 2), flat[8:16].view(2, 4)]) is None  # row shapes


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_fused_and_separate_projections_agree(
    variant: str,
    tiny_checkpoint: Callable[[str], tuple[Any, Path]],
    paged_runner: type[PagedRunner],
) -> None:
    """A loaded model fuses (its weights are one buffer); the same weights as separate
    tensors do not; both give the same logits (fp32, summation order aside)."""
    _, path = tiny_checkpoint(variant)
    fused = load_model(path, dtype=torch.float32).model
    layer = fused._layers[0]
    assert layer.qkv is not None and layer.gate_up is not None
    assert (layer.qkv_bias is not None) == (layer.q_bias is not None)
    separate = LlamaModel(fused.config)
    separate.bind_weights({name: t.clone() for name, t in fused.weights.items()})
    assert separate._layers[0].qkv is None and separate._layers[0].gate_up is None
    logits = [paged_runner(m, num_seqs=2, max_len=16).step(PROMPTS) for m in (fused, separate)]
    for got, want in zip(*logits, strict=True):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
