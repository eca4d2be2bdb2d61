"""TorchAttention and AttentionMetadata against a naive dense causal attention."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prism.models import AttentionMetadata, TorchAttention, write_kv_cache

HQ, HKV, D = 8, 2, 16


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [L, Hq, D] at the last L of S positions; k, v: [S, Hkv, D]. Loops, fp64."""
    q_len, seq_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(q_len):
        pos = seq_len - q_len + i
        for h in range(q.shape[1]):
            keys = k[: pos + 1, h // group].double()  # [pos+1, D]
            scores = keys @ q[i, h].double() / math.sqrt(q.shape[2])
            out[i, h] = torch.softmax(scores, 0) @ v[: pos + 1, h // group].double()
    return out


def run_case(
    ctx_and_q: list[tuple[int, int]], block_size: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Sequences with `ctx` cached tokens and `q` new ones; returns out, expected, caches, meta."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [math.ceil((c + q) / block_size) for c, q in ctx_and_q]
    num_blocks = sum(blocks_needed) + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, start = [], 0
    for n in blocks_needed:
        tables.append(perm[start : start + n])
        start += n
    k_cache = torch.zeros(num_blocks, block_size, HKV, D, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    qs, ks, vs, expected = [], [], [], []
    for (ctx, q_len), table in zip(ctx_and_q, tables, strict=True):
        seq_len = ctx + q_len
        q = torch.randn(q_len, HQ, D, generator=gen).to(dtype)
        k = torch.randn(seq_len, HKV, D, generator=gen).to(dtype)
        v = torch.randn(seq_len, HKV, D, generator=gen).to(dtype)
        for pos in range(ctx):  # what earlier steps would have written
            k_cache[table[pos // block_size], pos % block_size] = k[pos]
            v_cache[table[pos // block_size], pos % block_size] = v[pos]
        qs.append(q)
        ks.append(k[ctx:])
        vs.append(v[ctx:])
        expected.append(naive_attention(q, k, v))
    meta = AttentionMetadata.build(
        [q for _, q in ctx_and_q], [c + q for c, q in ctx_and_q], tables, block_size
    )
    out = TorchAttention().forward(
        torch.cat(qs), torch.cat(ks), torch.cat(vs), k_cache, v_cache, meta, 1 / math.sqrt(D)
    )
    return out, torch.cat(expected), k_cache, torch.cat(ks), meta


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_naive_attention(dtype: torch.dtype, atol: float) -> None:
    """Prefill, decode and chunked-prefill sequences in one batch, GQA 8:2, block size 4."""
    out, expected, k_cache, k_new, meta = run_case(
        [(0, 7), (9, 1), (5, 6), (0, 1), (12, 3)], 4, dtype, seed=0
    )
    assert out.dtype == dtype and out.shape == (18, HQ, D)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=0)
    # Every new key landed in its slot.
    torch.testing.assert_close(k_cache.view(-1, HKV, D)[meta.slot_mapping], k_new)


@settings(max_examples=25, deadline=None)
@given(
    seqs=st.lists(st.tuples(st.integers(0, 20), st.integers(1, 6)), min_size=1, max_size=4),
    block_size=st.sampled_from([1, 2, 4, 16]),
    seed=st.integers(0, 2**16),
)
def test_matches_naive_attention_property(
    seqs: list[tuple[int, int]], block_size: int, seed: int
) -> None:
    """Any mix of context and query lengths, any block size, shuffled block tables."""
    out, expected, _, _, _ = run_case(seqs, block_size, torch.float32, seed)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_metadata_build() -> None:
    """Slots follow the block tables; tables are padded with 0; lengths are int32."""
    meta = AttentionMetadata.build([3, 1], [3, 6], [[7], [2, 5]], block_size=4)
    assert meta.slot_mapping.tolist() == [28, 29, 30, 21]  # 7*4+0..2, then 5*4+1 (pos 5)
    assert meta.query_start_loc.tolist() == [0, 3, 4]
    assert meta.seq_lens.tolist() == [3, 6]
    assert meta.block_tables.tolist() == [[7, 0], [2, 5]]
    assert meta.query_start_loc.dtype == meta.seq_lens.dtype == meta.block_tables.dtype
    assert meta.block_tables.dtype == torch.int32 and meta.slot_mapping.dtype == torch.int64
    assert (meta.num_seqs, meta.num_tokens, meta.max_query_len, meta.max_seq_len) == (2, 4, 3, 6)


def test_metadata_rejects_context_beyond_blocks() -> None:
    with pytest.raises(ValueError, match="blocks"):
        AttentionMetadata.build([1], [5], [[0]], block_size=4)


def test_negative_slots_are_not_written() -> None:
    """Padding tokens (slot -1) leave the cache untouched."""
    k_cache = torch.zeros(2, 2, 1, 1)
    v_cache = torch.zeros(2, 2, 1, 1)
    k = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    write_kv_cache(k, -k, k_cache, v_cache, torch.tensor([3, -1, 0]))
    assert k_cache.flatten().tolist() == [3.0, 0.0, 0.0, 1.0]
    assert v_cache.flatten().tolist() == [-3.0, 0.0, 0.0, -1.0]
