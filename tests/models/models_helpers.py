"""Helpers for prism.models tests: tiny HF reference models and a paged-cache driver.

A uniquely named module rather than `conftest`, so `import` cannot pick up another
folder's conftest.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from prism.models import AttentionMetadata, KVCache, LlamaModel

TINY_COMMON: dict[str, Any] = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# Wavelengths of head_dim 16 at theta 10000 span 6..20000 positions, so an original context
# of 32 exercises all three llama3 regimes (kept, ramped, slowed).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
TINY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": False}),
    "llama-tied-linear-rope": (
        "llama",
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "tie_word_embeddings": True},
    ),
    # 4 KV heads: k/v biases of 64 fp32 = 256 bytes, the weight layout's alignment, so q/k/v
    # and their biases lie back to back and the fused projection is the one exercised.
    "qwen2-bias": (
        "qwen2",
        {"tie_word_embeddings": False, "rope_theta": 1e6, "num_key_value_heads": 4},
    ),
    "qwen3-qk-norm": ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
}


def build_tiny_hf_model(variant: str, seed: int = 0) -> Any:
    """A transformers model with every parameter randomised (biases and norms included)."""
    import transformers

    family, extra = TINY_VARIANTS[variant]
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    config = config_cls(**(TINY_COMMON | extra), attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            mean = 1.0 if "norm" in name else 0.0
            param.normal_(mean, 0.1)
    return model


class PagedRunner:
    """Drives a LlamaModel through a paged KV cache like an engine would.

    Each sequence owns blocks drawn from a shuffled pool (so block ids are neither
    contiguous nor ordered), and spare blocks stay unused.
    """

    def __init__(
        self, model: LlamaModel, num_seqs: int, max_len: int, block_size: int = 4, seed: int = 0
    ) -> None:
        cfg = model.config
        per_seq = math.ceil(max_len / block_size)
        num_blocks = num_seqs * per_seq + 3
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.block_tables = [perm[i * per_seq : (i + 1) * per_seq] for i in range(num_seqs)]
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.caches: list[KVCache] = [
            (
                torch.zeros(shape, dtype=model.dtype, device=model.device),
                torch.zeros(shape, dtype=model.dtype, device=model.device),
            )
            for _ in range(cfg.num_layers)
        ]
        self.model = model
        self.block_size = block_size
        self.seq_lens = [0] * num_seqs

    def step(self, new_tokens: Sequence[Sequence[int]]) -> list[torch.Tensor | None]:
        """Append new_tokens[i] to sequence i (may be empty); logits [len, V] per sequence."""
        active = [i for i, toks in enumerate(new_tokens) if toks]
        query_lens = [len(new_tokens[i]) for i in active]
        seq_lens = [self.seq_lens[i] + q for i, q in zip(active, query_lens, strict=True)]
        meta = AttentionMetadata.build(
            query_lens, seq_lens, [self.block_tables[i] for i in active], self.block_size
        )
        ids = torch.tensor([t for i in active for t in new_tokens[i]], device=self.model.device)
        positions = torch.cat(
            [torch.arange(s - q, s) for q, s in zip(query_lens, seq_lens, strict=True)]
        ).to(self.model.device)
        hidden = self.model.forward(ids, positions, self.caches, meta)
        logits = self.model.compute_logits(hidden).split(query_lens)
        out: list[torch.Tensor | None] = [None] * len(new_tokens)
        for i, seq_logits, s in zip(active, logits, seq_lens, strict=True):
            out[i] = seq_logits
            self.seq_lens[i] = s
        return out
