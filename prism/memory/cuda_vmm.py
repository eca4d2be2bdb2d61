"""`CudaVMM`: the CUDA driver's virtual memory management, through `cuda.bindings`.

The module of Prism that talks to the CUDA driver for memory (`serving/sm_partition.py`
makes SM shares). Every call is checked and a failure raises `VMMError` naming the call
and the CUresult; out-of-memory from cuMemCreate raises `OutOfPhysicalMemory`, which the
page pool turns into "no memory". Access rights are set once per contiguous run of
pages, since cuMemSetAccess is the costly call.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from prism.memory.vmm import OutOfPhysicalMemory, Reservation, VirtualMemory, VMMError


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise VMMError(
            "import cuda.bindings", "not installed; install Prism with the `gpu` extra"
        ) from exc
    return driver


class CudaVMM(VirtualMemory):
    """Physical pages of one CUDA device, mapped into reserved virtual ranges."""

    def __init__(self, device_index: int = 0) -> None:
        self._cu = _driver()
        cu = self._cu
        try:
            init = cu.cuInit(0)
        except Exception as exc:  # the driver library itself is missing
            raise VMMError("cuInit", f"no CUDA driver: {exc}") from exc
        self._check("cuInit", init)
        self._dev = self._check("cuDeviceGet", cu.cuDeviceGet(device_index))
        self._ctx = self._check("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(self._dev))
        self._index = device_index
        self._local = threading.local()
        self._bind_context()

        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device_index
        self._prop = prop
        granularity = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        self._page_size = int(
            self._check(
                "cuMemGetAllocationGranularity",
                cu.cuMemGetAllocationGranularity(prop, granularity),
            )
        )
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device_index
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [access]
        self._handles: dict[int, Any] = {}  # int id -> CUmemGenericAllocationHandle
        self._lock = threading.Lock()

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def device(self) -> str:
        return f"cuda:{self._index}"

    @property
    def live_pages(self) -> int:
        return len(self._handles)

    def _check(self, call: str, result: Any) -> Any:
        """Unpack a cuda.bindings result tuple, raising on any CUresult but success."""
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self._cu.CUresult.CUDA_SUCCESS:
            name = getattr(err, "name", str(err))
            if err == self._cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
                raise OutOfPhysicalMemory(call, name)
            raise VMMError(call, name)
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else tuple(rest)

    def _bind_context(self) -> None:
        """Make the device's primary context current in this thread (once per thread)."""
        if getattr(self._local, "bound", False):
            return
        self._check("cuCtxSetCurrent", self._cu.cuCtxSetCurrent(self._ctx))
        self._local.bound = True

    def reserve(self, size: int) -> Reservation:
        self._bind_context()
        size = -(-size // self._page_size) * self._page_size
        ptr = self._check(
            "cuMemAddressReserve", self._cu.cuMemAddressReserve(size, self._page_size, 0, 0)
        )
        return Reservation(base=int(ptr), size=size, device=self.device)

    def free_reservation(self, reservation: Reservation) -> None:
        self._bind_context()
        self._check(
            "cuMemAddressFree", self._cu.cuMemAddressFree(reservation.base, reservation.size)
        )

    def create(self) -> int:
        self._bind_context()
        handle = self._check("cuMemCreate", self._cu.cuMemCreate(self._page_size, self._prop, 0))
        key = int(handle)
        with self._lock:
            self._handles[key] = handle
        return key

    def release(self, handle: int) -> None:
        self._bind_context()
        with self._lock:
            obj = self._handles.pop(handle, None)
        if obj is None:
            raise VMMError("cuMemRelease", f"page handle {handle} is not live")
        self._check("cuMemRelease", self._cu.cuMemRelease(obj))

    def map(self, address: int, handles: Sequence[int]) -> None:
        if not handles:
            return
        self._bind_context()
        cu_map, ok, page = self._cu.cuMemMap, self._cu.CUresult.CUDA_SUCCESS, self._page_size
        mapped = 0
        try:
            for handle in handles:
                obj = self._handles.get(handle)
                if obj is None:
                    raise VMMError("cuMemMap", f"page handle {handle} is not live")
                (err,) = cu_map(address + mapped * page, page, 0, obj, 0)
                if err != ok:
                    self._check("cuMemMap", (err,))
                mapped += 1
            size = len(handles) * page
            self._check("cuMemSetAccess", self._cu.cuMemSetAccess(address, size, self._access, 1))
        except VMMError:
            if mapped:  # leave nothing half-mapped behind
                self._cu.cuMemUnmap(address, mapped * page)
            raise

    def unmap(self, address: int, num_pages: int) -> None:
        self._bind_context()
        size = num_pages * self._page_size
        self._check("cuMemUnmap", self._cu.cuMemUnmap(address, size))

    def device_memory(self) -> tuple[int, int]:
        """(free, total) bytes on the device, as the driver reports them."""
        self._bind_context()
        free, total = self._check("cuMemGetInfo", self._cu.cuMemGetInfo())
        return int(free), int(total)
