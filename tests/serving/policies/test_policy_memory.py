"""fair_kv_share and kv_to_lend: what a busy model gives another when the pool is dry."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from prism.serving.policies import KVClaim, fair_kv_share, kv_to_lend

pages = st.integers(min_value=0, max_value=10_000)
priorities = st.integers(min_value=-2, max_value=2)
claims = st.builds(KVClaim, priorities, pages, st.integers(min_value=1, max_value=64))


def test_fair_share_splits_what_the_weights_leave() -> None:
    """Budget 1,000 pages, weights 100 + 300: 600 left, 300 each; weights over the
    budget leave 0; nobody with work gets the whole budget less nothing."""
    assert fair_kv_share(1000, [100, 300]) == 300
    assert fair_kv_share(1000, [700, 400]) == 0
    assert fair_kv_share(1000, []) == 1000


@given(st.integers(0, 100_000), st.lists(pages, max_size=8))
def test_fair_shares_and_weights_fit_the_budget(budget: int, weights: list[int]) -> None:
    share = fair_kv_share(budget, weights)
    assert share >= 0
    if sum(weights) <= budget:
        assert share * max(1, len(weights)) + sum(weights) <= budget


def test_priority_decides_before_shares() -> None:
    """A lower-priority lender gives all that is asked, even below its share; a higher
    one gives nothing, even far above it; nobody acting takes nothing."""
    assert kv_to_lend(KVClaim(0, 10), KVClaim(1, 5000), share=100, wanted=40) == 40
    assert kv_to_lend(KVClaim(1, 5000), KVClaim(0, 0), share=100, wanted=40) == 0
    assert kv_to_lend(KVClaim(-1, 5000), None, share=100, wanted=40) == 0


def test_equals_give_only_their_excess_to_a_model_below_its_share() -> None:
    """Share 100: a lender holding 130 gives at most 30, and only while the taker holds
    less than 100."""
    assert kv_to_lend(KVClaim(0, 130), KVClaim(0, 20), share=100, wanted=50) == 30
    assert kv_to_lend(KVClaim(0, 130), KVClaim(0, 20), share=100, wanted=10) == 10
    assert kv_to_lend(KVClaim(0, 130), KVClaim(0, 100), share=100, wanted=50) == 0
    assert kv_to_lend(KVClaim(0, 90), KVClaim(0, 20), share=100, wanted=50) == 0


def test_equals_lend_whole_groups_of_their_excess() -> None:
    """Groups of 8 pages, share 100: an excess of 7 is less than a group — giving a group
    would put the lender below its share, to take it back next — so nothing; an excess
    of 20 lends up to 16, two groups."""
    assert kv_to_lend(KVClaim(0, 107, 8), KVClaim(0, 20), share=100, wanted=50) == 0
    assert kv_to_lend(KVClaim(0, 120, 8), KVClaim(0, 20), share=100, wanted=50) == 16
    assert kv_to_lend(KVClaim(0, 120, 8), KVClaim(0, 20), share=100, wanted=3) == 3


@given(claims, claims, pages, pages)
def test_lending_invariants(lender: KVClaim, taker: KVClaim, share: int, wanted: int) -> None:
    """Never more than asked; between equals the lender keeps its share even when it
    frees whole groups, and a taker at its share gets nothing; a higher-priority lender
    never gives."""
    lent = kv_to_lend(lender, taker, share, wanted)
    assert 0 <= lent <= wanted
    if lender.priority > taker.priority:
        assert lent == 0
    elif lender.priority == taker.priority and lent:
        group = lender.group_pages
        assert lender.kv_pages - -(-lent // group) * group >= share
        assert taker.kv_pages < share
