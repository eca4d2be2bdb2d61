"""CUDA attention backend: a Triton paged-decode kernel, SDPA for prefill.

Decode (every sequence has one query token) runs one Triton program per (sequence,
KV head): the program holds the group of query heads that share that KV head, walks the
sequence's blocks through its block table with an online softmax, and reads each K/V
element once. Everything it needs comes from tensors (seq_lens, block_tables), so a
decode step is CUDA-graph capturable. Prefill uses PyTorch's scaled_dot_product_attention
per sequence (flash kernels), over K/V gathered from the cache when the sequence has
earlier context (chunked prefill or a prefix-cache hit). Only the flash and
memory-efficient backends may run it: cuDNN's builds a plan for every new sequence
length (0.1-1.8 s each on the H200, measured), and every prompt brings a new length.

K/V of the step are written with index_copy_ (no boolean masks, no host sync); padded
rows of a captured graph write to slot 0, the reserved padding block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from prism.models.attention import AttentionBackend, AttentionMetadata

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines have no Triton
    triton = None


def _build_kernel() -> Any:
    @triton.jit
    def paged_decode(  # type: ignore[no-untyped-def]
        out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, seq_lens_ptr, scale,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr, TILE: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        seq_len = tl.load(seq_lens_ptr + seq)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_t = tl.arange(0, TILE)
        heads = kv_head * GROUP + offs_g
        gmask = offs_g < GROUP
        q = tl.load(  # [GROUP_PAD, D]
            q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
            mask=gmask[:, None],
            other=0.0,
        )
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)  # noqa: E741
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for start in range(0, seq_len, TILE):
            pos = start + offs_t
            tmask = pos < seq_len
            block = tl.load(tables_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=tmask, other=0)
            slot = pos % BLOCK_SIZE
            k = tl.load(  # [TILE, D]
                k_cache_ptr
                + block[:, None] * stride_kb
                + slot[:, None] * stride_ks
                + kv_head * stride_kh
                + offs_d[None, :],
                mask=tmask[:, None],
                other=0.0,
            )
            v = tl.load(
                v_cache_ptr
                + block[:, None] * stride_vb
                + slot[:, None] * stride_vs
                + kv_head * stride_vh
                + offs_d[None, :],
                mask=tmask[:, None],
                other=0.0,
            )
            s = tl.dot(q, tl.trans(k)) * scale  # [GROUP_PAD, TILE]
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, 1)  # noqa: E741
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / l[:, None]
        tl.store(
            out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=gmask[:, None],
        )

    return paged_decode


_kernel: Any = None


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [B, Hq, D], one query per sequence; caches [N, bs, Hkv, D] -> [B, Hq, D]."""
    global _kernel
    if triton is None:
        raise RuntimeError("TritonAttention needs the triton package (install the gpu extra)")
    if _kernel is None:
        _kernel = _build_kernel()
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    tile = max(64, block_size)
    _kernel[(batch, num_kv_heads)](
        out, q, k_cache, v_cache, block_tables, seq_lens, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, TILE=tile, num_warps=4,
    )  # fmt: skip
    return out


# Sequence-length-agnostic kernels only (see the module's docstring).
_PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


class TritonAttention(AttentionBackend):
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
        heads, dim = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, heads, dim).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, heads, dim).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        if meta.max_query_len == 1:
            return paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
        return self._mixed(q, k, v, k_cache, v_cache, meta, scale)

    def _mixed(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """A step with prefill chunks: decodes in one kernel launch, prefills one by one."""
        out = torch.empty_like(q)
        starts = [0]
        for q_len in meta.query_lens_cpu:
            starts.append(starts[-1] + q_len)
        decodes = [i for i, q_len in enumerate(meta.query_lens_cpu) if q_len == 1]
        if decodes:
            seqs = torch.tensor(decodes, device=q.device)
            rows = torch.tensor([starts[i] for i in decodes], device=q.device)
            out[rows] = paged_decode(
                q[rows], k_cache, v_cache, meta.block_tables[seqs], meta.seq_lens[seqs], scale
            )
        with sdpa_kernel(_PREFILL_BACKENDS):
            for i, (q_len, seq_len) in enumerate(
                zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)
            ):
                if q_len > 1:
                    rows_i = slice(starts[i], starts[i] + q_len)
                    out[rows_i] = self._prefill_one(
                        q[rows_i], k[rows_i], v[rows_i], k_cache, v_cache,
                        meta.block_tables[i], seq_len, meta.block_size, scale,
                    )  # fmt: skip
        return out

    @staticmethod
    def _prefill_one(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        table: torch.Tensor,
        seq_len: int,
        bs: int,
        scale: float,
    ) -> torch.Tensor:
        """One sequence's chunk q: [L, Hq, D] over its whole context -> [L, Hq, D]."""
        q_len = q.shape[0]
        qs = q.transpose(0, 1)  # [Hq, L, D]
        if q_len == seq_len:  # the whole context is this step's tokens
            ks, vs = k.transpose(0, 1), v.transpose(0, 1)
            mask, causal = None, True
        else:  # earlier context lives in the cache
            blocks = table[: -(-seq_len // bs)].long()
            ks = k_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)  # [Hkv, S, D]
            vs = v_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)
            # Causal with the chunk's queries at the end of the context: no mask tensor,
            # so the flash/memory-efficient kernels still apply.
            mask, causal = causal_lower_right(q_len, seq_len), False
        group = qs.shape[0] // ks.shape[0]
        if group > 1:  # the flash kernel wants one K/V head per query head
            ks = ks.repeat_interleave(group, dim=0)
            vs = vs.repeat_interleave(group, dim=0)
        o = F.scaled_dot_product_attention(  # 4-D [1, H, L, D]: the flash kernel's shape
            qs[None], ks[None], vs[None], attn_mask=mask, is_causal=causal, scale=scale
        )
        return o[0].transpose(0, 1)
