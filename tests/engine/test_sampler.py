"""`Sampler` on hand-made logits with fake requests, and every sampling parameter through
the engine on the tiny model."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from engine_helpers import fake_request, generate, tiny_engine

from prism.engine import Engine, SamplingParams
from prism.engine.request import Request
from prism.engine.sampler import Sampler

V = 8  # vocabulary of the hand-made logits
PROBS = [0.4, 0.3, 0.2, 0.1]  # a 4-token distribution with known cut-offs


def seeded(
    params: SamplingParams, seed: int, tokens: list[int] | None = None, prompt_len: int = 1
) -> Request:
    """A fake request with its own generator; tokens after `prompt_len` are its output."""
    req = fake_request(tokens or [0], params, prompt_len)
    req.generator = torch.Generator().manual_seed(seed)
    return req


def logits_of(probs: list[float]) -> torch.Tensor:
    """Logits [1, V] whose softmax is `probs` on the first tokens and 0 elsewhere."""
    row = torch.full((1, V), -math.inf)
    row[0, : len(probs)] = torch.tensor(probs).log()
    return row


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 400) -> Counter[int]:
    """Token counts from n independent seeded draws of one row."""
    sampler = Sampler()
    return Counter(sampler.sample(logits, [seeded(params, s)]).token_ids[0] for s in range(n))


def greedy_pick(
    logits: list[float], params: SamplingParams, tokens: list[int], prompt_len: int
) -> int:
    req = fake_request(tokens, params, prompt_len)
    return Sampler().sample(torch.tensor([logits]), [req]).token_ids[0]


# ---- choosing a token -----------------------------------------------------------------


def test_temperature_zero_is_argmax() -> None:
    """Greedy rows take the argmax, row by row, beside sampled rows in the same batch."""
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(temperature=0)
    reqs = [fake_request([1], greedy) for _ in range(5)]
    reqs[2] = seeded(SamplingParams(), 3)
    result = Sampler().sample(logits, reqs)
    for i in (0, 1, 3, 4):
        assert result.token_ids[i] == int(logits[i].argmax())
    assert result.logprobs == [None] * 5


@pytest.mark.parametrize(
    "params",
    [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0),
     SamplingParams(temperature=1e-4)],
    ids=["top_k=1", "top_p=1e-6", "min_p=1", "temperature=1e-4"],
)  # fmt: skip
def test_filters_that_leave_only_the_top_token(params: SamplingParams) -> None:
    """top_k=1, a tiny top_p, min_p=1 and a tiny temperature all sample the argmax."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1)) * 0.1
    assert set(draws(params, logits, 50)) == {int(logits.argmax())}


@pytest.mark.parametrize(
    "params",
    [SamplingParams(top_p=5e-324), SamplingParams(temperature=1e-38),
     SamplingParams(temperature=1e-38, top_p=5e-324, min_p=1.0),
     SamplingParams(repetition_penalty=1e-38), SamplingParams(repetition_penalty=5e-324)],
    ids=["top_p=denormal", "temperature=1e-38", "all-extreme", "penalty=1e-38",
         "penalty=denormal"],
)  # fmt: skip
def test_extreme_but_valid_parameters_still_draw_a_token(params: SamplingParams) -> None:
    """Values at the edge of float32 (a denormal top_p, a temperature that overflows the
    logits, a penalty that sends them to inf) still give a real token, never an error."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1)) * 10
    req = seeded(params, 0, tokens=[3, 7, 3], prompt_len=1)
    token = Sampler().sample(logits, [req]).token_ids[0]
    assert 0 <= token < 50
    if params.repetition_penalty == 1.0:  # no penalty: the argmax it tends to
        assert token == int(logits.argmax())


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.5), {0, 1}),  # 0.4 < 0.5, 0.4 + 0.3 reaches it
        (SamplingParams(top_p=0.75), {0, 1, 2}),
        (SamplingParams(min_p=0.4), {0, 1, 2}),  # keeps p >= 0.4 × 0.4
        (SamplingParams(min_p=0.7), {0, 1}),
        (SamplingParams(min_p=0.8), {0}),
        (SamplingParams(top_k=3, top_p=0.5), {0, 1}),
    ],
)
def test_truncation_keeps_exactly_the_expected_tokens(
    params: SamplingParams, allowed: set[int]
) -> None:
    """top_k, top_p and min_p keep exactly the tokens they should on PROBS."""
    assert set(draws(params, logits_of(PROBS))) == allowed


def test_temperature_one_follows_softmax() -> None:
    """At temperature 1 draws follow the softmax (each frequency within 5 sigma)."""
    n = 2000
    counts = draws(SamplingParams(), logits_of(PROBS), n)
    for token, p in enumerate(PROBS):
        assert abs(counts[token] / n - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_temperature_flattens_and_sharpens() -> None:
    """Higher temperature moves mass from the top token to the tail; lower does the
    opposite."""
    n = 1000
    cold = draws(SamplingParams(temperature=0.3), logits_of(PROBS), n)
    hot = draws(SamplingParams(temperature=3.0), logits_of(PROBS), n)
    assert cold[0] > 0.6 * n > 0.3 * n > hot[0]
    assert hot[3] > 0.15 * n > 0.01 * n > cold[3]


def test_seeded_draw_ignores_its_batch() -> None:
    """A request with its own generator draws the same token alone or beside others."""
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.5)
    alone = Sampler().sample(logits[1:2], [seeded(params, 11)]).token_ids
    others = [seeded(params, 5), seeded(params, 11), fake_request([0], params)]
    assert Sampler().sample(logits, others).token_ids[1] == alone[0]


# ---- penalties ------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    """Repetition penalty > 1 makes any token of the sequence (prompt included) less
    likely: positive logits are divided, negative ones multiplied."""
    p = SamplingParams(temperature=0, repetition_penalty=1.5)
    none = SamplingParams(temperature=0)
    # token 1 (2.0) is in the prompt; 2.0 / 1.5 < 1.5 (token 2)
    assert greedy_pick([0, 2.0, 1.5, 0], none, [1], 1) == 1
    assert greedy_pick([0, 2.0, 1.5, 0], p, [1], 1) == 2
    # token 1 (-1.0) is in the output; -1.0 * 1.5 < -1.2 (token 2)
    assert greedy_pick([-5, -1.0, -1.2, -5], none, [3, 1], 1) == 1
    assert greedy_pick([-5, -1.0, -1.2, -5], p, [3, 1], 1) == 2
    # a penalty below 1 rewards repeats
    assert (
        greedy_pick([0, 1.0, 1.5, 0], SamplingParams(temperature=0, repetition_penalty=0.5), [1], 1)
        == 1
    )


def test_frequency_penalty_scales_with_the_count() -> None:
    """frequency_penalty subtracts penalty × occurrences in the output (not the prompt)."""
    logits = [0, 2.0, 1.7, 0]
    p = SamplingParams(temperature=0, frequency_penalty=0.2)
    assert greedy_pick(logits, p, [0, 1], 1) == 1  # 2.0 - 0.2 > 1.7
    assert greedy_pick(logits, p, [0, 1, 1, 1], 1) == 2  # 2.0 - 0.6 < 1.7
    assert greedy_pick(logits, p, [1, 1, 1, 0], 3) == 1  # repeats in the prompt are free
    negative = SamplingParams(temperature=0, frequency_penalty=-0.5)
    assert greedy_pick([0, 1.0, 1.7, 0], negative, [0, 1, 1], 1) == 1  # 1.0 + 1.0 > 1.7


def test_presence_penalty_counts_once() -> None:
    """presence_penalty subtracts once for any token already in the output."""
    logits = [0, 2.0, 1.7, 0]
    small = SamplingParams(temperature=0, presence_penalty=0.2)
    assert greedy_pick(logits, small, [0, 1, 1, 1], 1) == 1  # 2.0 - 0.2 > 1.7
    large = SamplingParams(temperature=0, presence_penalty=0.4)
    assert greedy_pick(logits, large, [0, 1], 1) == 2  # 2.0 - 0.4 < 1.7
    assert greedy_pick(logits, large, [1, 0], 1) == 1  # only in the prompt


def test_penalties_shift_sampled_probabilities() -> None:
    """Penalties act before the draw too: a penalised seen token is drawn less often."""
    n = 600
    logits = logits_of(PROBS)
    plain = Counter(
        Sampler().sample(logits, [seeded(SamplingParams(), s, [0, 0])]).token_ids[0]
        for s in range(n)
    )
    penalised_params = SamplingParams(frequency_penalty=1.0)
    penalised = Counter(
        Sampler().sample(logits, [seeded(penalised_params, s, [5, 0])]).token_ids[0]
        for s in range(n)
    )
    assert penalised[0] < 0.6 * plain[0]


# ---- logprobs -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5])
def test_logprobs_are_those_of_the_raw_logits(n: int) -> None:
    """logprobs=n gives n (token, logprob) pairs, most likely first; the chosen token's
    logprob is log_softmax of the raw logits even when a penalty changed the choice."""
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(4)) * 3
    params = SamplingParams(temperature=0, logprobs=n, repetition_penalty=5.0)
    top = int(logits[0].argmax())
    reqs = [fake_request([top], params), seeded(SamplingParams(temperature=0.7, logprobs=n), 1)]
    result = Sampler().sample(logits, reqs)
    expected = torch.log_softmax(logits, dim=-1)
    assert result.token_ids[0] != top
    for row, (token, lp) in enumerate(zip(result.token_ids, result.logprobs, strict=True)):
        assert lp is not None and lp.token_id == token
        assert lp.logprob == pytest.approx(float(expected[row, token]), abs=1e-5)
        assert len(lp.top) == n
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        best = torch.topk(expected[row], n)
        assert [t for t, _ in lp.top] == best.indices.tolist()
        assert values == pytest.approx(best.values.tolist(), abs=1e-5)


# ---- through the engine ---------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Engine:
    return tiny_engine(tiny_checkpoint)


PROMPT = "Once upon a time"


def tokens(engine: Engine, params: SamplingParams, prompt: str = PROMPT) -> list[int]:
    return generate(engine, [prompt], params)[0].token_ids


def test_engine_filters_that_reduce_to_greedy(engine: Engine) -> None:
    """Through the engine, top_k=1, a tiny top_p and min_p=1 (at temperature 1, no seed)
    produce the greedy tokens."""
    greedy = tokens(engine, SamplingParams(temperature=0, max_tokens=12))
    for params in (
        SamplingParams(top_k=1, max_tokens=12),
        SamplingParams(top_p=1e-9, max_tokens=12),
        SamplingParams(min_p=1.0, max_tokens=12),
    ):
        assert tokens(engine, params) == greedy, params


def test_engine_seed_reproducible_and_varied(engine: Engine) -> None:
    """The same seed gives the same tokens; different seeds give different ones."""
    runs = {s: tokens(engine, SamplingParams(seed=s, max_tokens=12)) for s in (1, 2, 3)}
    assert tokens(engine, SamplingParams(seed=1, max_tokens=12)) == runs[1]
    assert len({tuple(r) for r in runs.values()}) == 3


def test_engine_seeded_output_independent_of_batch(engine: Engine) -> None:
    """A seeded request draws the same tokens alone or in a batch with unseeded and
    other seeded requests of other lengths."""
    params = SamplingParams(seed=42, temperature=0.9, top_p=0.95, max_tokens=12)
    alone = tokens(engine, params)
    batch = generate(
        engine,
        ["x", PROMPT, "A much longer prompt with more words in it than the others", PROMPT],
        [SamplingParams(max_tokens=12), params, SamplingParams(seed=7, max_tokens=20),
         SamplingParams(temperature=0, max_tokens=3)],
    )  # fmt: skip
    assert batch[1].token_ids == alone


def test_engine_repetition_penalty_reduces_repeats(engine: Engine) -> None:
    """A strong repetition penalty leaves fewer repeated tokens in a greedy output."""
    plain = tokens(engine, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    penalised = tokens(
        engine,
        SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, repetition_penalty=3.0),
    )
    assert len(set(penalised)) > len(set(plain))
    assert len(set(penalised)) == len(penalised)


def test_engine_logprobs_match_greedy_choice(engine: Engine) -> None:
    """Greedy with logprobs=3: every output token is the top entry of its logprobs."""
    run = generate(engine, [PROMPT], SamplingParams(temperature=0, max_tokens=8, logprobs=3))[0]
    lps = [lp for out in run.outputs for lp in out.logprobs]
    assert len(lps) == 8
    for token, lp in zip(run.token_ids, lps, strict=True):
        assert lp.token_id == token == lp.top[0][0]
        assert lp.logprob == lp.top[0][1] <= 0 and len(lp.top) == 3
