"""group_to_empty: the owners of the page group that is cheapest to empty."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from prism.kvcache.victims import group_to_empty


def test_prefers_the_group_with_least_to_recompute() -> None:
    """Groups of 4 blocks. Group 1 is one long request's alone (6 blocks held in all);
    group 2 is shared by two short ones (2 blocks each): emptying group 2 recomputes
    4 blocks against 6, though it preempts two requests against one."""
    blocks = {"long": [4, 5, 6, 7, 12, 13], "x": [8, 9], "y": [10, 11]}
    assert sorted(group_to_empty(blocks, 4)) == ["x", "y"]


def test_ties_go_to_fewer_owners_then_the_highest_group() -> None:
    assert group_to_empty({"a": [4, 5], "b": [8], "c": [9]}, 4) == ["a"]
    assert group_to_empty({"a": [4], "b": [8]}, 4) == ["b"]


def test_group_zero_never_empties() -> None:
    assert group_to_empty({"a": [1, 2]}, 4) == []
    assert group_to_empty({}, 4) == []


@given(st.dictionaries(st.integers(0, 20), st.lists(st.integers(1, 63), max_size=12), max_size=10))
def test_victims_free_a_group_at_least_cost(blocks: dict[int, list[int]]) -> None:
    """Preempting the victims empties some group other than 0, and no other group could
    be emptied by preempting owners holding fewer blocks."""
    per_group = 8
    victims = group_to_empty(blocks, per_group)
    owners: dict[int, set[int]] = {}
    for owner, ids in blocks.items():
        for block in ids:
            owners.setdefault(block // per_group, set()).add(owner)
    owners.pop(0, None)
    if not owners:
        assert victims == []
        return
    assert set(victims) in owners.values()
    cost = sum(len(blocks[v]) for v in victims)
    assert cost == min(sum(len(blocks[o]) for o in group) for group in owners.values())
