"""`HostVMM`: the balloon driver's calls on host RAM, so CPU runs balloon for real.

Physical pages are slots of one memfd (a RAM-backed file): `create` allocates a slot's
memory with fallocate, `release` punches it out again, and `map`/`unmap` place a slot
at an address with mmap(MAP_FIXED). A page therefore keeps its data while unmapped and
can be mapped somewhere else, exactly like a CUDA physical allocation handle. Resident
memory rises on `create` + `map` and falls on `unmap` + `release`.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Sequence

from prism.memory.vmm import OutOfPhysicalMemory, Reservation, VirtualMemory, VMMError

_PROT_NONE = 0
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_MAP_POPULATE = 0x8000
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

# Slots live in one sparse file this large; only created slots hold memory.
_FILE_SPAN = 1 << 44


def _os_error(call: str) -> VMMError:
    code = ctypes.get_errno()
    return VMMError(call, f"{errno.errorcode.get(code, code)} ({os.strerror(code)})")


class HostVMM(VirtualMemory):
    """Host-RAM virtual memory with real reserve/commit/decommit semantics."""

    def __init__(self, page_size: int = 2 << 20) -> None:
        if page_size <= 0 or page_size % mmap.PAGESIZE:
            raise ValueError(f"page_size {page_size} is not a multiple of {mmap.PAGESIZE}")
        self._page_size = page_size
        self._fd = os.memfd_create("prism-pages", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, _FILE_SPAN)
        self._lock = threading.Lock()
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._live: set[int] = set()

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def live_pages(self) -> int:
        """Physical pages created and not yet released."""
        return len(self._live)

    def reserve(self, size: int) -> Reservation:
        size = -(-size // self._page_size) * self._page_size
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        # Over-reserve by one page so the range can be aligned to the page size.
        raw = _libc.mmap(None, size + self._page_size, _PROT_NONE, flags, -1, 0)
        if raw is None or raw == _MAP_FAILED:
            raise _os_error("mmap(reserve)")
        base = -(-raw // self._page_size) * self._page_size
        if base > raw:
            _libc.munmap(raw, base - raw)
        tail = raw + size + self._page_size - (base + size)
        if tail:
            _libc.munmap(base + size, tail)
        return Reservation(base=base, size=size, device="cpu")

    def free_reservation(self, reservation: Reservation) -> None:
        if _libc.munmap(reservation.base, reservation.size) != 0:
            raise _os_error("munmap")

    def create(self) -> int:
        with self._lock:
            slot = self._free_slots.pop() if self._free_slots else self._next_slot
            if slot == self._next_slot:
                self._next_slot += 1
        if _libc.fallocate(self._fd, 0, slot * self._page_size, self._page_size) != 0:
            code = ctypes.get_errno()
            with self._lock:
                self._free_slots.append(slot)
            reason = f"{errno.errorcode.get(code, code)} ({os.strerror(code)})"
            if code in (errno.ENOMEM, errno.ENOSPC):
                raise OutOfPhysicalMemory("fallocate(create)", reason)
            raise VMMError("fallocate(create)", reason)
        with self._lock:
            self._live.add(slot)
        return slot

    def release(self, handle: int) -> None:
        with self._lock:
            if handle not in self._live:
                raise VMMError("release", f"page handle {handle} is not live")
            self._live.discard(handle)
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self._fd, mode, handle * self._page_size, self._page_size) != 0:
            raise _os_error("fallocate(release)")
        with self._lock:
            self._free_slots.append(handle)

    def map(self, address: int, handles: Sequence[int]) -> None:
        flags = mmap.MAP_SHARED | _MAP_FIXED | _MAP_POPULATE
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        for i, handle in enumerate(handles):
            if handle not in self._live:
                raise VMMError("map", f"page handle {handle} is not live")
            at = address + i * self._page_size
            got = _libc.mmap(at, self._page_size, prot, flags, self._fd, handle * self._page_size)
            if got != at:
                raise _os_error("mmap(map)")

    def unmap(self, address: int, num_pages: int) -> None:
        # Replacing the range with a fresh PROT_NONE mapping drops the file pages from
        # this process and keeps the address range reserved.
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE
        size = num_pages * self._page_size
        if _libc.mmap(address, size, _PROT_NONE, flags, -1, 0) != address:
            raise _os_error("mmap(unmap)")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
