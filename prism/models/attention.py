"""The contract between the model and an attention backend over a paged KV cache.

A step runs T tokens from B sequences flattened into one batch. Each layer's KV cache is a
pair (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim]; token
position p of a sequence lives in block `block_tables[seq][p // block_size]` at offset
`p % block_size`, i.e. at flat slot `block_id * block_size + offset`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache), each [N, bs, Hkv, D]
QUERY_TILE = 64  # query tokens of one sequence per tile of `AttentionMetadata.query_tiles`


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where this step's tokens sit in their sequences and in the cache."""

    # [T] int64: flat cache slot where each token's new K/V is written; < 0 means "skip".
    slot_mapping: torch.Tensor
    # [B + 1] int32: query tokens of sequence i are q[query_start_loc[i]:query_start_loc[i+1]].
    query_start_loc: torch.Tensor
    # [B] int32: context length of each sequence INCLUDING this step's tokens.
    seq_lens: torch.Tensor
    # [B, max_blocks] int32: block ids of each sequence, padded with 0.
    block_tables: torch.Tensor
    # Tokens per cache block.
    block_size: int
    # Host copies of the lengths, so CPU code can loop without device syncs.
    query_lens_cpu: tuple[int, ...]
    seq_lens_cpu: tuple[int, ...]
    # [n, 2] int32: (sequence, first query) of every QUERY_TILE-query tile of a step with
    # a prefill chunk, for backends that tile queries (None for decode-only steps).
    # Entries may point at a sequence with no queries (a captured graph's padding).
    query_tiles: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata for sequences whose last `query_lens[i]` tokens are computed this step."""
        slots = np.empty(sum(query_lens), dtype=np.int64)
        n = 0  # tokens so far
        width = max((len(b) for b in block_tables), default=0)
        table = np.zeros((len(block_tables), width), dtype=np.int32)
        for i, (q_len, s_len, blocks) in enumerate(
            zip(query_lens, seq_lens, block_tables, strict=True)
        ):
            if not 0 < q_len <= s_len <= len(blocks) * block_size:
                raise ValueError(
                    f"need 0 < query_len ({q_len}) <= seq_len ({s_len}) "
                    f"<= blocks * block_size ({len(blocks)} * {block_size})"
                )
            table[i, : len(blocks)] = blocks
            fill_slots(slots, n, blocks, table[i], s_len - q_len, s_len, block_size)
            n += q_len
        starts = [0]
        for q_len in query_lens:
            starts.append(starts[-1] + q_len)
        tiles = None
        if max(query_lens, default=0) > 1:
            tiles = torch.tensor(query_tiles(query_lens), dtype=torch.int32, device=device)
        return cls(
            slot_mapping=torch.from_numpy(slots).to(device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
            block_tables=torch.from_numpy(table).to(device),
            block_size=block_size,
            query_lens_cpu=tuple(query_lens),
            seq_lens_cpu=tuple(seq_lens),
            query_tiles=tiles,
        )


def fill_slots(
    out: np.ndarray, at: int, blocks: Sequence[int], table_row: np.ndarray,
    start: int, end: int, block_size: int,
) -> None:  # fmt: skip
    """out[at : at + end - start] = the cache slots of positions start..end-1 of a
    sequence whose blocks are `blocks` (also laid out in `table_row`, an int32 row)."""
    if end - start == 1:  # a decode: one slot, cheaper in plain Python
        out[at] = blocks[start // block_size] * block_size + start % block_size
    else:
        p = np.arange(start, end)
        chunk_blocks = table_row[p // block_size].astype(np.int64)
        out[at : at + end - start] = chunk_blocks * block_size + p % block_size


def query_tiles(query_lens: Sequence[int]) -> list[tuple[int, int]]:
    """(sequence, first query) of every QUERY_TILE-query tile of the sequences' queries."""
    return [(i, t) for i, n in enumerate(query_lens) for t in range(0, n, QUERY_TILE)]


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter k, v [T, Hkv, D] into the caches at slot_mapping [T]; negative slots are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


class AttentionBackend(ABC):
    """Writes a step's K/V into the paged cache, then attends causally over each context."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D].

        Query i of a sequence with q_len queries and context seq_len sits at position
        seq_len - q_len + i and attends to that sequence's keys at positions <= it. Query
        head h reads KV head h // (Hq // Hkv).
        """
