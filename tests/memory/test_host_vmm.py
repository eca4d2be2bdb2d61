"""HostVMM: real host virtual memory (memfd slots mapped with mmap) behind the VMM calls."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import pytest
import torch

from prism.memory import HostVMM, VMMError
from prism.memory.tensor_view import bytes_tensor, typed_view

PAGE = 64 << 10
MIB = 1 << 20


@pytest.fixture
def vmm() -> Iterator[HostVMM]:
    backend = HostVMM(PAGE)
    yield backend
    backend.close()


def _floats(address: int, pages: int) -> torch.Tensor:
    """The float32 view of `pages` pages at `address`."""
    raw = bytes_tensor(address, pages * PAGE, "cpu")
    return typed_view(raw, torch.float32, (pages, PAGE // 4))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _memfd_bytes(vmm: HostVMM) -> int:
    """Memory the backend's memfd really holds (allocated blocks, not its sparse size)."""
    return os.fstat(vmm._fd).st_blocks * 512


def test_reserve_rounds_up_and_aligns_to_the_page_size(vmm: HostVMM) -> None:
    """A reservation is whole pages long and starts on a page boundary."""
    for size in (1, PAGE, PAGE + 1, 5 * PAGE - 3):
        r = vmm.reserve(size)
        assert r.size == -(-size // PAGE) * PAGE
        assert r.base % PAGE == 0
        assert r.device == "cpu"
        vmm.free_reservation(r)


def test_reserve_aligns_large_pages() -> None:
    """With 2 MiB pages the base is 2 MiB aligned, beyond what mmap itself promises."""
    backend = HostVMM(2 * MIB)
    reservations = [backend.reserve(3 * MIB) for _ in range(4)]
    for r in reservations:
        assert r.base % (2 * MIB) == 0 and r.size == 4 * MIB
    for r in reservations:
        backend.free_reservation(r)
    backend.close()


def test_page_size_must_be_a_multiple_of_the_os_page() -> None:
    """Page sizes the kernel cannot map are refused up front."""
    for bad in (0, -PAGE, mmap.PAGESIZE + 1):
        with pytest.raises(ValueError, match="page_size"):
            HostVMM(bad)


def test_round_trip_keeps_data_when_a_page_moves(vmm: HostVMM) -> None:
    """Data written through a tensor survives unmap and a re-map at another address."""
    a = vmm.reserve(2 * PAGE)
    b = vmm.reserve(3 * PAGE)
    handles = [vmm.create(), vmm.create()]
    assert vmm.live_pages == 2
    vmm.map(a.base, handles)
    data = torch.randn(2, PAGE // 4)
    _floats(a.base, 2).copy_(data)
    vmm.unmap(a.base, 2)
    # Mapped in the other order, into the middle and end of another range.
    vmm.map(b.base + PAGE, handles[::-1])
    moved = _floats(b.base, 3)
    assert torch.equal(moved[1], data[1])
    assert torch.equal(moved[2], data[0])
    vmm.unmap(b.base + PAGE, 2)
    # And back home: still the same bytes.
    vmm.map(a.base, handles)
    assert torch.equal(_floats(a.base, 2), data)
    vmm.unmap(a.base, 2)
    for h in handles:
        vmm.release(h)
    assert vmm.live_pages == 0
    vmm.free_reservation(a)
    vmm.free_reservation(b)


def test_one_page_mapped_twice_shares_its_bytes(vmm: HostVMM) -> None:
    """A handle is the physical page itself: two mappings of it see the same memory."""
    a = vmm.reserve(PAGE)
    b = vmm.reserve(PAGE)
    h = vmm.create()
    vmm.map(a.base, [h])
    vmm.map(b.base, [h])
    _floats(a.base, 1).fill_(3.5)
    assert bool((_floats(b.base, 1) == 3.5).all())
    vmm.unmap(a.base, 1)
    vmm.unmap(b.base, 1)
    vmm.release(h)
    vmm.free_reservation(a)
    vmm.free_reservation(b)


def test_released_page_comes_back_zeroed(vmm: HostVMM) -> None:
    """Release really drops the memory: a slot created again reads as zeros."""
    r = vmm.reserve(PAGE)
    h = vmm.create()
    vmm.map(r.base, [h])
    _floats(r.base, 1).fill_(7.0)
    vmm.unmap(r.base, 1)
    vmm.release(h)
    again = vmm.create()
    assert again == h  # the slot is reused
    vmm.map(r.base, [again])
    assert int(torch.count_nonzero(_floats(r.base, 1))) == 0
    vmm.unmap(r.base, 1)
    vmm.release(again)
    vmm.free_reservation(r)


def test_ballooning_returns_memory_to_the_system() -> None:
    """Mapping 64 MiB of 2 MiB pages raises RSS by that much; unmap + release gives it back."""
    backend = HostVMM(2 * MIB)
    pages = 32  # 64 MiB
    r = backend.reserve(pages * 2 * MIB)
    rss0, shmem0, held0 = _status_kib("VmRSS"), _status_kib("RssShmem"), _memfd_bytes(backend)
    assert held0 == 0
    handles = [backend.create() for _ in range(pages)]
    assert _memfd_bytes(backend) == 64 * MIB  # created pages hold memory
    backend.map(r.base, handles)
    raw = bytes_tensor(r.base, r.size, "cpu")
    raw.fill_(0xA5)
    mapped_kib = 64 * 1024
    assert _status_kib("RssShmem") - shmem0 == mapped_kib
    assert _status_kib("VmRSS") - rss0 >= 0.95 * mapped_kib
    assert int(raw[::4096].eq(0xA5).all()) == 1

    backend.unmap(r.base, pages)
    # Unmapped: out of this process, but the pages (and their data) still exist.
    assert _status_kib("RssShmem") - shmem0 == 0
    assert _status_kib("VmRSS") - rss0 < 0.1 * mapped_kib
    assert _memfd_bytes(backend) == 64 * MIB
    for h in handles:
        backend.release(h)
    assert _memfd_bytes(backend) == 0  # released: the memory is back with the kernel
    assert backend.live_pages == 0
    backend.free_reservation(r)
    backend.close()


def test_release_of_an_unknown_handle_names_the_call(vmm: HostVMM) -> None:
    """Releasing a handle that was never created, or twice, is a VMMError from release."""
    with pytest.raises(VMMError, match="release") as info:
        vmm.release(12345)
    assert info.value.call == "release"
    h = vmm.create()
    vmm.release(h)
    with pytest.raises(VMMError, match="release failed"):
        vmm.release(h)
    assert vmm.live_pages == 0


def test_mapping_a_dead_handle_names_the_call(vmm: HostVMM) -> None:
    """A released (or never created) handle cannot be mapped."""
    r = vmm.reserve(PAGE)
    h = vmm.create()
    vmm.release(h)
    with pytest.raises(VMMError, match="map failed") as info:
        vmm.map(r.base, [h])
    assert info.value.call == "map"
    with pytest.raises(VMMError, match="not live"):
        vmm.map(r.base, [999])
    vmm.free_reservation(r)


def test_handles_are_distinct_and_counted(vmm: HostVMM) -> None:
    """Every live handle is unique; live_pages follows create and release."""
    handles = [vmm.create() for _ in range(10)]
    assert len(set(handles)) == 10 and vmm.live_pages == 10
    for h in handles[::2]:
        vmm.release(h)
    assert vmm.live_pages == 5
    fresh = [vmm.create() for _ in range(5)]
    assert set(fresh).isdisjoint(handles[1::2])
    for h in handles[1::2] + fresh:
        vmm.release(h)
    assert vmm.live_pages == 0
