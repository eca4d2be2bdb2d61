"""The engine's CUDA path on a real GPU (run with `pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch

from prism.engine import Engine, EngineConfig, SamplingParams
from prism.models.attention import AttentionMetadata
from prism.models.config import ModelConfig
from prism.models.torch_attention import TorchAttention

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def _random_case(query_lens, seq_lens, heads=8, kv_heads=2, dim=128, bs=16):  # type: ignore[no-untyped-def]
    g = torch.Generator(device="cuda").manual_seed(0)
    num_blocks = sum(-(-s // bs) for s in seq_lens) + 8
    perm = torch.randperm(num_blocks - 1, generator=g, device="cuda").add(1).tolist()
    tables, used = [], 0
    for s in seq_lens:
        n = -(-s // bs)
        tables.append(perm[used : used + n])
        used += n
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, bs, "cuda")
    t = sum(query_lens)
    q = torch.randn(t, heads, dim, device="cuda", generator=g).bfloat16()
    k = torch.randn(t, kv_heads, dim, device="cuda", generator=g).bfloat16()
    v = torch.randn(t, kv_heads, dim, device="cuda", generator=g).bfloat16()
    cache = torch.randn(2, num_blocks, bs, kv_heads, dim, device="cuda", generator=g).bfloat16()
    return q, k, v, cache, meta


@pytest.mark.parametrize(
    ("query_lens", "seq_lens", "heads", "dim"),
    [
        ([1, 1, 1], [1, 37, 700], 8, 128),
        ([5, 64], [5, 64], 8, 128),
        ([7, 1, 33], [40, 90, 33], 8, 128),
        # Tiles of 64 queries over long cached contexts, decodes beside them, GQA of 4.
        ([300, 1, 65, 129], [2100, 900, 65, 1500], 8, 64),
    ],
    ids=["decode", "prefill", "chunked", "long-chunks-gqa4"],
)
def test_triton_attention_matches_reference(query_lens, seq_lens, heads, dim) -> None:  # type: ignore[no-untyped-def]
    """The Triton decode and prefill kernels agree with the fp32 torch reference (bf16)."""
    from prism.models.triton_attention import TritonAttention

    q, k, v, cache, meta = _random_case(query_lens, seq_lens, heads=heads, dim=dim)
    ref_cache = cache.clone()
    got = TritonAttention().forward(q, k, v, cache[0], cache[1], meta, dim**-0.5)
    want = TorchAttention().forward(q, k, v, ref_cache[0], ref_cache[1], meta, dim**-0.5)
    assert torch.equal(cache, ref_cache)  # same K/V written to the same slots
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < 1e-2, err


@pytest.mark.parametrize("splits", [1, 4, 32])
def test_split_decode_matches_reference(splits: int) -> None:
    """Decode over contexts split across programs (flash-decoding) and merged agrees with
    the reference, including splits left empty by a short context."""
    from prism.models.triton_attention import paged_decode

    seq_lens = [1, 37, 700, 4097]
    q, k, v, cache, meta = _random_case([1] * len(seq_lens), seq_lens, heads=32, kv_heads=8)
    want = TorchAttention().forward(q, k, v, cache[0], cache[1], meta, 128**-0.5)  # writes K/V
    got = paged_decode(q, cache[0], cache[1], meta.block_tables, meta.seq_lens, 128**-0.5, splits)
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < 1e-2, err


def _tiny_llama() -> ModelConfig:
    return ModelConfig(
        architecture="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
        num_layers=2, num_heads=16, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=2048,
    )  # fmt: skip


def _engine(graphs: bool, max_model_len: int = 512, graph_tokens: tuple[int, ...] = ()) -> Engine:
    config = EngineConfig(
        max_num_seqs=8,
        max_model_len=max_model_len,
        max_num_batched_tokens=256,
        kv_cache_bytes=256 << 20,
        cuda_graph_sizes=(1, 2, 4, 8) if graphs else (),
        cuda_graph_tokens=graph_tokens,
    )
    return Engine.create(
        _tiny_llama(),  # type: ignore[arg-type]
        device="cuda",
        dtype=torch.float32,
        config=config,
        load_format="dummy",
    )


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[i] for i in ids]


def test_cuda_graph_decode_equals_eager() -> None:
    """Greedy decoding replayed from CUDA graphs gives the eager path's tokens."""
    prompts = [[1, 2, 3, 4, 5], list(range(10, 50)), [7] * 19]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    results = []
    for graphs in (False, True):
        engine = _engine(graphs)
        assert bool(engine.runner._graphs) == graphs
        results.append(_run(engine, prompts, params))
        engine.kv_cache.check_integrity()
        engine.close()
    assert results[0] == results[1]


def test_token_count_graphs_equal_eager() -> None:
    """Steps with prefill chunks replayed from the token-count graphs (chunked prompts,
    prompts arriving while others decode) give the eager path's greedy tokens."""
    gen = torch.Generator().manual_seed(0)
    lengths = [300, 3, 40, 64, 65, 130, 17]
    prompts = [torch.randint(1, 500, (n,), generator=gen).tolist() for n in lengths]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    results = []
    for tokens in ((), (16, 64, 128, 256)):
        engine = _engine(True, graph_tokens=tokens)
        assert bool(engine.runner._mixed_graphs) == bool(tokens)
        results.append(_run(engine, prompts, params))
        engine.kv_cache.check_integrity()
        engine.close()
    assert results[0] == results[1]


def test_graphs_survive_kv_pages_moving() -> None:
    """Decode graphs keep replaying correctly after the KV cache shrank and regrew.

    fp32, 8 KV heads of 64: 32 KiB blocks, 64 to a 2 MiB page group, so these prompts
    span several groups beyond group 0 and trimming really unmaps pages."""
    engine = _engine(True, max_model_len=2048)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[i % 500 + 1 for i in range(n)] for n in (1500, 1200, 800, 1000)]
    before = _run(engine, prompts, params)
    engine.kv.reset_prefix_cache()
    assert engine.kv_cache.trim(0) > 0  # pages went back to the pool
    after = _run(engine, prompts, params)
    assert before == after
    engine.kv_cache.check_integrity()
    engine.close()


def test_reading_tokens_back_does_not_wait_for_later_work() -> None:
    """The engine launches the next decode step before reading this one's tokens: the
    read must wait for this step's draw only, not for what was queued after it."""
    from prism.engine.request import Request
    from prism.engine.sampler import Sampler

    sampler = Sampler()
    logits = torch.randn(4, 1000, device="cuda")
    requests = [Request(f"r{i}", [1], SamplingParams(temperature=0.0)) for i in range(4)]
    pending = sampler.launch(logits, requests)
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time queued behind the draw
    later = torch.cuda.Event()
    later.record()
    result = sampler.collect(pending, requests)
    assert not later.query(), "the read waited for the work queued after the draw"
    assert result.token_ids == logits.argmax(dim=-1).tolist()
