"""`ModelRunner`: a scheduled batch → model inputs → the logits that get sampled.

Tokens of all scheduled requests are flattened into one batch of T tokens with their
positions and cache slots; only the last token of a request whose prompt is complete
this step yields logits (a chunk in the middle of a prompt yields none).

On CUDA, pure-decode steps replay a CUDA graph captured for the next batch size up:
inputs are copied into static buffers with one host→device copy each, padded rows
write to and read from the reserved padding block 0. Steps with prefill chunks can
replay a graph too (`cuda_graph_tokens`), captured for the next token count up: the
Triton prefill kernel takes everything from tensors (sequences' query starts, lengths,
block tables and a tile map, padded with an empty sequence that the spare tiles point
at), so the whole forward, attention included, is one replay instead of every layer's
kernels launched from Python (~0.7 ms a layer on the H200 host, measured).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch

from prism.engine.request import Request
from prism.engine.scheduler import ScheduledBatch
from prism.models.attention import (
    QUERY_TILE,
    AttentionMetadata,
    KVCache,
    fill_slots,
    query_tiles,
)
from prism.models.llama import LlamaModel


class ModelRunner:
    def __init__(
        self, model: LlamaModel, kv_caches: list[KVCache], block_size: int, max_model_len: int
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.device = model.device
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._static: _DecodeBuffers | None = None
        self._mixed_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._mixed: _MixedBuffers | None = None

    # ---- eager ---------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Run one step; returns (logits [S, V], indices into batch.requests of the S
        requests that sample a token this step)."""
        if self._graphs and self._is_decode(batch) and len(batch) <= max(self._graphs):
            return self._replay(batch.requests), list(range(len(batch)))
        if self._mixed is not None and self._mixed.fits(batch):
            return self._replay_mixed(batch)
        return self._eager(batch)

    @torch.inference_mode()
    def execute_ahead(self, requests: Sequence[Request], next_ids: torch.Tensor) -> torch.Tensor:
        """A decode step for `requests` whose newest tokens are still on the device, being
        sampled by the step before: `next_ids` [n], in row order. Each request computes
        position `num_computed_tokens` (its KV slot must be allocated). Returns logits
        [n, V]; every row samples."""
        n = len(requests)
        if self._graphs and n <= max(self._graphs):
            return self._replay(requests, next_ids)
        positions = [req.num_computed_tokens for req in requests]
        meta = AttentionMetadata.build(
            [1] * n, [p + 1 for p in positions], [req.block_ids for req in requests],
            self.block_size, self.device,
        )  # fmt: skip
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model.forward(next_ids, pos, self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    def _eager(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sampling: list[int] = []
        last_token: list[int] = []
        for i, (req, count) in enumerate(zip(batch.requests, batch.num_tokens, strict=True)):
            start = req.num_computed_tokens
            end = start + count
            input_ids += req.token_ids[start:end]
            positions += range(start, end)
            query_lens.append(count)
            seq_lens.append(end)
            tables.append(req.block_ids)
            if end == req.num_tokens:
                sampling.append(i)
                last_token.append(len(input_ids) - 1)
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model.forward(ids, pos, self.kv_caches, meta)
        if not sampling:
            return hidden.new_empty((0, 0)), []
        rows = torch.tensor(last_token, device=self.device)
        return self.model.compute_logits(hidden[rows]), sampling

    @staticmethod
    def _is_decode(batch: ScheduledBatch) -> bool:
        return all(
            count == 1 and req.num_computed_tokens == req.num_tokens - 1
            for req, count in zip(batch.requests, batch.num_tokens, strict=True)
        )

    # ---- CUDA graphs -----------------------------------------------------------------------

    @torch.inference_mode()
    def capture(
        self, batch_sizes: Sequence[int], token_sizes: Sequence[int] = (), max_seqs: int = 0
    ) -> None:
        """Capture one decode graph per batch size and one graph per token count for
        steps with prefill chunks of at most `max_seqs` sequences (largest first, all
        sharing one memory pool)."""
        if self.device.type != "cuda" or not (batch_sizes or token_sizes):
            return
        pool = torch.cuda.graph_pool_handle()
        # On the caller's stream if it is a side stream (a graph's kernels keep the SMs of
        # the stream they were captured on: a model held to an SM share captures on its
        # share's stream), else on a new one (capture cannot use the default stream).
        current = torch.cuda.current_stream()
        default = torch.cuda.default_stream(current.device)
        stream = current if current != default else torch.cuda.Stream()

        def graph(run: Callable[[], object]) -> torch.cuda.CUDAGraph:
            for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks kernels
                run()
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured, pool=pool, stream=stream):
                run()
            return captured

        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            if batch_sizes:
                sizes = sorted(set(batch_sizes), reverse=True)
                buf = _DecodeBuffers(sizes[0], self.max_blocks, self.block_size, self.device)
                self._static = buf
                for size in sizes:
                    self._graphs[size] = graph(partial(self._decode_into, buf, size))
            if token_sizes:
                sizes = sorted(set(token_sizes), reverse=True)
                mixed = _MixedBuffers(
                    sizes[0], max_seqs, self.max_blocks, self.block_size, self.device
                )
                self._mixed = mixed
                for tokens in sizes:
                    self._mixed_graphs[tokens] = graph(partial(self._mixed_forward, tokens))
                    mixed.graph_tokens.append(tokens)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def _decode_into(self, buf: _DecodeBuffers, size: int) -> None:
        buf.logits[size] = self._decode(buf, size, buf.meta(size))

    def _decode(self, buf: _DecodeBuffers, size: int, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.model.forward(buf.ids[:size], buf.pos[:size], self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    def _mixed_forward(self, tokens: int) -> None:
        buf = self._mixed
        assert buf is not None
        meta = buf.meta(tokens)
        hidden = self.model.forward(buf.ids[:tokens], buf.pos[:tokens], self.kv_caches, meta)
        buf.logits[tokens] = self.model.compute_logits(hidden[buf.rows[: buf.num_rows(tokens)]])

    def _replay_mixed(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        buf = self._mixed
        assert buf is not None
        tokens = buf.graph_size(sum(batch.num_tokens))
        sampling = buf.stage(batch, tokens)
        self._mixed_graphs[tokens].replay()
        return buf.logits[tokens][: len(sampling)], sampling

    def _replay(
        self, requests: Sequence[Request], next_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A decode step from the smallest graph that holds `requests` (their newest
        tokens from `next_ids` on the device, if given: `_DecodeBuffers.stage`)."""
        buf = self._static
        assert buf is not None
        n = len(requests)
        size = min(s for s in self._graphs if s >= n)
        buf.stage(requests, size, next_ids)
        self._graphs[size].replay()
        return buf.logits[size][:n]


def _host_zeros(*shape: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A host staging buffer: pinned (page-locked) for CUDA, so copies from it are DMA."""
    host = torch.zeros(shape, dtype=dtype)
    return host.pin_memory() if pin else host


class _DecodeBuffers:
    """Static decode inputs at the largest graph size, staged from host memory (pinned on
    CUDA). A row's block table is written in full only when the row changes hands; while
    the same request keeps it, only the blocks appended since the last step (a running
    request's block list only grows, and a preempted one gets a new list)."""

    def __init__(
        self, max_batch: int, max_blocks: int, block_size: int, device: torch.device
    ) -> None:
        self.block_size = block_size
        pinned = partial(_host_zeros, pin=device.type == "cuda")

        self.host_ids = pinned(max_batch, dtype=torch.long)
        self.host_pos = pinned(max_batch, dtype=torch.long)
        self.host_slots = pinned(max_batch, dtype=torch.long)
        self.host_lens = pinned(max_batch, dtype=torch.int32)
        self.host_tables = pinned(max_batch, max_blocks, dtype=torch.int32)
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slots = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.starts = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.logits: dict[int, torch.Tensor] = {}
        self._tables_np = self.host_tables.numpy()
        # per row: the block list it was staged from (kept alive, so its identity is
        # never reused) and how many of its entries the row holds
        self._rows: list[tuple[list[int] | None, int]] = [(None, 0)] * max_batch
        # Recorded after each staging's copies (CUDA): a step staged while the one before
        # is still queued (`Engine.step` with decode ahead) must not overwrite the pinned
        # buffers before the device has read them.
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

    def meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:size],
            query_start_loc=self.starts[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.tables[:size],
            block_size=self.block_size,
            query_lens_cpu=(1,) * size,
            seq_lens_cpu=(1,) * size,
        )

    def stage(
        self, requests: Sequence[Request], size: int, next_ids: torch.Tensor | None = None
    ) -> None:
        """Fill rows 0..size-1 (real requests, then padding) and copy them to the device.
        Each row computes position `num_computed_tokens`: the newest token, read from the
        request or, with `next_ids` (on the device, one per row), from there."""
        if self._copied is not None:
            self._copied.synchronize()  # at once unless the step before is still queued
        ids, pos = self.host_ids.numpy(), self.host_pos.numpy()
        slots, lens = self.host_slots.numpy(), self.host_lens.numpy()
        tables, bs, rows = self._tables_np, self.block_size, self._rows
        for i, req in enumerate(requests):
            p = req.num_computed_tokens
            blocks = req.block_ids
            if next_ids is None:
                ids[i] = req.token_ids[p]
            pos[i] = p
            lens[i] = p + 1
            slots[i] = blocks[p // bs] * bs + p % bs
            staged, written = rows[i]
            if staged is not blocks or written > len(blocks):
                written = 0  # another request's row (entries past its own are never read)
            if written < len(blocks):
                tables[i, written : len(blocks)] = blocks[written:]
            rows[i] = (blocks, len(blocks))
        n = len(requests)
        ids[n:size] = pos[n:size] = slots[n:size] = 0  # padding: slot 0 of block 0
        lens[n:size] = 1
        tables[n:size, 0] = 0
        rows[n:size] = [(None, 0)] * (size - n)
        for dst, src in (
            (self.ids, self.host_ids), (self.pos, self.host_pos),
            (self.slots, self.host_slots), (self.seq_lens, self.host_lens),
            (self.tables, self.host_tables),  # whole rows: one contiguous copy
        ):  # fmt: skip
            dst[:size].copy_(src[:size], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if next_ids is not None:
            self.ids[: len(requests)].copy_(next_ids)  # stream order: after they are drawn


class _MixedBuffers:
    """Static inputs of steps with prefill chunks, for the token-count graphs: up to
    `max_tokens` tokens of up to `max_seqs` sequences, and one more sequence (index
    `max_seqs`) with no queries that the spare tiles point at. Staged from host memory
    (pinned on CUDA) with one copy each; padded tokens write K/V to the padding block's
    slot 0, and their rows are computed and never read."""

    def __init__(
        self, max_tokens: int, max_seqs: int, max_blocks: int, block_size: int,
        device: torch.device,
    ) -> None:  # fmt: skip
        if max_seqs < 1:
            raise ValueError(f"max_seqs must be at least 1, got {max_seqs}")
        self.max_seqs, self.block_size = max_seqs, block_size
        self.graph_tokens: list[int] = []  # the captured sizes
        self.logits: dict[int, torch.Tensor] = {}
        pin = device.type == "cuda"

        def pair(*shape: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            host = _host_zeros(*shape, dtype=dtype, pin=pin)
            return host, torch.zeros(shape, dtype=dtype, device=device)

        self.host_ids, self.ids = pair(max_tokens, dtype=torch.long)
        self.host_pos, self.pos = pair(max_tokens, dtype=torch.long)
        self.host_slots, self.slots = pair(max_tokens, dtype=torch.long)
        self.host_lens, self.seq_lens = pair(max_seqs + 1, dtype=torch.int32)
        self.host_starts, self.starts = pair(max_seqs + 2, dtype=torch.int32)
        self.host_tables, self.tables = pair(max_seqs + 1, max_blocks, dtype=torch.int32)
        self.host_tiles, self.tiles = pair(self.max_tiles(max_tokens), 2, dtype=torch.int32)
        self.host_rows, self.rows = pair(max_seqs, dtype=torch.long)
        self.host_tiles[:, 0] = max_seqs  # every tile empty until staged
        self.tiles.copy_(self.host_tiles)

    def max_tiles(self, tokens: int) -> int:
        """Tiles `tokens` queries can need: one per QUERY_TILE of them, plus one partial
        tile per sequence."""
        return tokens // QUERY_TILE + self.max_seqs

    def num_rows(self, tokens: int) -> int:
        """Sequences that can sample in a step of `tokens` tokens."""
        return min(tokens, self.max_seqs)

    def fits(self, batch: ScheduledBatch) -> bool:
        return (
            bool(self.graph_tokens)
            and len(batch) <= self.max_seqs
            and (sum(batch.num_tokens) <= self.graph_tokens[0])
        )

    def graph_size(self, tokens: int) -> int:
        return min(t for t in self.graph_tokens if t >= tokens)

    def meta(self, tokens: int) -> AttentionMetadata:
        """What the graph of `tokens` tokens was captured with (every step's the same)."""
        return AttentionMetadata(
            slot_mapping=self.slots[:tokens],
            query_start_loc=self.starts,
            seq_lens=self.seq_lens,
            block_tables=self.tables,
            block_size=self.block_size,
            query_lens_cpu=(tokens,),  # > 1: the prefill kernel, whatever the step
            seq_lens_cpu=(tokens,),
            query_tiles=self.tiles[: self.max_tiles(tokens)],
        )

    def stage(self, batch: ScheduledBatch, tokens: int) -> list[int]:
        """Fill the buffers for a graph of `tokens` tokens and copy them to the device;
        returns the indices (into batch.requests) of the requests that sample."""
        ids, pos, slots = self.host_ids.numpy(), self.host_pos.numpy(), self.host_slots.numpy()
        lens, starts = self.host_lens.numpy(), self.host_starts.numpy()
        tables, tiles, rows = (
            self.host_tables.numpy(),
            self.host_tiles.numpy(),
            self.host_rows.numpy(),
        )
        bs = self.block_size
        n = 0  # tokens so far
        sampling: list[int] = []
        starts[0] = 0
        for i, (req, count) in enumerate(zip(batch.requests, batch.num_tokens, strict=True)):
            start = req.num_computed_tokens
            end = start + count
            blocks = req.block_ids
            tables[i, : len(blocks)] = blocks
            if count == 1:  # a decode: plain Python is cheaper than numpy for one token
                ids[n], pos[n] = req.token_ids[start], start
            else:
                ids[n : n + count] = req.token_ids[start:end]
                pos[n : n + count] = np.arange(start, end)
            fill_slots(slots, n, blocks, tables[i], start, end, bs)
            lens[i] = end
            n += count
            starts[i + 1] = n
            if end == req.num_tokens:
                rows[len(sampling)] = n - 1
                sampling.append(i)
        ids[n:tokens] = pos[n:tokens] = slots[n:tokens] = 0
        step_tiles = query_tiles(batch.num_tokens)
        num_tiles = len(step_tiles)
        tiles[:num_tiles] = step_tiles
        seqs = len(batch)
        lens[seqs:] = 0  # the rest, and the empty sequence, have no queries
        starts[seqs + 1 :] = n
        tiles[num_tiles : self.max_tiles(tokens)] = (self.max_seqs, 0)
        rows[len(sampling) : self.num_rows(tokens)] = 0
        seq_rows = self.max_seqs + 1
        for dst, src, count in (
            (self.ids, self.host_ids, tokens),
            (self.pos, self.host_pos, tokens),
            (self.slots, self.host_slots, tokens),
            (self.seq_lens, self.host_lens, seq_rows),
            (self.starts, self.host_starts, seq_rows + 1),
            (self.tiles, self.host_tiles, self.max_tiles(tokens)),
            (self.rows, self.host_rows, self.num_rows(tokens)),
            (self.tables, self.host_tables, seqs),  # whole rows: one contiguous copy
        ):
            dst[:count].copy_(src[:count], non_blocking=True)
        return sampling
