"""The virtual-memory interface that the balloon driver is built on.

A backend reserves ranges of virtual addresses, creates physical pages ("handles"),
maps handles into reserved ranges and unmaps them again. Two real implementations
exist: `CudaVMM` (CUDA driver VMM) and `HostVMM` (mmap on host RAM). Handles outlive
their mappings, so a page can move from one range to another without being released
and created again: that is what makes pooled pages cheap.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


class VMMError(RuntimeError):
    """A virtual-memory call failed; the message names the call and the reason."""

    def __init__(self, call: str, reason: str) -> None:
        super().__init__(f"{call} failed: {reason}")
        self.call = call
        self.reason = reason


class OutOfPhysicalMemory(VMMError):
    """The backend could not create a physical page (the device or host is full)."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """A reserved range of virtual addresses: `size` bytes starting at `base`."""

    base: int  # first address of the range
    size: int  # bytes, a multiple of the backend's page size
    device: str  # "cpu" or "cuda:N": where tensors over this range live


class VirtualMemory(ABC):
    """Reserve, create, map, unmap, release — the five calls of a balloon driver.

    Handles are opaque ints owned by the backend. Every failure raises `VMMError`
    (or `OutOfPhysicalMemory` from `create`); nothing aborts the process.
    """

    @property
    @abstractmethod
    def page_size(self) -> int:
        """Bytes per physical page: the granularity of every map and unmap."""

    @property
    @abstractmethod
    def device(self) -> str:
        """Where the memory lives: "cpu" or "cuda:N"."""

    @abstractmethod
    def reserve(self, size: int) -> Reservation:
        """Reserve `size` bytes (rounded up to whole pages) of address space, unbacked."""

    @abstractmethod
    def free_reservation(self, reservation: Reservation) -> None:
        """Give back an address range; every page in it must be unmapped first."""

    @abstractmethod
    def create(self) -> int:
        """Create one physical page and return its handle."""

    @abstractmethod
    def release(self, handle: int) -> None:
        """Destroy a physical page; it must be mapped nowhere."""

    @abstractmethod
    def map(self, address: int, handles: Sequence[int]) -> None:
        """Map `handles` at consecutive pages starting at `address`, readable and writable.

        One call per contiguous run lets a backend batch its access-rights update.
        """

    @abstractmethod
    def unmap(self, address: int, num_pages: int) -> None:
        """Unmap `num_pages` consecutive pages starting at `address`; handles stay alive."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds for itself (not the pages of its users)."""
