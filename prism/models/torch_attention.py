"""Reference attention backend in plain torch: the oracle other backends are tested against."""

from __future__ import annotations

import torch

from prism.models.attention import AttentionBackend, AttentionMetadata, write_kv_cache


class TorchAttention(AttentionBackend):
    """One dense fp32 attention per sequence over K/V gathered from its cache blocks."""

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
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)  # [T, Hq, D]
        start = 0
        for i, (q_len, seq_len) in enumerate(
            zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)
        ):
            k_ctx = _gather(k_cache, meta.block_tables[i], seq_len, meta.block_size)
            v_ctx = _gather(v_cache, meta.block_tables[i], seq_len, meta.block_size)
            out[start : start + q_len] = causal_attention(
                q[start : start + q_len], k_ctx, v_ctx, scale
            )
            start += q_len
        return out


def _gather(
    cache: torch.Tensor, blocks: torch.Tensor, seq_len: int, block_size: int
) -> torch.Tensor:
    """cache: [N, bs, Hkv, D], blocks: [max_blocks] -> the first seq_len tokens [S, Hkv, D]."""
    used = blocks[: -(-seq_len // block_size)].long()
    return cache[used].flatten(0, 1)[:seq_len]


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [L, Hq, D] are the last L of S positions; k, v: [S, Hkv, D] -> [L, Hq, D]."""
    q_len, num_heads, head_dim = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    # Query head h = kv * group + g reads KV head kv.
    qf = q.float().view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, L, D]
    kf = k.float().transpose(0, 1)  # [Hkv, S, D]
    vf = v.float().transpose(0, 1)  # [Hkv, S, D]
    scores = torch.einsum("hgld,hsd->hgls", qf, kf) * scale  # [Hkv, G, L, S]
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    k_pos = torch.arange(seq_len, device=q.device)
    scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("hgls,hsd->hgld", probs, vf)  # [Hkv, G, L, D]
    return out.permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim).to(q.dtype)
