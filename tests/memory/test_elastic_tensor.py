"""ElasticTensor: a fixed-address tensor whose pages are mapped and unmapped underneath."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch

from prism.memory import ElasticTensor, HostVMM, VMMError

PAGE = 64 << 10
ROW = PAGE // 4  # float32 elements per page


class CountingVMM(HostVMM):
    """The real host backend, counting its map and unmap calls."""

    def __init__(self, page_size: int) -> None:
        super().__init__(page_size)
        self.map_calls: list[tuple[int, int]] = []  # (address, pages)
        self.unmap_calls: list[tuple[int, int]] = []

    def map(self, address: int, handles: Sequence[int]) -> None:
        self.map_calls.append((address, len(handles)))
        super().map(address, handles)

    def unmap(self, address: int, num_pages: int) -> None:
        self.unmap_calls.append((address, num_pages))
        super().unmap(address, num_pages)


@pytest.fixture
def vmm() -> Iterator[CountingVMM]:
    backend = CountingVMM(PAGE)
    yield backend
    backend.close()


def _mapped_ranges() -> list[tuple[int, int]]:
    with open("/proc/self/maps") as f:
        return [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in f]  # type: ignore[misc]


def test_shape_and_size(vmm: CountingVMM) -> None:
    """The tensor has the asked shape and dtype over a whole-page reservation."""
    t = ElasticTensor(vmm, (3, 1000), torch.float32)
    assert t.tensor.shape == (3, 1000) and t.tensor.dtype == torch.float32
    assert t.nbytes == 12000 and t.num_pages == 1 and t.mapped_pages == 0
    assert t.tensor.data_ptr() == t.base and t.base % PAGE == 0
    assert t.close() == []


def test_map_and_unmap_runs(vmm: CountingVMM) -> None:
    """A run of handles maps in one backend call and comes back, in order, on unmap."""
    t = ElasticTensor(vmm, (6, ROW), torch.float32)
    handles = [vmm.create() for _ in range(3)]
    t.map(2, handles)
    assert vmm.map_calls == [(t.base + 2 * PAGE, 3)]
    assert t.mapped_pages == 3
    assert [t.is_mapped(p) for p in range(6)] == [False, False, True, True, True, False]
    assert [t.handle_at(p) for p in range(2, 5)] == handles
    t.tensor[2:5] = torch.arange(3, dtype=torch.float32)[:, None]
    assert t.unmap(2, 3) == handles
    assert vmm.unmap_calls == [(t.base + 2 * PAGE, 3)]
    assert t.mapped_pages == 0
    for h in handles:
        vmm.release(h)
    t.close()


def test_unmap_all_goes_run_by_run(vmm: CountingVMM) -> None:
    """unmap_all issues one unmap per contiguous run of mapped pages."""
    t = ElasticTensor(vmm, (8, ROW), torch.float32)
    handles = [vmm.create() for _ in range(5)]
    t.map(0, handles[:2])
    t.map(3, handles[2:4])
    t.map(7, handles[4:])
    assert sorted(t.unmap_all()) == sorted(handles)
    assert vmm.unmap_calls == [(t.base, 2), (t.base + 3 * PAGE, 2), (t.base + 7 * PAGE, 1)]
    assert t.mapped_pages == 0
    for h in handles:
        vmm.release(h)
    t.close()


def test_address_stays_put_across_unmap_and_remap(vmm: CountingVMM) -> None:
    """data_ptr never moves; a page mapped back holds what was written through the tensor."""
    t = ElasticTensor(vmm, (4, ROW), torch.float32)
    ptr = t.tensor.data_ptr()
    handles = [vmm.create() for _ in range(4)]
    t.map(0, handles)
    data = torch.randn(4, ROW)
    t.tensor.copy_(data)
    moved = t.unmap(1, 2)
    assert t.tensor.data_ptr() == ptr
    t.map(1, moved[::-1])  # swapped: the rows follow their pages
    assert t.tensor.data_ptr() == ptr
    assert torch.equal(t.tensor[1], data[2]) and torch.equal(t.tensor[2], data[1])
    assert torch.equal(t.tensor[0], data[0]) and torch.equal(t.tensor[3], data[3])
    for h in t.close():
        vmm.release(h)
    assert vmm.live_pages == 0


def test_page_moves_between_tensors(vmm: CountingVMM) -> None:
    """A page unmapped from one tensor carries its bytes into another."""
    a = ElasticTensor(vmm, (ROW,), torch.float32)
    b = ElasticTensor(vmm, (3, ROW), torch.float32)
    a.map(0, [vmm.create()])
    a.tensor.fill_(1.25)
    b.map(2, a.unmap(0))
    assert bool((b.tensor[2] == 1.25).all())
    for h in b.close() + a.close():
        vmm.release(h)


def test_double_map_raises_and_changes_nothing(vmm: CountingVMM) -> None:
    """Mapping over a mapped page is a VMMError from map; the first mapping stays."""
    t = ElasticTensor(vmm, (3, ROW), torch.float32)
    first, second, third = vmm.create(), vmm.create(), vmm.create()
    t.map(1, [first])
    with pytest.raises(VMMError, match="map failed: page 1"):
        t.map(0, [second, third])
    assert [t.handle_at(p) for p in range(3)] == [None, first, None]
    assert len(vmm.map_calls) == 1
    for h in [*t.close(), second, third]:
        vmm.release(h)


def test_unmap_of_unmapped_page_raises(vmm: CountingVMM) -> None:
    """Unmapping a range that is not fully mapped is a VMMError and unmaps nothing."""
    t = ElasticTensor(vmm, (3, ROW), torch.float32)
    with pytest.raises(VMMError, match="unmap"):
        t.unmap(0)
    h = vmm.create()
    t.map(0, [h])
    with pytest.raises(VMMError, match="not all mapped"):
        t.unmap(0, 2)
    assert t.handle_at(0) == h and vmm.unmap_calls == []
    for handle in t.close():
        vmm.release(handle)


def test_out_of_range_pages_raise_index_error(vmm: CountingVMM) -> None:
    """Page indices outside the reservation are refused before any backend call."""
    t = ElasticTensor(vmm, (2, ROW), torch.float32)
    h = vmm.create()
    with pytest.raises(IndexError):
        t.map(1, [h, h])
    with pytest.raises(IndexError):
        t.map(-1, [h])
    with pytest.raises(IndexError):
        t.unmap(2)
    assert vmm.map_calls == [] and vmm.unmap_calls == []
    vmm.release(h)
    t.close()


def test_close_returns_handles_and_frees_the_range(vmm: CountingVMM) -> None:
    """close unmaps everything, hands back the still-live handles and frees the range."""
    t = ElasticTensor(vmm, (4, ROW), torch.float32)
    handles = [vmm.create() for _ in range(3)]
    t.map(0, handles[:1])
    t.map(2, handles[1:])
    base, end = t.base, t.base + t.num_pages * PAGE
    assert any(lo <= base < hi for lo, hi in _mapped_ranges())
    assert sorted(t.close()) == sorted(handles)
    assert not any(lo < end and base < hi for lo, hi in _mapped_ranges())
    assert t.close() == []  # idempotent
    assert vmm.live_pages == 3  # handles outlive the tensor
    for h in handles:
        vmm.release(h)
