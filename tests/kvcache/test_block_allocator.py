"""BlockAllocator: blocks inside page groups, best fit, the padding block, misuse.

The allocator's contract is that block 0 is the padding block, reserved as soon as
group 0 is mapped (block 0 can never be freed); every allocator here follows it.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from prism.kvcache import BlockAllocator, BlockError, GroupState


def _mapped(num_groups: int, blocks_per_group: int) -> BlockAllocator:
    """Every group mapped, block 0 reserved for padding."""
    allocator = BlockAllocator(num_groups, blocks_per_group)
    for group in range(num_groups):
        allocator.map_group(group)
    allocator.reserve_padding()
    return allocator


def _group_of(blocks: list[int], bpg: int) -> set[int]:
    return {b // bpg for b in blocks}


def test_needs_at_least_one_group_of_one_block() -> None:
    """Empty geometries are refused."""
    for groups, bpg in ((0, 4), (4, 0)):
        with pytest.raises(ValueError):
            BlockAllocator(groups, bpg)


def test_blocks_come_only_from_mapped_groups() -> None:
    """An unmapped allocator has nothing; mapping a group adds its blocks, lowest first."""
    allocator = BlockAllocator(3, 4)
    assert allocator.allocate(1) is None and allocator.free_blocks == 0
    allocator.map_group(1)
    assert allocator.state(1) is GroupState.EMPTY and allocator.free_blocks == 4
    assert sorted(allocator.allocate(2) or []) == [4, 5]
    assert allocator.allocate(3) is None  # only 2 left, and nothing changed
    assert allocator.free_blocks == 2 and allocator.state(1) is GroupState.IN_USE
    assert allocator.allocate(0) == []
    allocator.check_integrity()


def test_best_fit_drains_the_lightly_used_group() -> None:
    """Allocations go to the fullest group, so a lightly used group empties and can go."""
    allocator = _mapped(3, 8)
    assert _group_of(allocator.allocate(7) or [], 8) == {0}  # 7: block 0 is padding
    assert allocator.allocate(1) == [8]  # group 0 is full: group 1 gets one block
    allocator.free([2, 5])  # group 0: 2 free; group 1: 7 free; group 2: 8 free
    for _ in range(2):
        block = allocator.allocate(1)
        assert block is not None and block[0] // 8 == 0
    allocator.free([8])
    assert allocator.state(1) is GroupState.EMPTY and allocator.empty_groups == 2
    allocator.unmap_group(1)
    assert allocator.state(1) is GroupState.UNMAPPED and allocator.free_blocks == 8
    allocator.check_integrity()


def test_best_fit_prefers_the_group_with_fewest_free_blocks() -> None:
    """Among partly used groups the one with the fewest free blocks is chosen."""
    allocator = _mapped(4, 4)
    allocator.allocate(15)
    allocator.free([1, 2, 3])  # group 0: 3 free
    allocator.free([4])  # group 1: 1 free
    allocator.free([8, 9])  # group 2: 2 free
    assert allocator.allocate(1) == [4]
    assert _group_of(allocator.allocate(2) or [], 4) == {2}
    assert _group_of(allocator.allocate(3) or [], 4) == {0}
    allocator.check_integrity()


def test_multi_block_allocation_fills_fullest_groups_first() -> None:
    """A large request drains the fullest groups first and opens empty ones last."""
    allocator = _mapped(4, 4)
    allocator.allocate(15)
    allocator.free([1, 2])  # group 0: 2 free
    allocator.free([4])  # group 1: 1 free
    allocator.free([12, 13, 14, 15])  # group 3 empty
    blocks = allocator.allocate(5)
    assert blocks is not None
    assert [b // 4 for b in blocks] == [1, 0, 0, 3, 3]
    assert allocator.empty_groups == 0 and allocator.free_blocks == 2
    allocator.check_integrity()


def test_empty_groups_open_lowest_first() -> None:
    """With no partly used group, the lowest empty group is opened."""
    allocator = _mapped(4, 4)
    allocator.allocate(3)  # group 0 is full
    allocator.unmap_group(1)
    assert allocator.allocate(1) == [8]
    allocator.check_integrity()


def test_padding_block_is_never_handed_out_or_freed() -> None:
    """Block 0 is taken for good: not allocated, not freeable, and group 0 never empties."""
    allocator = _mapped(2, 4)
    assert allocator.is_allocated(0) and allocator.free_blocks == 7
    blocks = allocator.allocate(7)
    assert blocks is not None and 0 not in blocks
    with pytest.raises(BlockError, match="out of range"):
        allocator.free([0])
    allocator.free(blocks)
    assert allocator.state(0) is GroupState.IN_USE and allocator.empty_groups == 1
    assert allocator.claim_empty(5) == [1]
    with pytest.raises(BlockError, match="not empty"):
        allocator.unmap_group(0)
    allocator.check_integrity()


def test_padding_needs_group_zero_mapped_and_free() -> None:
    """reserve_padding refuses before group 0 is mapped, and a second time."""
    allocator = BlockAllocator(2, 4)
    with pytest.raises(BlockError, match="padding"):
        allocator.reserve_padding()
    allocator.map_group(0)
    allocator.reserve_padding()
    with pytest.raises(BlockError, match="padding"):
        allocator.reserve_padding()
    assert allocator.allocate(1) == [1]
    allocator.check_integrity()


def test_padding_with_one_block_groups() -> None:
    """With one block per group the padding block fills group 0 completely."""
    allocator = _mapped(3, 1)
    assert allocator.free_blocks == 2 and allocator.empty_groups == 2
    assert sorted(allocator.allocate(2) or []) == [1, 2]
    allocator.check_integrity()


def test_double_free_and_out_of_range_raise_and_change_nothing() -> None:
    """Bad frees raise BlockError before touching anything."""
    allocator = _mapped(2, 4)
    blocks = allocator.allocate(3)
    assert blocks is not None
    allocator.free(blocks[:1])
    free_before = allocator.free_blocks
    bad_calls = (
        ([blocks[0]], "double free"),
        ([blocks[1], blocks[0]], "double free"),  # one good block, one already free
        ([blocks[1], blocks[1]], "twice in one call"),
        ([8], "out of range"),
        ([-1], "out of range"),
        ([6], "not allocated"),  # mapped but never handed out
    )
    for bad, match in bad_calls:
        with pytest.raises(BlockError, match=match):
            allocator.free(bad)
    assert allocator.free_blocks == free_before and allocator.is_allocated(blocks[1])
    allocator.check_integrity()


def test_group_transitions_are_checked() -> None:
    """Mapping a mapped group and unmapping a non-empty or unmapped one raise."""
    allocator = BlockAllocator(3, 4)
    allocator.map_group(1)
    with pytest.raises(BlockError, match="already mapped"):
        allocator.map_group(1)
    blocks = allocator.allocate(1)
    assert blocks is not None
    with pytest.raises(BlockError, match="not empty"):
        allocator.unmap_group(1)
    with pytest.raises(BlockError, match="UNMAPPED"):
        allocator.unmap_group(2)
    with pytest.raises(BlockError, match="not pending"):
        allocator.abandon([2])
    with pytest.raises(BlockError, match="not unmapped"):
        allocator.claim_one(1)
    allocator.free(blocks)
    allocator.unmap_group(1)
    allocator.check_integrity()


def test_claims_mark_groups_pending() -> None:
    """claim_unmapped takes the lowest unmapped groups, claim_empty the highest empty ones."""
    allocator = BlockAllocator(5, 2)
    assert allocator.claim_unmapped(2) == [0, 1]
    assert allocator.state(0) is GroupState.PENDING and allocator.free_blocks == 0
    allocator.map_group(0)
    allocator.reserve_padding()
    allocator.check_integrity()
    allocator.abandon([1])  # mapping failed
    allocator.map_group(3)  # a specific group, claimed on the way
    allocator.map_group(4)
    assert allocator.claim_unmapped(9) == [1, 2]
    allocator.abandon([1, 2])
    assert allocator.claim_empty(5) == [4, 3]  # group 0 holds the padding block
    assert allocator.free_blocks == 1 and allocator.mapped_groups == 1
    allocator.check_integrity()
    allocator.abandon([4, 3])  # unmapping finished
    assert allocator.claim_unmapped(1) == [1]
    allocator.abandon([1])
    allocator.check_integrity()


# ---- a model-checked random walk ---------------------------------------------------------


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/free/map/unmap/claim against a model of allocated blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.allocator = BlockAllocator(1, 1)
        self.bpg = 1
        self.allocated: set[int] = set()  # handed out by allocate, not yet freed
        self.mapped: set[int] = set()
        self.pending: set[int] = set()

    @initialize(groups=st.integers(2, 6), bpg=st.integers(1, 6))
    def setup(self, groups: int, bpg: int) -> None:
        self.allocator = BlockAllocator(groups, bpg)
        self.bpg = bpg
        self.allocator.map_group(0)  # as the KV cache does: group 0 holds the padding block
        self.allocator.reserve_padding()
        self.mapped.add(0)

    # ---- model ------------------------------------------------------------------------

    def _used(self, group: int) -> int:
        first = group * self.bpg
        used = sum(1 for b in range(first, first + self.bpg) if b in self.allocated)
        return used + (1 if group == 0 else 0)

    def _free_in(self, group: int) -> int:
        return self.bpg - self._used(group) if group in self.mapped else 0

    def _empty(self) -> list[int]:
        return sorted(g for g in self.mapped if self._used(g) == 0)

    def _unmapped(self) -> list[int]:
        return sorted(set(range(self.allocator.num_groups)) - self.mapped - self.pending)

    def _best_groups(self) -> set[int]:
        partly = {g: self._free_in(g) for g in self.mapped if 0 < self._free_in(g) < self.bpg}
        if partly:
            fewest = min(partly.values())
            return {g for g, free in partly.items() if free == fewest}
        return {min(self._empty())}

    # ---- rules --------------------------------------------------------------------------

    @rule(n=st.integers(1, 8))
    def allocate(self, n: int) -> None:
        free = sum(self._free_in(g) for g in self.mapped)
        best = self._best_groups() if free else set()
        before = {g: self._free_in(g) for g in self.mapped}
        blocks = self.allocator.allocate(n)
        if n > free:
            assert blocks is None
            return
        assert blocks is not None and len(blocks) == n == len(set(blocks))
        assert not self.allocated & set(blocks), "a block handed out twice"
        assert all(b // self.bpg in self.mapped for b in blocks)
        assert 0 not in blocks
        assert blocks[0] // self.bpg in best, "not best fit"
        self.allocated |= set(blocks)
        # All groups but the last one taken from are drained.
        touched = list(dict.fromkeys(b // self.bpg for b in blocks))
        assert all(self._free_in(g) == 0 for g in touched[:-1])
        assert all(self._free_in(g) == before[g] for g in self.mapped if g not in touched)

    @precondition(lambda self: bool(self.allocated))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        blocks = data.draw(st.lists(st.sampled_from(sorted(self.allocated)), unique=True))
        self.allocator.free(blocks)
        self.allocated -= set(blocks)

    @rule(block=st.integers(-1, 40))
    def bad_free(self, block: int) -> None:
        if block in self.allocated:
            with pytest.raises(BlockError):
                self.allocator.free([block, block])
        else:
            with pytest.raises(BlockError):
                self.allocator.free([block])

    @rule(data=st.data())
    def map_group(self, data: st.DataObject) -> None:
        candidates = self._unmapped() + sorted(self.pending)
        if not candidates:
            return
        group = data.draw(st.sampled_from(candidates))
        self.allocator.map_group(group)
        self.pending.discard(group)
        self.mapped.add(group)

    @rule(data=st.data())
    def unmap_group(self, data: st.DataObject) -> None:
        group = data.draw(st.integers(0, self.allocator.num_groups - 1))
        if group in self._empty():
            self.allocator.unmap_group(group)
            self.mapped.discard(group)
        else:
            with pytest.raises(BlockError):
                self.allocator.unmap_group(group)

    @rule(k=st.integers(0, 3))
    def claim_unmapped(self, k: int) -> None:
        expected = self._unmapped()[:k]
        assert self.allocator.claim_unmapped(k) == expected
        self.pending |= set(expected)

    @rule(k=st.integers(0, 3))
    def claim_empty(self, k: int) -> None:
        expected = self._empty()[::-1][:k]
        assert self.allocator.claim_empty(k) == expected
        self.pending |= set(expected)
        self.mapped -= set(expected)

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def abandon(self, data: st.DataObject) -> None:
        groups = data.draw(st.lists(st.sampled_from(sorted(self.pending)), unique=True))
        self.allocator.abandon(groups)
        self.pending -= set(groups)

    @invariant()
    def consistent(self) -> None:
        self.allocator.check_integrity()
        assert self.allocator.free_blocks == sum(self._free_in(g) for g in self.mapped)
        assert self.allocator.mapped_groups == len(self.mapped)
        assert self.allocator.empty_groups == len(self._empty())
        for group in range(self.allocator.num_groups):
            state = self.allocator.state(group)
            if group in self.pending:
                assert state is GroupState.PENDING
            elif group not in self.mapped:
                assert state is GroupState.UNMAPPED
            else:
                want = GroupState.IN_USE if self._used(group) else GroupState.EMPTY
                assert state is want
        for block in range(self.allocator.num_blocks):
            in_use = block in self.allocated or block == 0
            assert self.allocator.is_allocated(block) == in_use


AllocatorMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None
)
TestAllocatorMachine = AllocatorMachine.TestCase
