"""`ModelRunner`: a scheduled batch → model inputs → the logits that get sampled.

Tokens of all scheduled requests are flattened into one batch of T tokens with their
positions and cache slots; only the last token of a request whose prompt is complete
this step yields logits (a chunk in the middle of a prompt yields none).
"""

from __future__ import annotations

import torch

from prism.engine.scheduler import ScheduledBatch
from prism.models.attention import AttentionMetadata, KVCache
from prism.models.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_caches: list[KVCache], block_size: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = model.device

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Run one step; returns (logits [S, V], indices into batch.requests of the S
        requests that sample a token this step)."""
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
