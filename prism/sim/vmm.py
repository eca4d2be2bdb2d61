"""`SimVMM`: a `VirtualMemory` that only keeps books, so the real `PagePool` runs in
the simulator. Handles are ints; reserving hands out address ranges that are never
backed; map and unmap check their arguments and record nothing else."""

from __future__ import annotations

from collections.abc import Sequence

from prism.memory.vmm import OutOfPhysicalMemory, Reservation, VirtualMemory, VMMError


class SimVMM(VirtualMemory):
    def __init__(
        self, page_size: int = 2 << 20, device: str = "sim:0", max_pages: int | None = None
    ):
        self._page_size = page_size
        self._device = device
        self.max_pages = max_pages  # physical pages the device has; None: no limit
        self.live = 0  # pages created and not released
        self._next_handle = 1
        self._next_base = page_size  # address 0 stays unused, like a null pointer

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def device(self) -> str:
        return self._device

    def reserve(self, size: int) -> Reservation:
        size = -(-size // self._page_size) * self._page_size
        base = self._next_base
        self._next_base += size
        return Reservation(base, size, self._device)

    def free_reservation(self, reservation: Reservation) -> None:
        return None

    def create(self) -> int:
        if self.max_pages is not None and self.live >= self.max_pages:
            raise OutOfPhysicalMemory("create", f"all {self.max_pages} pages exist")
        self.live += 1
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def release(self, handle: int) -> None:
        if not 0 < handle < self._next_handle:
            raise VMMError("release", f"unknown handle {handle}")
        self.live -= 1

    def map(self, address: int, handles: Sequence[int]) -> None:
        if address % self._page_size:
            raise VMMError("map", f"address {address:#x} is not page aligned")

    def unmap(self, address: int, num_pages: int) -> None:
        if address % self._page_size:
            raise VMMError("unmap", f"address {address:#x} is not page aligned")
