"""The decode graphs' static inputs (`_DecodeBuffers.stage`), on the CPU: after every step
of requests growing, leaving, being preempted (a new block list) and changing rows, each
real row holds exactly its request's inputs and blocks, and each padded row reads the
padding block — the same as staging every row from scratch."""

from __future__ import annotations

import random

import torch

from prism.engine import SamplingParams
from prism.engine.model_runner import _DecodeBuffers
from prism.engine.request import Request

BS = 4  # tokens per block


def _request(rng: random.Random, i: int) -> Request:
    n = rng.randrange(1, 40)
    req = Request(f"r{i}", list(range(n)), SamplingParams())
    req.token_ids = [rng.randrange(1000) for _ in range(n)]
    req.block_ids = [rng.randrange(1, 500) for _ in range(-(-n // BS))]
    req.num_computed_tokens = n - 1  # decoding: the newest token is the one to compute
    return req


def _grow(rng: random.Random, req: Request) -> None:
    """One decoded token: a new block when the last one is full (appended in place)."""
    req.token_ids.append(rng.randrange(1000))
    req.num_computed_tokens += 1
    if len(req.token_ids) > len(req.block_ids) * BS:
        req.block_ids.append(rng.randrange(1, 500))


def test_staged_rows_equal_a_fresh_staging_after_every_step() -> None:
    rng = random.Random(0)
    max_batch, max_blocks = 16, 64
    buffers = _DecodeBuffers(max_batch, max_blocks, BS, torch.device("cpu"))
    running = [_request(rng, i) for i in range(10)]
    made = len(running)
    for _ in range(300):
        for req in running:
            _grow(rng, req)
        event = rng.random()
        if event < 0.1 and running:  # one leaves
            running.pop(rng.randrange(len(running)))
        elif event < 0.2 and len(running) < max_batch:  # one arrives
            running.insert(rng.randrange(len(running) + 1), _request(rng, made))
            made += 1
        elif event < 0.3 and running:  # preempted and resumed: a new block list
            req = rng.choice(running)
            req.block_ids = [rng.randrange(1, 500) for _ in req.block_ids]
        elif event < 0.4:  # the scheduler orders them differently
            rng.shuffle(running)
        running = [r for r in running if len(r.block_ids) < max_blocks]
        if not running:
            running = [_request(rng, made)]
            made += 1
        size = min(s for s in (1, 2, 4, 8, 16) if s >= len(running))
        buffers.stage(running, size)
        tables = buffers.tables.numpy()
        for i, req in enumerate(running):
            p = req.num_tokens - 1
            assert buffers.ids[i] == req.token_ids[p] and buffers.pos[i] == p
            assert buffers.seq_lens[i] == p + 1
            assert buffers.slots[i] == req.block_ids[p // BS] * BS + p % BS
            assert tables[i, : len(req.block_ids)].tolist() == req.block_ids
        for i in range(len(running), size):  # padding: one token in block 0, slot 0
            assert buffers.seq_lens[i] == 1 and buffers.slots[i] == 0 and tables[i, 0] == 0


def test_a_step_ahead_takes_its_tokens_from_the_device() -> None:
    """Staged ahead of the step before (`next_ids`): each row computes the position after
    its last known token, with the token drawn on the device, in a slot of its blocks."""
    rng = random.Random(1)
    buffers = _DecodeBuffers(8, 64, BS, torch.device("cpu"))
    running = [_request(rng, i) for i in range(5)]
    for req in running:
        req.num_computed_tokens += 1  # the step before computed the newest token
        req.block_ids.append(rng.randrange(1, 500))  # the slot of the token being drawn
    drawn = torch.tensor([rng.randrange(1000) for _ in running])
    buffers.stage(running, 8, drawn)
    tables = buffers.tables.numpy()
    for i, req in enumerate(running):
        p = req.num_tokens  # the position of the token still on the device
        assert buffers.ids[i] == drawn[i] and buffers.pos[i] == p and buffers.seq_lens[i] == p + 1
        assert buffers.slots[i] == req.block_ids[p // BS] * BS + p % BS
        assert tables[i, : len(req.block_ids)].tolist() == req.block_ids
    assert buffers.seq_lens[5:8].tolist() == [1, 1, 1] and buffers.slots[5:8].tolist() == [0] * 3


def test_decode_splits_fill_the_sms_for_small_batches_only() -> None:
    """Two waves over 132 SMs: batch 1 of 8 KV heads splits 32 ways (the most), batch 8
    four ways, batch 32 not at all; always a power of two (the merge kernel's tile)."""
    from prism.models import triton_attention

    device = torch.device("cuda", 0)
    triton_attention._sm_count[0] = 132  # an H200's; no CUDA needed to choose
    try:
        splits = {b: triton_attention.decode_splits(b, 8, device) for b in (1, 2, 4, 8, 16, 32)}
    finally:
        del triton_attention._sm_count[0]
    assert splits == {1: 32, 2: 16, 4: 8, 8: 4, 16: 2, 32: 1}
