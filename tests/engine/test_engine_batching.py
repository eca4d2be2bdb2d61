"""Continuous batching on a tiny random Llama: batch invariance, chunked prefill,
preemption by recompute and prefix caching all leave greedy output unchanged (fp32 CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_helpers import GREEDY, Finished, drain, generate, record, tiny_engine, used_blocks

from prism.engine import Engine, FinishReason, SamplingParams
from prism.engine.scheduler import ScheduledBatch

# Prompts of 1 to ~150 tokens, so a batch mixes decodes with prefills of many lengths.
PROMPTS: list[str | list[int]] = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    list(range(1000, 1077)),
    "Once upon a time, in a land far away, there lived a king who had three daughters. " * 5,
    [7],
]
# Small pages and blocks make the KV cache a handful of blocks: 4-token blocks, 8 per
# 4 KiB page group, 4 groups in 64 KiB → 31 usable blocks (124 tokens).
SMALL_CACHE = {"block_size": 4, "host_page_size": 4096, "kv_cache_bytes": 64 << 10}


def solo_outputs(checkpoint: Path, prompts: list[str | list[int]]) -> list[list[int]]:
    """Each prompt alone on a fresh engine without prefix caching."""
    results = []
    for prompt in prompts:
        engine = tiny_engine(checkpoint, prefix_caching=False)
        results.append(generate(engine, [prompt])[0].token_ids)
        engine.close()
    return results


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> list[list[int]]:
    return solo_outputs(tiny_checkpoint, PROMPTS)


def record_batches(engine: Engine) -> list[ScheduledBatch]:
    """Wrap the engine's scheduler so every batch it hands out is kept for inspection."""
    batches: list[ScheduledBatch] = []
    schedule = engine.scheduler.schedule

    def recording() -> ScheduledBatch:
        batch = schedule()
        batches.append(batch)
        return batch

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    return batches


def test_reference_output_depends_on_the_prompt(reference: list[list[int]]) -> None:
    """Sanity: the tiny model is not degenerate, so equality below means something."""
    assert len({tuple(r) for r in reference}) == len(reference)
    assert all(len(set(r)) > 4 for r in reference)


def test_batch_invariance(tiny_checkpoint: Path, reference: list[list[int]]) -> None:
    """A request's greedy tokens alone equal its tokens inside a batch of mixed lengths,
    also when requests join the running batch mid-way."""
    engine = tiny_engine(tiny_checkpoint, prefix_caching=False)
    assert [r.token_ids for r in generate(engine, PROMPTS)] == reference
    runs: dict[str, Finished] = {}
    first = engine.add_request(PROMPTS[0], GREEDY)
    record(runs, engine.step())
    record(runs, engine.step())
    rest = [engine.add_request(p, GREEDY) for p in PROMPTS[1:]]
    drain(engine, runs)
    assert [runs[i].token_ids for i in [first, *rest]] == reference


@pytest.mark.parametrize("budget", [16, 7])
def test_chunked_prefill_matches_one_shot(
    tiny_checkpoint: Path, reference: list[list[int]], budget: int
) -> None:
    """With a token budget far below the longest prompt, prefills are cut into chunks
    (never more than `budget` tokens a step) and greedy output is unchanged."""
    engine = tiny_engine(tiny_checkpoint, prefix_caching=False, max_num_batched_tokens=budget)
    batches = record_batches(engine)
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    runs = drain(engine)
    assert [runs[i].token_ids for i in ids] == reference
    assert all(0 < b.total_tokens <= budget for b in batches if b)
    # the longest prompt's chunks, in step order, until its prompt is complete
    prompt_len = len(engine.tokenizer.encode(PROMPTS[3]))  # type: ignore[union-attr, arg-type]
    chunks = [
        n
        for b in batches
        for r, n in zip(b.requests, b.num_tokens, strict=True)
        if r.request_id == ids[3]
    ]
    done, steps = 0, 0
    while done < prompt_len:
        done += chunks[steps]
        steps += 1
    assert done == prompt_len and steps >= -(-prompt_len // budget) > 1


def test_long_prompt_is_chunked_beside_running_decodes(tiny_checkpoint: Path) -> None:
    """A long prompt arriving while another request decodes is prefilled in chunks: the
    decode keeps getting its token every step, and the long request comes out unchanged."""
    long_prompt = PROMPTS[3]
    solo = solo_outputs(tiny_checkpoint, [long_prompt])[0]
    engine = tiny_engine(tiny_checkpoint, prefix_caching=False, max_num_batched_tokens=16)
    batches = record_batches(engine)
    runs: dict[str, Finished] = {}
    short = engine.add_request("Hi", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    record(runs, engine.step())
    record(runs, engine.step())
    long_id = engine.add_request(long_prompt, GREEDY)
    drain(engine, runs)
    assert runs[long_id].token_ids == solo
    decoding = [b for b in batches[2:] if len(b) == 2]
    assert len(decoding) > 5, "the long prompt should take several chunked steps"
    for batch in decoding:
        assert batch.requests[0].request_id == short and batch.num_tokens[0] == 1
    assert len(runs[short].token_ids) == 40


@pytest.mark.parametrize("prefix_caching", [False, True])
@pytest.mark.parametrize("seed", [None, 5], ids=["greedy", "seeded"])
def test_preemption_by_recompute_keeps_outputs(
    tiny_checkpoint: Path, prefix_caching: bool, seed: int | None
) -> None:
    """Four requests that together need about twice the KV cache: the scheduler preempts
    (latest arrival first) and recomputes, and every output, greedy or seeded sampling,
    equals the unconstrained run; afterwards every block is back."""
    prompts: list[str | list[int]] = [list(range(200 + 10 * i, 220 + 10 * i)) for i in range(4)]
    temperature = 0.0 if seed is None else 1.0
    params = SamplingParams(temperature=temperature, seed=seed, max_tokens=36, ignore_eos=True)
    free_engine = tiny_engine(tiny_checkpoint, prefix_caching=prefix_caching)
    expected = [r.token_ids for r in generate(free_engine, prompts, params)]
    engine = tiny_engine(
        tiny_checkpoint, prefix_caching=prefix_caching, max_model_len=100, **SMALL_CACHE
    )
    idle = used_blocks(engine)
    ids = [engine.add_request(p, params) for p in prompts]
    requests = [engine.request(i) for i in ids]
    runs = drain(engine, max_steps=1000)
    assert [runs[i].token_ids for i in ids] == expected
    assert all(runs[i].finish_reason is FinishReason.LENGTH for i in ids)
    preemptions = [r.num_preemptions for r in requests if r is not None]
    assert sum(preemptions) > 0 and preemptions[0] == 0, preemptions
    engine.kv.check_integrity()
    engine.kv_cache.check_integrity()
    engine.kv.reset_prefix_cache()
    assert used_blocks(engine) == idle


def test_max_model_len_is_checked_against_the_page_limit(tiny_checkpoint: Path) -> None:
    """The engine refuses a max_model_len beyond what its page limit lets the cache map
    (124 tokens here, though the address space has room for 156), and serves a request
    of exactly the limit: it never accepts a request it can only wait on forever."""
    with pytest.raises(ValueError, match="max_model_len 125 exceeds the KV cache's 124 tokens"):
        tiny_engine(tiny_checkpoint, max_model_len=125, **SMALL_CACHE)
    engine = tiny_engine(tiny_checkpoint, max_model_len=124, **SMALL_CACHE)
    request_id = engine.add_request(list(range(300, 420)), SamplingParams(max_tokens=50))
    run = drain(engine, max_steps=50)[request_id]
    assert len(run.token_ids) == 4 and run.finish_reason is FinishReason.LENGTH


def test_prefix_cache_hit_gives_the_same_output(tiny_checkpoint: Path) -> None:
    """A second request sharing a long prefix with a finished one reuses its cached full
    blocks (num_cached_tokens > 0) and produces what an uncached engine produces."""
    shared = list(range(2000, 2070))  # 4 full 16-token blocks + 6
    prompts: list[str | list[int]] = [[*shared, 5, 6, 7], [*shared, 9, 10]]
    expected = solo_outputs(tiny_checkpoint, prompts)
    engine = tiny_engine(tiny_checkpoint)
    first = generate(engine, prompts[:1])[0]
    assert first.num_cached_tokens == 0 and first.token_ids == expected[0]
    assert engine.kv.num_evictable > 0
    second = generate(engine, prompts[1:])[0]
    assert second.num_cached_tokens == 64
    assert second.token_ids == expected[1]
    assert engine.kv.hits == 64
    engine.kv.check_integrity()
    engine.kv_cache.check_integrity()


def test_same_prompt_twice_leaves_one_token_to_compute(tiny_checkpoint: Path) -> None:
    """A prompt that is a whole number of blocks is never served entirely from cache:
    its last block is recomputed, so the first token still has logits."""
    prompt: list[int] = list(range(3000, 3032))  # exactly 2 blocks
    engine = tiny_engine(tiny_checkpoint)
    first, second = (generate(engine, [prompt])[0] for _ in range(2))
    assert second.num_cached_tokens == 16
    assert second.token_ids == first.token_ids


def test_cached_blocks_are_evicted_under_pressure(tiny_checkpoint: Path) -> None:
    """Cached blocks of finished requests are kept while there is room and evicted when
    other requests need the memory: the old prompt then misses the cache."""
    engine = tiny_engine(tiny_checkpoint, max_model_len=100, **SMALL_CACHE)
    old: list[int] = list(range(400, 440))  # 10 blocks of 4
    assert generate(engine, [old])[0].num_cached_tokens == 0
    cached = engine.kv.num_evictable
    assert cached >= 10
    assert generate(engine, [old])[0].num_cached_tokens == 36
    others: list[str | list[int]] = [list(range(500 + 90 * i, 580 + 90 * i)) for i in range(2)]
    generate(engine, others, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert generate(engine, [old])[0].num_cached_tokens == 0
    engine.kv.check_integrity()
    engine.kv_cache.check_integrity()


def test_prefix_shared_by_running_requests(tiny_checkpoint: Path) -> None:
    """Requests admitted after a prefix is committed share its blocks while all run at
    once, and each still equals its solo output."""
    shared = list(range(6000, 6048))
    prompts: list[str | list[int]] = [[*shared, i] for i in range(1, 5)]
    expected = solo_outputs(tiny_checkpoint, prompts)
    engine = tiny_engine(tiny_checkpoint)
    runs: dict[str, Finished] = {}
    first = engine.add_request(prompts[0], GREEDY)
    record(runs, engine.step())  # prefill commits the 3 shared full blocks
    rest = [engine.add_request(p, GREEDY) for p in prompts[1:]]
    record(runs, engine.step())
    held = [engine.request(i) for i in rest]
    tables = [r.block_ids[:3] for r in held if r is not None]
    assert len(tables) == 3 and all(t == tables[0] for t in tables)
    drain(engine, runs)
    assert [runs[i].token_ids for i in [first, *rest]] == expected
    assert all(runs[i].num_cached_tokens == 48 for i in rest)
    engine.kv.check_integrity()
