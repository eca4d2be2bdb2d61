"""Whom to preempt when a model must give KV pages back: one rule for the engine and
the simulator.

Pages go back a page group at a time, and a group is free only when every request with
a block in it has let go. So the victims are the owners of one group: the group whose
owners hold the fewest blocks in all (what the engine must recompute for them), then the
one with the fewest owners, then the highest group. Group 0 holds the padding block and
never empties.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

Owner = TypeVar("Owner", bound=Hashable)


def group_to_empty(blocks: Mapping[Owner, Sequence[int]], blocks_per_group: int) -> list[Owner]:
    """The owners to preempt so that one more group empties (see the module), from each
    running request's block ids; [] when no group but group 0 is in use."""
    owners: dict[int, list[Owner]] = {}
    for owner, ids in blocks.items():
        for group in {block // blocks_per_group for block in ids}:
            owners.setdefault(group, []).append(owner)
    owners.pop(0, None)
    if not owners:
        return []

    def cost(group: int) -> tuple[int, int, int]:
        held = sum(len(blocks[o]) for o in owners[group])
        return held, len(owners[group]), -group

    return owners[min(owners, key=cost)]
