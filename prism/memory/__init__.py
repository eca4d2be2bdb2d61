"""The balloon driver: virtual ranges, pooled physical pages, tenants.

Knows nothing of models. `CudaVMM` is imported lazily: only it needs the CUDA driver.
"""

from prism.memory.elastic_tensor import ElasticTensor
from prism.memory.host_vmm import HostVMM
from prism.memory.page_pool import PagePool, PoolEvent, PoolStats, TenantStats
from prism.memory.reclaim import DefaultReclaimPolicy, ReclaimPolicy, ReclaimStep
from prism.memory.tenant import (
    PageNotOwned,
    PoolConsumer,
    PoolError,
    ReclaimLevel,
    TenantAccount,
    TenantLimitExceeded,
    UnknownTenant,
)
from prism.memory.vmm import OutOfPhysicalMemory, Reservation, VirtualMemory, VMMError
from prism.memory.weight_arena import WeightArena, WeightSpec

__all__ = [
    "DefaultReclaimPolicy",
    "ElasticTensor",
    "HostVMM",
    "OutOfPhysicalMemory",
    "PageNotOwned",
    "PagePool",
    "PoolConsumer",
    "PoolError",
    "PoolEvent",
    "PoolStats",
    "ReclaimLevel",
    "ReclaimPolicy",
    "ReclaimStep",
    "Reservation",
    "TenantAccount",
    "TenantLimitExceeded",
    "TenantStats",
    "UnknownTenant",
    "VMMError",
    "VirtualMemory",
    "WeightArena",
    "WeightSpec",
    "make_vmm",
]


def make_vmm(device: str = "cpu", page_size: int | None = None) -> VirtualMemory:
    """The backend for `device`: "cpu" → HostVMM, "cuda" / "cuda:N" → CudaVMM."""
    if device == "cpu":
        return HostVMM(page_size or 2 << 20)
    if device.startswith("cuda"):
        from prism.memory.cuda_vmm import CudaVMM

        index = int(device.split(":")[1]) if ":" in device else 0
        return CudaVMM(index)
    raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda[:N]'")
