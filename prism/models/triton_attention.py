"""CUDA attention backend: Triton kernels that read K/V through the block tables.

Decode (every sequence has one query token) runs one Triton program per (sequence,
KV head, split): the program holds the group of query heads that share that KV head,
walks its share of the sequence's blocks through the block table with an online
softmax, and reads each K/V element once. A batch too small to fill the GPU splits each
context over several programs, whose partial softmax states a second kernel merges
(flash-decoding): unsplit, batch 1 of a 1B model is 8 programs each walking its whole
context alone. Everything comes from tensors (seq_lens, block_tables) and the split
count from the batch size, so a decode step is CUDA-graph capturable.

A step with prefill chunks (mixed with decodes or not) runs one launch per layer for
every sequence at once: one program per (tile of 64 query tokens of one sequence, query
head) walks that sequence's blocks up to the tile's last position, causal at the end of
the context (a chunk's queries are the context's last tokens). No K/V is gathered or
copied, and nothing depends on the step's lengths but the tile map, so no kernel is
compiled or planned per prompt length. (PyTorch's SDPA per sequence did this before:
a gather of the cached context, a copy per GQA group, one call per sequence — and on the
H200 its cuDNN backend built a plan for every new length, 0.1-1.8 s each.)

K/V of the step are written with index_copy_ (no boolean masks, no host sync) before
attention reads them; padded rows of a captured graph write to slot 0, the reserved
padding block.
"""

from __future__ import annotations

from typing import Any

import torch

from prism.models.attention import QUERY_TILE, AttentionBackend, AttentionMetadata

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines have no Triton
    triton = None

if triton is not None:

    @triton.jit
    def _cache_tile(  # type: ignore[no-untyped-def]
        cache_ptr, block, slot, kv_head, stride_b, stride_s, stride_h, offs_d, mask
    ):
        """[N, D]: one KV head's cache entries at the (block, slot) of N positions."""
        return tl.load(
            cache_ptr
            + block[:, None] * stride_b
            + slot[:, None] * stride_s
            + kv_head * stride_h
            + offs_d[None, :],
            mask=mask[:, None],
            other=0.0,
        )


def _build_decode_kernels() -> tuple[Any, Any]:
    @triton.jit
    def paged_decode(  # type: ignore[no-untyped-def]
        out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
        q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, seq_lens_ptr, scale, num_heads,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr, TILE: tl.constexpr, SPLITS: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + seq)
        # This program's share of the context: whole tiles, the last split may run short
        # (or have nothing, for a short context).
        chunk = tl.cdiv(tl.cdiv(seq_len, SPLITS), TILE) * TILE
        first = split * chunk
        last = tl.minimum(seq_len, first + chunk)
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
        for start in range(first, last, TILE):
            pos = start + offs_t
            tmask = pos < last
            block = tl.load(tables_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=tmask, other=0)
            slot = pos % BLOCK_SIZE
            k = _cache_tile(  # [TILE, D]
                k_cache_ptr, block, slot, kv_head, stride_kb, stride_ks, stride_kh, offs_d, tmask
            )
            v = _cache_tile(
                v_cache_ptr, block, slot, kv_head, stride_vb, stride_vs, stride_vh, offs_d, tmask
            )
            s = tl.dot(q, tl.trans(k)) * scale  # [GROUP_PAD, TILE]
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, 1)  # noqa: E741
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        if SPLITS == 1:
            tl.store(
                out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                (acc / l[:, None]).to(out_ptr.dtype.element_ty),
                mask=gmask[:, None],
            )
        else:  # partial softmax state, [B, Hq, SPLITS] and [B, Hq, SPLITS, D]
            row = (seq * num_heads + heads) * SPLITS + split
            tl.store(part_m_ptr + row, m, mask=gmask)
            tl.store(part_l_ptr + row, l, mask=gmask)
            tl.store(
                part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=gmask[:, None]
            )

    @triton.jit
    def merge_splits(  # type: ignore[no-untyped-def]
        out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, num_heads, stride_ot, stride_oh,
        HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        head = tl.program_id(1)
        offs_s = tl.arange(0, SPLITS)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = (seq * num_heads + head) * SPLITS + offs_s
        m = tl.load(part_m_ptr + rows)
        l = tl.load(part_l_ptr + rows)  # noqa: E741
        acc = tl.load(part_acc_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :])
        m_max = tl.max(m, 0)  # finite: the first split always holds a token
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))  # empty splits weigh 0
        out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)
        tl.store(
            out_ptr + seq * stride_ot + head * stride_oh + offs_d,
            out.to(out_ptr.dtype.element_ty),
        )

    return paged_decode, merge_splits


_decode_kernels: tuple[Any, Any] | None = None
_sm_count: dict[int, int] = {}


def decode_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Programs per (sequence, KV head): enough for about two waves over the SMs when
    the batch alone is too small to fill them (batch 1 of a 1B model has 8 programs, and
    each would walk its whole context alone), 1 once it is not; at most 32."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    wanted = 2 * _sm_count[index] // max(1, batch * num_kv_heads)
    return 1 if wanted < 2 else min(32, 1 << (wanted - 1).bit_length())  # a power of two


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    splits: int | None = None,
) -> torch.Tensor:
    """q: [B, Hq, D], one query per sequence; caches [N, bs, Hkv, D] -> [B, Hq, D].
    A small batch splits each context over several programs (flash-decoding) and merges
    their partial softmax states; `splits` (a power of two) overrides the choice.
    Capturable in a CUDA graph: the split count depends on the batch size alone."""
    global _decode_kernels
    if triton is None:
        raise RuntimeError("TritonAttention needs the triton package (install the gpu extra)")
    if _decode_kernels is None:
        _decode_kernels = _build_decode_kernels()
    decode, merge = _decode_kernels
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if splits is None:
        splits = decode_splits(batch, num_kv_heads, q.device)
    out = torch.empty_like(q)
    part_m = part_l = part_acc = out  # unused with one split
    if splits > 1:
        part_m = q.new_empty((batch, num_heads, splits), dtype=torch.float32)
        part_l = torch.empty_like(part_m)
        part_acc = q.new_empty((batch, num_heads, splits, head_dim), dtype=torch.float32)
    decode[(batch, num_kv_heads, splits)](
        out, part_m, part_l, part_acc,
        q, k_cache, v_cache, block_tables, seq_lens, scale, num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, TILE=max(64, block_size), SPLITS=splits, num_warps=4,
    )  # fmt: skip
    if splits > 1:
        merge[(batch, num_heads)](
            out, part_m, part_l, part_acc, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, SPLITS=splits,
        )  # fmt: skip
    return out


def _build_prefill_kernel() -> Any:
    @triton.jit
    def paged_prefill(  # type: ignore[no-untyped-def]
        out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, seq_lens_ptr, starts_ptr,
        tiles_ptr, scale,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        head = tl.program_id(1)
        kv_head = head // GROUP
        seq = tl.load(tiles_ptr + 2 * tl.program_id(0))
        first = tl.load(tiles_ptr + 2 * tl.program_id(0) + 1)  # the tile's first query
        q_start = tl.load(starts_ptr + seq)
        q_len = tl.load(starts_ptr + seq + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + seq)
        offs_m = first + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = offs_m < q_len
        q = tl.load(  # [BLOCK_M, D]
            q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
            mask=rows[:, None],
            other=0.0,
        )
        q_pos = seq_len - q_len + offs_m  # each query's position in its sequence
        kv_end = tl.minimum(seq_len, seq_len - q_len + first + BLOCK_M)  # causal bound
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)  # noqa: E741
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        qk_scale = scale * 1.4426950408889634  # log2(e): exp2 below
        for start in range(0, kv_end, BLOCK_N):
            pos = start + offs_n
            cols = pos < kv_end
            block = tl.load(tables_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=cols, other=0)
            slot = pos % BLOCK_SIZE
            k = _cache_tile(  # [BLOCK_N, D]
                k_cache_ptr, block, slot, kv_head, stride_kb, stride_ks, stride_kh, offs_d, cols
            )
            v = _cache_tile(
                v_cache_ptr, block, slot, kv_head, stride_vb, stride_vs, stride_vh, offs_d, cols
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where((pos[None, :] <= q_pos[:, None]) & cols[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))  # finite from the first tile (position 0)
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l = l * alpha + tl.sum(p, 1)  # noqa: E741
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        out = acc / l[:, None]
        tl.store(
            out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=rows[:, None],
        )

    return paged_prefill


_prefill_kernel: Any = None


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, Hq, D], every sequence's query tokens flat; caches [N, bs, Hkv, D] (this
    step's K/V already written) -> [T, Hq, D], one program per `meta.query_tiles` entry
    and query head."""
    global _prefill_kernel
    if triton is None:
        raise RuntimeError("TritonAttention needs the triton package (install the gpu extra)")
    if _prefill_kernel is None:
        _prefill_kernel = _build_prefill_kernel()
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    tiles = meta.query_tiles
    if tiles is None:
        raise ValueError("paged_prefill needs meta.query_tiles (AttentionMetadata.build)")
    out = torch.empty_like(q)
    tables = meta.block_tables
    _prefill_kernel[(tiles.shape[0], num_heads)](
        out, q, k_cache, v_cache, tables, meta.seq_lens, meta.query_start_loc, tiles, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), tables.stride(0),
        GROUP=num_heads // num_kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_M=QUERY_TILE, BLOCK_N=64,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
    )  # fmt: skip
    return out


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
        return paged_prefill(q, k_cache, v_cache, meta, scale)
