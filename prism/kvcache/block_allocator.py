"""Blocks inside page groups: the KV cache's bookkeeping, plain Python over ints.

The cache's block space is cut into page groups of `blocks_per_group` blocks; a group
is either unmapped, mapped and empty, or in use. Allocation is best-fit: it takes from
the in-use group with the fewest free blocks, so lightly used groups drain, become
empty and can go back to the pool. Block 0 is reserved (the padding block that padded
kernel reads hit), so group 0 is always mapped and never empty.
"""

from __future__ import annotations

import heapq
from enum import IntEnum


class GroupState(IntEnum):
    UNMAPPED = 0
    EMPTY = 1  # mapped, every block free
    IN_USE = 2  # mapped, at least one block allocated
    PENDING = 3  # being mapped or unmapped outside the cache's lock; holds no blocks


_EMPTY = int(GroupState.EMPTY)  # plain ints on the hot path: enum conversion costs
_IN_USE = int(GroupState.IN_USE)


class BlockError(RuntimeError):
    """Misuse of the block allocator: double free, a block out of range."""


class BlockAllocator:
    PADDING_BLOCK = 0

    def __init__(self, num_groups: int, blocks_per_group: int) -> None:
        if num_groups < 1 or blocks_per_group < 1:
            raise ValueError("need at least one group of at least one block")
        self.num_groups = num_groups
        self.blocks_per_group = blocks_per_group
        self.num_blocks = num_groups * blocks_per_group
        self._state = bytearray(num_groups)  # GroupState per group
        self._allocated = bytearray(self.num_blocks)  # 1 where a block is handed out
        self._free_lists: list[list[int]] = [[] for _ in range(num_groups)]
        # In-use groups by free-block count k (1 <= k < blocks_per_group). Bit k of
        # _nonempty is set iff _by_free[k] is non-empty: the best-fit group is then the
        # lowest set bit, found in O(1).
        self._by_free: list[set[int]] = [set() for _ in range(blocks_per_group + 1)]
        self._nonempty = 0
        self._empty: set[int] = set()
        self._unmapped = list(range(num_groups))  # min-heap: map low groups first
        self.free_blocks = 0  # free blocks in mapped groups
        self.mapped_groups = 0

    def reserve_padding(self) -> None:
        """Take block 0 for good, once group 0 is mapped; group 0 then never empties."""
        if self._state[0] == GroupState.UNMAPPED or self._allocated[self.PADDING_BLOCK]:
            raise BlockError("padding block needs group 0 mapped and block 0 free")
        self._free_lists[0].remove(self.PADDING_BLOCK)
        self._free_lists[0].append(self.PADDING_BLOCK)
        self._take(0, 1)

    # ---- groups --------------------------------------------------------------------

    @property
    def empty_groups(self) -> int:
        return len(self._empty)

    def state(self, group: int) -> GroupState:
        return GroupState(self._state[group])

    def claim_unmapped(self, count: int) -> list[int]:
        """Mark up to `count` of the lowest unmapped groups PENDING, for mapping."""
        claimed = [heapq.heappop(self._unmapped) for _ in range(min(count, len(self._unmapped)))]
        for group in claimed:
            self._state[group] = GroupState.PENDING
        return claimed

    def abandon(self, groups: list[int]) -> None:
        """PENDING groups whose mapping failed, or whose unmapping finished: UNMAPPED."""
        for group in groups:
            if self._state[group] != GroupState.PENDING:
                raise BlockError(f"group {group} is not pending")
            self._state[group] = GroupState.UNMAPPED
            heapq.heappush(self._unmapped, group)

    def map_group(self, group: int) -> None:
        """Record that `group`'s pages are now mapped: its blocks become free."""
        if self._state[group] == GroupState.UNMAPPED:
            self.claim_one(group)
        if self._state[group] != GroupState.PENDING:
            raise BlockError(f"group {group} is already mapped")
        first = group * self.blocks_per_group
        self._free_lists[group] = list(range(first + self.blocks_per_group - 1, first - 1, -1))
        self._state[group] = GroupState.EMPTY
        self._empty.add(group)
        self.free_blocks += self.blocks_per_group
        self.mapped_groups += 1

    def claim_one(self, group: int) -> None:
        """Mark one specific unmapped group PENDING."""
        if self._state[group] != GroupState.UNMAPPED:
            raise BlockError(f"group {group} is not unmapped")
        self._unmapped.remove(group)
        heapq.heapify(self._unmapped)
        self._state[group] = GroupState.PENDING

    def claim_empty(self, count: int) -> list[int]:
        """Take up to `count` empty groups, highest first, out of use: they turn PENDING
        (their blocks vanish) until `abandon` records them unmapped."""
        groups = sorted(self._empty, reverse=True)[:count]
        for group in groups:
            self.unmap_group(group, finish=False)
        return groups

    def unmap_group(self, group: int, *, finish: bool = True) -> None:
        """Record that an empty `group` is unmapped (finish=False: being unmapped)."""
        if self._state[group] != GroupState.EMPTY:
            raise BlockError(f"group {group} is not empty (state {self.state(group).name})")
        self._empty.discard(group)
        self._free_lists[group] = []
        self._state[group] = GroupState.PENDING
        self.free_blocks -= self.blocks_per_group
        self.mapped_groups -= 1
        if finish:
            self.abandon([group])

    # ---- blocks --------------------------------------------------------------------

    def allocate(self, count: int) -> list[int] | None:
        """`count` free blocks from mapped groups, best fit; None if there are too few."""
        if count > self.free_blocks:
            return None
        if count == 1:  # the decode path: one new block for one sequence
            group = self._best_group()
            free_list = self._free_lists[group]
            block = free_list.pop()
            self._allocated[block] = 1
            self._move(group, len(free_list) + 1, len(free_list))
            self.free_blocks -= 1
            return [block]
        blocks: list[int] = []
        while len(blocks) < count:
            group = self._best_group()
            blocks += self._take(group, count - len(blocks))
        return blocks

    def free(self, blocks: list[int]) -> None:
        allocated = self._allocated
        for block in blocks:
            if not 0 < block < self.num_blocks:
                raise BlockError(f"block {block} is out of range 1..{self.num_blocks - 1}")
            if not allocated[block]:
                raise BlockError(f"block {block} is not allocated (double free?)")
        if len(blocks) > 1 and len(set(blocks)) != len(blocks):
            raise BlockError("a block is freed twice in one call")
        bpg = self.blocks_per_group
        free_lists = self._free_lists
        self.free_blocks += len(blocks)
        if len(blocks) == 1:  # the common case: no per-group tally
            block = blocks[0]
            allocated[block] = 0
            group = block // bpg
            free_list = free_lists[group]
            free_list.append(block)
            self._move(group, len(free_list) - 1, len(free_list))
            return
        freed: dict[int, int] = {}  # group → blocks returned to it: re-filed once each
        for block in blocks:
            allocated[block] = 0
            group = block // bpg
            free_lists[group].append(block)
            freed[group] = freed.get(group, 0) + 1
        for group, count in freed.items():
            now_free = len(free_lists[group])
            self._move(group, now_free - count, now_free)

    def used_in_group(self, group: int) -> int:
        """Blocks of a mapped `group` handed out."""
        return self.blocks_per_group - len(self._free_lists[group])

    def is_allocated(self, block: int) -> bool:
        return bool(self._allocated[block])

    def _best_group(self) -> int:
        in_use = self._nonempty & ~1
        if in_use:
            k = (in_use & -in_use).bit_length() - 1
            return next(iter(self._by_free[k]))
        return min(self._empty)

    def _take(self, group: int, count: int) -> list[int]:
        free_list = self._free_lists[group]
        before = len(free_list)
        take = min(count, before)
        blocks = free_list[before - take :]
        del free_list[before - take :]
        for block in blocks:
            self._allocated[block] = 1
        self._move(group, before, before - take)
        self.free_blocks -= take
        return blocks

    def _move(self, group: int, old_free: int, new_free: int) -> None:
        """Re-file `group` after its free count went from old_free to new_free."""
        bpg = self.blocks_per_group
        if old_free == bpg:
            self._empty.discard(group)
            self._state[group] = _IN_USE
        elif old_free > 0:
            bucket = self._by_free[old_free]
            bucket.discard(group)
            if not bucket:
                self._nonempty &= ~(1 << old_free)
        if new_free == bpg:
            self._empty.add(group)
            self._state[group] = _EMPTY
        elif new_free > 0:
            self._by_free[new_free].add(group)
            self._nonempty |= 1 << new_free

    # ---- invariants ------------------------------------------------------------------

    def check_integrity(self) -> None:
        bpg = self.blocks_per_group
        free_total = 0
        for group in range(self.num_groups):
            state = self._state[group]
            free_list = self._free_lists[group]
            first = group * bpg
            allocated = sum(self._allocated[first : first + bpg])
            if state in (GroupState.UNMAPPED, GroupState.PENDING):
                assert not free_list and allocated == 0, f"unmapped group {group} has blocks"
                in_heap = group in self._unmapped
                assert in_heap == (state == GroupState.UNMAPPED), f"group {group}: heap drift"
                continue
            assert len(set(free_list)) == len(free_list), f"group {group}: a block free twice"
            assert all(first <= b < first + bpg for b in free_list), f"group {group}: stray block"
            assert all(not self._allocated[b] for b in free_list), "a free block is allocated"
            assert len(free_list) + allocated == bpg, f"group {group}: blocks lost"
            free_total += len(free_list)
            if state == GroupState.EMPTY:
                assert len(free_list) == bpg and group in self._empty, f"group {group}: not empty"
            else:
                assert 0 <= len(free_list) < bpg, f"group {group}: in use but empty"
                if free_list:
                    assert group in self._by_free[len(free_list)], f"group {group}: misfiled"
        assert free_total == self.free_blocks, f"free count {self.free_blocks} != {free_total}"
        if self._state[0] != GroupState.UNMAPPED:
            assert self._allocated[self.PADDING_BLOCK], "padding block is not reserved"
        mapped = sum(1 for s in self._state if s in (GroupState.EMPTY, GroupState.IN_USE))
        assert mapped == self.mapped_groups, "mapped group count drifted"
        for k in range(1, bpg):
            assert bool(self._nonempty >> k & 1) == bool(self._by_free[k]), f"bucket bit {k}"
