"""`EngineConfig.decode_ahead`: the next decode step launched before the step before is
read back gives the same tokens as stepping one at a time, for every kind of request;
requests that stop, run out of tokens or are aborted meanwhile lose nothing and leak no
block; the step is not launched ahead when it is not certain."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine_helpers import Finished, drain, generate, record, tiny_engine, used_blocks

from prism.engine import Engine, SamplingParams
from prism.engine.output import FinishReason

PROMPTS: list[str | list[int]] = [
    list(range(300, 340)),
    list(range(20, 23)),
    list(range(900, 1000)),
    list(range(50, 61)),
]


def _counting(engine: Engine) -> list[int]:
    """Counts the steps launched ahead (their batch sizes)."""
    launched: list[int] = []
    execute: Callable = engine.runner.execute_ahead

    def counted(requests, next_ids):  # type: ignore[no-untyped-def]
        launched.append(len(requests))
        return execute(requests, next_ids)

    engine.runner.execute_ahead = counted  # type: ignore[method-assign]
    return launched


def _tokens(runs: list[Finished]) -> list[tuple[list[int], FinishReason | None]]:
    return [(r.token_ids, r.finish_reason) for r in runs]


def test_ahead_gives_the_tokens_of_one_step_at_a_time(tiny_checkpoint: Path) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = generate(tiny_engine(tiny_checkpoint, decode_ahead=False), PROMPTS[:1], greedy)
    stop = plain[0].token_ids[9]  # a token the first prompt reaches: it stops there
    params = [
        SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop], ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.7, top_k=20, seed=3, max_tokens=17, ignore_eos=True),
    ]
    expected = generate(tiny_engine(tiny_checkpoint, decode_ahead=False), PROMPTS, params)
    engine = tiny_engine(tiny_checkpoint)
    idle = used_blocks(engine)
    launched = _counting(engine)
    got = generate(engine, PROMPTS, params)
    assert _tokens(got) == _tokens(expected)
    assert got[0].finish_reason is FinishReason.STOP and got[0].token_ids[-1] == stop
    assert len(got[0].token_ids) == plain[0].token_ids.index(stop) + 1  # nothing after it
    assert launched, "no step was launched ahead"
    assert not engine.has_unfinished()
    assert used_blocks(engine) - engine.kv.num_evictable == idle  # cached prefixes stay
    engine.kv.check_integrity()
    engine.kv_cache.check_integrity()


def test_abort_while_a_step_runs_ahead(tiny_checkpoint: Path) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    expected = generate(tiny_engine(tiny_checkpoint, decode_ahead=False), PROMPTS, params)
    engine = tiny_engine(tiny_checkpoint, prefix_caching=False)
    idle = used_blocks(engine)
    ids = [engine.add_request(p, params) for p in PROMPTS]
    runs: dict[str, Finished] = {}
    while engine._ahead is None:
        record(runs, engine.step())
    victim = engine.request(ids[2])
    assert victim is not None
    out = engine.abort(ids[2])
    assert out is not None and out.finish_reason is FinishReason.ABORT
    assert victim.block_ids, "freed while the step ahead still writes its KV"
    drain(engine, runs)
    assert victim.block_ids == []
    for i in (0, 1, 3):
        assert runs[ids[i]].token_ids == expected[i].token_ids
    assert used_blocks(engine) == idle
    engine.kv.check_integrity()


def test_aborting_everything_drains_the_step_ahead(tiny_checkpoint: Path) -> None:
    engine = tiny_engine(tiny_checkpoint, prefix_caching=False)
    idle = used_blocks(engine)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in PROMPTS[:2]]
    while engine._ahead is None:
        engine.step()
    for request_id in ids:
        engine.abort(request_id)
    assert engine._ahead is None and not engine.has_unfinished()
    assert used_blocks(engine) == idle


def test_no_step_ahead_when_it_is_not_certain(tiny_checkpoint: Path) -> None:
    """Penalties read the tokens so far, logprobs keep the step's logits, and a waiting
    request must be admitted first: none of them runs ahead."""
    cases = [
        SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, presence_penalty=0.5, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, logprobs=2, ignore_eos=True),
    ]
    for params in cases:
        engine = tiny_engine(tiny_checkpoint)
        launched = _counting(engine)
        generate(engine, PROMPTS[:2], params)
        assert launched == [], params
    engine = tiny_engine(tiny_checkpoint, max_num_seqs=1)  # the second one waits
    launched = _counting(engine)
    generate(engine, PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    steps_alone = len(launched)
    assert steps_alone > 0  # ahead once the first finished and the second ran alone


def test_blocks_filled_ahead_serve_prefix_hits(tiny_checkpoint: Path) -> None:
    """Blocks completed by steps launched ahead enter the prefix cache keyed by the right
    tokens: a follow-up prompt that extends a finished conversation hits them and gets
    the tokens it gets from a cold cache."""
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    first = list(range(400, 421))
    for ahead in (True, False):
        engine = tiny_engine(tiny_checkpoint, decode_ahead=ahead)
        (run,) = generate(engine, [first], params)
        follow = first + run.token_ids + [7, 8, 9]
        (hit,) = generate(engine, [follow], params)
        (cold,) = generate(tiny_engine(tiny_checkpoint, prefix_caching=False), [follow], params)
        assert hit.num_cached_tokens >= 48  # blocks written by decode steps are hits
        assert hit.token_ids == cold.token_ids, f"decode_ahead={ahead}"
