"""`ModelRunner`: a scheduled batch → model inputs → the logits that get sampled.

Tokens of all scheduled requests are flattened into one batch of T tokens with their
positions and cache slots; only the last token of a request whose prompt is complete
this step yields logits (a chunk in the middle of a prompt yields none).

On CUDA, pure-decode steps replay a CUDA graph captured for the next batch size up:
inputs are copied into static buffers with one host→device copy each, padded rows
write to and read from the reserved padding block 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prism.engine.request import Request
from prism.engine.scheduler import ScheduledBatch
from prism.models.attention import AttentionMetadata, KVCache
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

    # ---- eager ---------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Run one step; returns (logits [S, V], indices into batch.requests of the S
        requests that sample a token this step)."""
        if self._graphs and self._is_decode(batch) and len(batch) <= max(self._graphs):
            return self._replay(batch), list(range(len(batch)))
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
    def capture(self, batch_sizes: Sequence[int]) -> None:
        """Capture one decode graph per batch size (largest first, sharing one pool)."""
        if self.device.type != "cuda" or not batch_sizes:
            return
        sizes = sorted(set(batch_sizes), reverse=True)
        self._static = buf = _DecodeBuffers(sizes[0], self.max_blocks, self.block_size, self.device)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in sizes:
                meta = buf.meta(size)
                for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks kernels
                    self._decode(buf, size, meta)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    buf.logits[size] = self._decode(buf, size, meta)
                self._graphs[size] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def _decode(self, buf: _DecodeBuffers, size: int, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.model.forward(buf.ids[:size], buf.pos[:size], self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    def _replay(self, batch: ScheduledBatch) -> torch.Tensor:
        buf = self._static
        assert buf is not None
        n = len(batch)
        size = min(s for s in self._graphs if s >= n)
        buf.stage(batch.requests, size)
        self._graphs[size].replay()
        return buf.logits[size][:n]


class _DecodeBuffers:
    """Static decode inputs at the largest graph size, staged from pinned host memory."""

    def __init__(
        self, max_batch: int, max_blocks: int, block_size: int, device: torch.device
    ) -> None:
        self.block_size = block_size

        def pinned(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype).pin_memory()

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
        self._width = 0  # table columns that may hold stale ids from the last step

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

    def stage(self, requests: Sequence[Request], size: int) -> None:
        """Fill rows 0..size-1 (real requests, then padding) and copy them to the device."""
        ids, pos = self.host_ids.numpy(), self.host_pos.numpy()
        slots, lens = self.host_slots.numpy(), self.host_lens.numpy()
        tables, bs = self._tables_np, self.block_size
        width = self._width  # zero what the last step wrote, then write this step's rows
        tables[:size, :width] = 0
        for i, req in enumerate(requests):
            p = req.num_tokens - 1  # the newest token is the one to compute
            blocks = req.block_ids
            ids[i] = req.token_ids[p]
            pos[i] = p
            lens[i] = p + 1
            slots[i] = blocks[p // bs] * bs + p % bs
            tables[i, : len(blocks)] = blocks
            width = max(width, len(blocks))
        n = len(requests)
        ids[n:size] = pos[n:size] = slots[n:size] = 0  # padding: slot 0 of block 0
        lens[n:size] = 1
        self._width = max(len(r.block_ids) for r in requests)
        for dst, src in (
            (self.ids, self.host_ids), (self.pos, self.host_pos),
            (self.slots, self.host_slots), (self.seq_lens, self.host_lens),
        ):  # fmt: skip
            dst[:size].copy_(src[:size], non_blocking=True)
        self.tables[:size, :width].copy_(self.host_tables[:size, :width], non_blocking=True)
