"""The static inputs of the token-count CUDA graphs (steps with prefill chunks), on the CPU.

A CUDA graph cannot be captured here, so the graph is stood in for by calling the same
forward over the same static buffers (`ModelRunner._mixed_forward`), and attention by the
torch reference reading only what the Triton prefill kernel reads from tensors: query
starts, sequence lengths, block tables and the tile map, with the padding a graph step
carries. What this checks is the staging: every step's padded inputs describe exactly the
step `AttentionMetadata.build` describes, and greedy outputs equal the eager engine's.
The graphs themselves run in `test_cuda_engine_gpu.py` (`-m gpu`).
"""

from __future__ import annotations

from functools import partial
from itertools import pairwise

import torch

from prism.engine import Engine, EngineConfig, SamplingParams
from prism.engine.model_runner import _MixedBuffers
from prism.models.attention import AttentionBackend, AttentionMetadata, query_tiles
from prism.models.config import ModelConfig
from prism.models.torch_attention import TorchAttention

CONFIG = ModelConfig(
    architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=1024,
)  # fmt: skip
MAX_SEQS = 6


class TensorDrivenAttention(AttentionBackend):
    """The torch reference over the step that the static tensors describe; checks on the
    way that the padding is what the kernel expects."""

    def __init__(self) -> None:
        self.graph_steps = 0

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
        if meta.seq_lens.shape[0] != MAX_SEQS + 1:  # an eager step: its own metadata
            return TorchAttention().forward(q, k, v, k_cache, v_cache, meta, scale)
        self.graph_steps += 1
        starts, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
        q_lens = [b - a for a, b in pairwise(starts)]
        real = [i for i, n in enumerate(q_lens) if n > 0]
        assert real == list(range(len(real))), "real sequences come first"
        assert all(lens[i] == 0 for i in range(len(real), MAX_SEQS + 1))
        tokens = starts[-1]
        bs = meta.block_size
        tables = [meta.block_tables[i, : -(-lens[i] // bs)].tolist() for i in real]
        step = AttentionMetadata.build([q_lens[i] for i in real], [lens[i] for i in real],
                                       tables, bs)  # fmt: skip
        assert torch.equal(meta.slot_mapping[:tokens], step.slot_mapping)
        assert bool((meta.slot_mapping[tokens:] == 0).all()), "padding writes to slot 0"
        assert meta.query_tiles is not None
        tiles = [tuple(t) for t in meta.query_tiles.tolist()]
        want = query_tiles([q_lens[i] for i in real])
        assert tiles[: len(want)] == want
        assert set(tiles[len(want) :]) <= {(MAX_SEQS, 0)}, "spare tiles point at no queries"
        out = torch.full_like(q, float("nan"))  # padded rows: computed, never read
        out[:tokens] = TorchAttention().forward(
            q[:tokens], k[:tokens], v[:tokens], k_cache, v_cache, step, scale
        )
        return out


class _Replay:
    """Stands in for a captured graph: replay runs the forward it was captured from."""

    def __init__(self, run: partial[None]) -> None:
        self.replay = run


def _engine(graph_tokens: tuple[int, ...]) -> tuple[Engine, TensorDrivenAttention]:
    attention = TensorDrivenAttention()
    config = EngineConfig(
        max_num_seqs=MAX_SEQS, max_num_batched_tokens=96, max_model_len=512,
        kv_cache_bytes=8 << 20, prefix_caching=False,
    )  # fmt: skip
    engine = Engine.create(CONFIG, config=config, load_format="dummy", attention=attention)
    if graph_tokens:
        runner = engine.runner
        sizes = sorted(graph_tokens, reverse=True)
        runner._mixed = _MixedBuffers(
            sizes[0], MAX_SEQS, runner.max_blocks, runner.block_size, torch.device("cpu")
        )
        for tokens in sizes:
            runner._mixed_graphs[tokens] = _Replay(partial(runner._mixed_forward, tokens))  # type: ignore[assignment]
            runner._mixed.graph_tokens.append(tokens)
    return engine, attention


def _run(engine: Engine) -> list[list[int]]:
    """Prompts longer than a step's budget (chunked), short ones arriving while others
    decode, more requests than sequences per step."""
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    lengths = [150, 3, 40, 64, 65, 1, 90, 17]
    prompts = [torch.randint(1, 256, (n,), generator=gen).tolist() for n in lengths]
    ids = [engine.add_request(p, params) for p in prompts[:5]]
    tokens: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        steps += 1
        if steps == 3:  # arrivals mid-run: their prefills join running decodes
            ids += [engine.add_request(p, params) for p in prompts[5:]]
    return [tokens[i] for i in ids]


def test_graph_inputs_describe_the_step_and_outputs_match_eager() -> None:
    """Every step with a prefill chunk that fits runs over the static buffers (at the
    next token count up), and greedy outputs equal the eager engine's token for token."""
    eager, _ = _engine(())
    want = _run(eager)
    graphed, attention = _engine((16, 64, 96))
    got = _run(graphed)
    assert attention.graph_steps > 0, "no step took the graph path"
    assert got == want
    graphed.kv_cache.check_integrity()


def test_buffers_reject_a_batch_beyond_their_sizes() -> None:
    """A step with more tokens than the largest graph runs eagerly."""
    buffers = _MixedBuffers(64, MAX_SEQS, 32, 16, torch.device("cpu"))
    buffers.graph_tokens.append(64)
    assert buffers.graph_size(10) == 64
    assert buffers.max_tiles(64) == 1 + MAX_SEQS
    assert buffers.num_rows(4) == 4 and buffers.num_rows(64) == MAX_SEQS
