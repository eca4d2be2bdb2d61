"""Engine requests end to end on the tiny model: finish reasons, stop strings and stop
tokens, streaming text, input errors, abort, and the `LLM` offline API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from engine_helpers import GREEDY, Finished, drain, generate, record, tiny_engine, used_blocks

from prism.engine import LLM, Engine, EngineConfig, FinishReason, RequestStatus, SamplingParams
from prism.models import ModelConfig

UNICODE_PROMPTS = [
    "héllo wörld — naïve café, 世界 🙂👍🏽",
    "Écris un haïku sur la mer. 🌊 日本語のテキスト",
    "Ελληνικά, русский, العربية, עברית, हिन्दी",
]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Engine:
    return tiny_engine(tiny_checkpoint)


def full_run(engine: Engine, prompt: str, max_tokens: int = 24) -> Finished:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return generate(engine, [prompt], params)[0]


# ---- finish reasons -------------------------------------------------------------------


def test_max_tokens_finishes_with_length(engine: Engine) -> None:
    """max_tokens outputs exactly, finish_reason LENGTH, one output per token."""
    run = generate(engine, ["Count: one two"], SamplingParams(temperature=0, max_tokens=5))[0]
    assert len(run.token_ids) == 5 and run.finish_reason is FinishReason.LENGTH
    assert [len(o.new_token_ids) for o in run.outputs] == [1] * 5
    assert [o.finished for o in run.outputs] == [False] * 4 + [True]
    assert run.outputs[-1].num_output_tokens == 5


def test_max_model_len_finishes_with_length(tiny_checkpoint: Path) -> None:
    """Output stops with LENGTH when prompt + output reach max_model_len, whatever
    max_tokens says."""
    engine = tiny_engine(tiny_checkpoint, max_model_len=40)
    run = generate(engine, [list(range(100, 130))], SamplingParams(max_tokens=100))[0]
    assert len(run.token_ids) == 10 and run.finish_reason is FinishReason.LENGTH


def test_stop_token_ids(engine: Engine) -> None:
    """A stop token id ends the request with STOP at its first occurrence; the token is
    in the output ids but not in the text."""
    full = full_run(engine, "The weather today")
    stop_at = 6
    token = full.token_ids[stop_at]
    first = full.token_ids.index(token)
    params = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=(token,))
    run = generate(engine, ["The weather today"], params)[0]
    assert run.token_ids == full.token_ids[: first + 1]
    assert run.finish_reason is FinishReason.STOP
    assert engine.tokenizer is not None
    assert run.text == engine.tokenizer.decode(full.token_ids[:first])


@pytest.fixture(scope="module")
def eos_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with its config's eos_token_id set to a token the model
    produces greedily (its 4th output for "Hello"), so EOS handling is observable."""
    probe = tiny_engine(tiny_checkpoint)
    eos = full_run(probe, "Hello").token_ids[3]
    out = tmp_path_factory.mktemp("tiny-eos")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / name, out / name)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "eos_token_id": [2, eos]}))
    return out


def test_eos_stops_unless_ignored(tiny_checkpoint: Path, eos_checkpoint: Path) -> None:
    """The model's EOS ends a request with STOP (the EOS id is the last output id);
    ignore_eos runs on to max_tokens."""
    expected = full_run(tiny_engine(tiny_checkpoint), "Hello")
    engine = tiny_engine(eos_checkpoint)
    eos = expected.token_ids[3]
    first = expected.token_ids.index(eos)
    stopped = generate(engine, ["Hello"], SamplingParams(temperature=0, max_tokens=24))[0]
    assert stopped.token_ids == expected.token_ids[: first + 1]
    assert stopped.finish_reason is FinishReason.STOP
    ignored = generate(
        engine, ["Hello"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    )[0]
    assert ignored.token_ids == expected.token_ids
    assert ignored.finish_reason is FinishReason.LENGTH


# ---- stop strings ---------------------------------------------------------------------


def pick_stop(text: str, at: int, length: int = 3) -> tuple[str, str]:
    """A stop string taken from `text` near `at`, and the text before its first match."""
    stop = text[at : at + length]
    assert stop.strip(), "need a visible stop string"
    return stop, text[: text.index(stop)]


@pytest.mark.parametrize("prompt", ["Tell me a story", UNICODE_PROMPTS[0]])
def test_stop_string_cuts_the_text(engine: Engine, prompt: str) -> None:
    """A stop string from the middle of the greedy text: the text ends just before it,
    finish_reason STOP, and the streamed deltas add up to that text."""
    full = full_run(engine, prompt, max_tokens=30)
    stop, before = pick_stop(full.text, len(full.text) // 2)
    params = SamplingParams(temperature=0, max_tokens=30, stop=(stop,))
    run = generate(engine, [prompt], params)[0]
    assert run.text == before and run.finish_reason is FinishReason.STOP
    assert full.token_ids[: len(run.token_ids)] == run.token_ids
    assert len(run.token_ids) < len(full.token_ids)


def test_stop_string_included_on_request(engine: Engine) -> None:
    """include_stop_str_in_output keeps the stop string and cuts right after it."""
    full = full_run(engine, "Tell me a story", max_tokens=30)
    stop, before = pick_stop(full.text, len(full.text) // 3)
    params = SamplingParams(
        temperature=0, max_tokens=30, stop=(stop,), include_stop_str_in_output=True
    )
    run = generate(engine, ["Tell me a story"], params)[0]
    assert run.text == before + stop and run.finish_reason is FinishReason.STOP


def test_earliest_of_several_stop_strings_wins(engine: Engine) -> None:
    """With several stop strings the text is cut at the one that appears first in the
    text, whatever their order in `stop`; a stop string never appears in the output."""
    full = full_run(engine, "Tell me a story", max_tokens=30)
    early, before = pick_stop(full.text, len(full.text) // 4, length=2)
    late, _ = pick_stop(full.text, 3 * len(full.text) // 4, length=2)
    params = SamplingParams(temperature=0, max_tokens=30, stop=(late, early))
    run = generate(engine, ["Tell me a story"], params)[0]
    assert run.text == before
    assert late not in run.text and early not in run.text


def test_stop_string_is_never_streamed_half_written(engine: Engine) -> None:
    """Deltas released before a stop string completes never hold any of its prefix
    beyond what ends up in the final text."""
    full = full_run(engine, "Tell me a story", max_tokens=30)
    stop, before = pick_stop(full.text, len(full.text) // 2, length=6)
    run = generate(
        engine, ["Tell me a story"], SamplingParams(temperature=0, max_tokens=30, stop=(stop,))
    )[0]
    streamed = ""
    for out in run.outputs:
        streamed += out.text_delta
        assert before.startswith(streamed)
    assert streamed == before


# ---- streaming ------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", UNICODE_PROMPTS)
def test_streamed_deltas_equal_the_decoded_output(engine: Engine, prompt: str) -> None:
    """Random tokens include byte pieces of multi-byte characters: the deltas, joined,
    equal a full decode of the output ids."""
    run = full_run(engine, prompt, max_tokens=40)
    assert engine.tokenizer is not None
    assert run.text == engine.tokenizer.decode(run.token_ids)
    assert "".join(o.text_delta for o in run.outputs) == run.text


def test_batched_streams_stay_separate(engine: Engine) -> None:
    """Streams of requests in one batch do not mix: each equals its solo stream."""
    solo = [full_run(engine, p).text for p in UNICODE_PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    assert [r.text for r in generate(engine, UNICODE_PROMPTS, params)] == solo


# ---- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "prompt is empty"),
        ([], "prompt is empty"),
        ([5, -1, 6], r"prompt token ids must be in \[0, 49152\)"),
        ([5, 49152], r"prompt token ids must be in \[0, 49152\)"),
        (list(range(512)), "prompt has 512 tokens; this model takes at most 511"),
    ],
)
def test_bad_prompts_are_refused(engine: Engine, prompt: str | list[int], message: str) -> None:
    """Empty, out-of-vocabulary and over-long prompts raise ValueError saying why, and
    leave nothing behind in the engine."""
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, GREEDY)
    assert not engine.has_unfinished()


def test_prompt_of_max_model_len_minus_one_is_accepted(engine: Engine) -> None:
    """The longest prompt accepted leaves room for exactly one output token."""
    run = generate(engine, [list(range(511))], SamplingParams(max_tokens=8))[0]
    assert len(run.token_ids) == 1 and run.finish_reason is FinishReason.LENGTH


def test_duplicate_request_id_is_refused(engine: Engine) -> None:
    """A request id in use cannot be taken again; once finished it is free again."""
    engine.add_request("a", GREEDY, request_id="dup")
    with pytest.raises(ValueError, match="request id 'dup' is already in use"):
        engine.add_request("b", GREEDY, request_id="dup")
    drain(engine)
    engine.add_request("c", GREEDY, request_id="dup")
    drain(engine)


def test_text_prompt_needs_a_tokenizer() -> None:
    """A model without a tokenizer (a bare ModelConfig with random weights) takes token
    ids, and says so when given text."""
    config = ModelConfig(
        architecture="llama", vocab_size=256, hidden_size=32, intermediate_size=64,
        num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=256,
    )  # fmt: skip
    engine = Engine.create(
        config, config=EngineConfig(kv_cache_bytes=1 << 20, max_model_len=128), load_format="dummy"
    )
    with pytest.raises(ValueError, match="no tokenizer: pass token ids"):
        engine.add_request("hello", GREEDY)
    run = generate(engine, [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(run.token_ids) == 4 and run.text == ""


# ---- abort ----------------------------------------------------------------------------


def test_abort_frees_blocks_and_others_continue(tiny_checkpoint: Path) -> None:
    """Aborting a running request returns it finished with ABORT, gives its blocks back
    (at once, or after the step launched ahead that still writes into them), and the
    other requests finish exactly as they would have."""
    prompts: list[str | list[int]] = [list(range(700 + 40 * i, 740 + 40 * i)) for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = [r.token_ids for r in generate(tiny_engine(tiny_checkpoint), prompts, params)]
    engine = tiny_engine(tiny_checkpoint, prefix_caching=False)
    idle = used_blocks(engine)
    ids = [engine.add_request(p, params) for p in prompts]
    runs: dict[str, Finished] = {}
    for _ in range(5):
        record(runs, engine.step())
    victim = engine.request(ids[1])
    assert victim is not None and victim.status is RequestStatus.RUNNING
    held = len(victim.block_ids)
    before = used_blocks(engine)
    out = engine.abort(ids[1])
    assert out is not None and out.finished and out.finish_reason is FinishReason.ABORT
    assert out.new_token_ids == [] and out.num_output_tokens == 5
    if engine._ahead is None:
        assert used_blocks(engine) == before - held
    else:  # the step ahead holds them until it has run
        assert victim in engine._ahead.hold and used_blocks(engine) == before
        record(runs, engine.step())
    assert victim.block_ids == []
    assert engine.request(ids[1]) is None and engine.abort(ids[1]) is None
    drain(engine, runs)
    assert runs[ids[0]].token_ids == expected[0] and runs[ids[2]].token_ids == expected[2]
    assert len(runs[ids[1]].token_ids) == 5
    assert used_blocks(engine) == idle
    engine.kv.check_integrity()
    engine.kv_cache.check_integrity()


def test_abort_waiting_request(tiny_checkpoint: Path) -> None:
    """A request still waiting for a slot can be aborted; it never runs."""
    engine = tiny_engine(tiny_checkpoint, max_num_seqs=1)
    running = engine.add_request("first", GREEDY)
    waiting = engine.add_request("second", GREEDY)
    engine.step()
    req = engine.request(waiting)
    assert req is not None and req.status is RequestStatus.WAITING and not req.block_ids
    out = engine.abort(waiting)
    assert out is not None and out.finish_reason is FinishReason.ABORT
    runs = drain(engine)
    assert set(runs) == {running}
    assert engine.abort("never-added") is None


def test_close_releases_everything(tiny_checkpoint: Path) -> None:
    """close() aborts live requests, drops the prefix cache and gives the pool back."""
    engine = tiny_engine(tiny_checkpoint)
    generate(engine, ["cached prompt " * 8])
    engine.add_request("still running", GREEDY)
    engine.step()
    pool = engine.kv_cache.pool
    engine.close()
    assert not engine.has_unfinished() and engine.kv.num_evictable == 0
    assert pool.stats().owned_pages == 0


# ---- the offline API ------------------------------------------------------------------


def test_llm_generate_shapes(tiny_checkpoint: Path) -> None:
    """`LLM.generate` takes one text, one token-id list, or a list of either, with one
    SamplingParams or one per prompt, and answers in prompt order."""
    llm = LLM(str(tiny_checkpoint), config=EngineConfig(kv_cache_bytes=4 << 20, max_model_len=512))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    [single] = llm.generate("Hello", params)
    [from_ids] = llm.generate(single.prompt_token_ids, params)
    assert from_ids.token_ids == single.token_ids and from_ids.text == single.text
    mixed: list[str | list[int]] = ["Hello", [5, 6, 7]]
    outs = llm.generate(mixed, [params, SamplingParams(temperature=0, max_tokens=3)])
    assert outs[0].token_ids == single.token_ids and len(outs[1].token_ids) == 3
    assert [o.finish_reason for o in outs] == [FinishReason.LENGTH] * 2


def test_llm_generate_failure_leaves_no_requests_behind(tiny_checkpoint: Path) -> None:
    """When one prompt of a batch is refused, generate raises and the prompts before it
    do not linger: the next generate call works normally."""
    llm = LLM(str(tiny_checkpoint), config=EngineConfig(kv_cache_bytes=4 << 20, max_model_len=512))
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["fine", ""], GREEDY)
    with pytest.raises(ValueError):
        llm.generate(["a", "b"], [GREEDY])
    assert not llm.engine.has_unfinished()
    [out] = llm.generate("next", GREEDY)
    assert len(out.token_ids) == GREEDY.max_tokens
