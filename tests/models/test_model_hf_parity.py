"""LlamaModel against transformers on tiny random checkpoints, through the paged cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from models_helpers import TINY_VARIANTS, PagedRunner

from prism.models import load_model

# fp32 on both sides; the only differences are summation order in matmuls and attention.
ATOL_FP32 = 1e-4
PROMPTS = [[5, 17, 200, 3, 9], list(range(20, 31)), [7, 7, 8, 100, 250, 300, 42, 11]]


def hf_logits(hf_model: Any, tokens: list[int]) -> torch.Tensor:
    """Full-sequence logits [len, V] from transformers (batch of one, no padding)."""
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0]


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_prefill_and_decode_match_transformers(
    variant: str,
    tiny_checkpoint: Callable[[str], tuple[Any, Path]],
    paged_runner: type[PagedRunner],
) -> None:
    """Batched prefill of 3 uneven prompts, then 4 batched decode steps, one of which also
    carries a 3-token chunk for sequence 0; every logit within ATOL_FP32 of transformers."""
    hf_model, path = tiny_checkpoint(variant)
    loaded = load_model(path, dtype=torch.float32)
    assert loaded.tokenizer is None
    runner = paged_runner(loaded.model, num_seqs=3, max_len=32, block_size=4)
    seqs = [list(p) for p in PROMPTS]

    prefill = runner.step(seqs)
    for seq, logits in zip(seqs, prefill, strict=True):
        assert logits is not None
        torch.testing.assert_close(logits, hf_logits(hf_model, seq), atol=ATOL_FP32, rtol=0)

    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        new = [torch.randint(0, 320, (1,), generator=gen).tolist() for _ in seqs]
        if step == 2:
            new[0] = [11, 12, 13]  # a chunk mixed into a decode batch
        out = runner.step(new)
        for seq, toks, logits in zip(seqs, new, out, strict=True):
            seq.extend(toks)
            assert logits is not None
            expected = hf_logits(hf_model, seq)[-len(toks) :]
            torch.testing.assert_close(logits, expected, atol=ATOL_FP32, rtol=0)


def test_idle_sequences_keep_their_cache(
    tiny_checkpoint: Callable[[str], tuple[Any, Path]], paged_runner: type[PagedRunner]
) -> None:
    """A sequence left out of some steps resumes exactly where it was."""
    hf_model, path = tiny_checkpoint("qwen3-qk-norm")
    model = load_model(path, dtype=torch.float32).model
    runner = paged_runner(model, num_seqs=2, max_len=24)
    a, b = [3, 4, 5, 6], [9, 8, 7]
    runner.step([a, b])
    runner.step([[10], []])
    runner.step([[11], []])
    out = runner.step([[12], [13]])
    a += [10, 11, 12]
    b += [13]
    for seq, logits in zip((a, b), out, strict=True):
        assert logits is not None
        torch.testing.assert_close(logits, hf_logits(hf_model, seq)[-1:], atol=ATOL_FP32, rtol=0)


def test_bf16_tracks_fp32(
    tiny_checkpoint: Callable[[str], tuple[Any, Path]], paged_runner: type[PagedRunner]
) -> None:
    """The same checkpoint in bf16 stays close to fp32 and picks the same argmax mostly."""
    _, path = tiny_checkpoint("qwen2-bias")
    ref = paged_runner(load_model(path, dtype=torch.float32).model, 3, 16).step(PROMPTS)
    low = paged_runner(load_model(path, dtype=torch.bfloat16).model, 3, 16).step(PROMPTS)
    for r, lo in zip(ref, low, strict=True):
        assert r is not None and lo is not None
        assert lo.dtype == torch.bfloat16
        scale = r.abs().max().item()
        assert (lo.float() - r).abs().max().item() < 0.05 * scale
        assert (lo.float().argmax(-1) == r.argmax(-1)).float().mean() >= 0.75
