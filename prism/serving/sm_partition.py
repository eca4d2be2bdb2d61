"""`SmPartitions`: fixed shares of a GPU's streaming multiprocessors, one per model.

A model given a share (`ModelSpec.sms`) runs every kernel — eager, Triton, and the CUDA
graphs captured on its stream — on those SMs only, whatever the other models do: a
static partition of the GPU's compute, as a provider that dedicates a slice of a GPU to
each model would run it (MIG-style isolation, at SM granularity). It is the opposite of
Prism's sharing and exists for that comparison and for isolation where a model must keep
its compute under any load. Built on the CUDA driver's green contexts (CUDA 12.4+): the
device's SM resource is split into groups, each green context gets some, and a stream of
that green context is handed to torch as an external stream. Memory is not partitioned
by this (the page pool does that); a green context shares the device's address space.

The device is split once into granules of its granularity (8 SMs on Hopper: the driver
makes 15 granules of the H200's 132 SMs, 12 left out); a share is a set of granules, in the order
models arrive, and a model removed frees its granules for the next.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("prism.serving")


class SmPartitionError(RuntimeError):
    """A share could not be made: the driver call and its reason, or too few SMs left."""


def proportional_sms(
    demands: dict[str, float], total: int, granularity: int, minimum: int | None = None
) -> dict[str, int]:
    """Split `total` SMs over models in proportion to their demand (e.g. FLOPs per
    second each is expected to need), in multiples of `granularity`, each at least
    `minimum` (default: one granule); largest remainders take the granules left over."""
    minimum = max(granularity, minimum or granularity)
    granules, floor = total // granularity, -(-minimum // granularity)
    if floor * len(demands) > granules:
        raise SmPartitionError(
            f"{len(demands)} models of at least {minimum} SMs do not fit in {total} SMs"
        )
    weight = sum(max(0.0, d) for d in demands.values())
    spare = granules - floor * len(demands)
    exact = {n: spare * (max(0.0, d) / weight if weight else 1 / len(demands))
             for n, d in demands.items()}  # fmt: skip
    share = {n: floor + int(e) for n, e in exact.items()}
    left = granules - sum(share.values())
    for name in sorted(exact, key=lambda n: exact[n] - int(exact[n]), reverse=True)[:left]:
        share[name] += 1
    return {n: g * granularity for n, g in share.items()}


class SmPartitions:
    """The SMs of one CUDA device, handed out in fixed shares (see the module doc)."""

    def __init__(self, device: str) -> None:
        from cuda.bindings import driver

        self._cu = driver
        index = self._index = torch.device(device).index or 0
        torch.cuda.init()  # the primary context exists before any green context
        self._dev = self._call("cuDeviceGet", driver.cuDeviceGet(index))
        sm_type = driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
        whole = self._call("cuDeviceGetDevResource", driver.cuDeviceGetDevResource(
            self._dev, sm_type))  # fmt: skip
        self.total = int(whole.sm.smCount)
        self.granularity = int(getattr(whole.sm, "smCoscheduledAlignment", 0) or 8)
        # The device split once into granules; a share is a set of them, and a model's
        # released share is free for the next.
        split = driver.cuDevSmResourceSplitByCount(
            self.total // self.granularity, whole, 0, self.granularity
        )
        granules, made, _ = self._call("cuDevSmResourceSplitByCount", split)
        # Fewer than total // granularity where the SMs' clusters do not divide evenly
        # (an H200: 15 granules of 8, 12 SMs left out); those left out stay idle.
        self._granules = list(granules[:made])
        self.usable = len(self._granules) * self.granularity
        self._free = list(range(len(self._granules)))
        self._shares: dict[str, tuple[list[int], Any, Any, torch.cuda.ExternalStream]] = {}
        self._retired: list[tuple[Any, Any, torch.cuda.ExternalStream]] = []

    @property
    def free(self) -> int:
        return len(self._free) * self.granularity

    def check(self, name: str, sms: int) -> int:
        """Granules a share of `sms` SMs for `name` takes (rounded up); raises
        `SmPartitionError` if it cannot be had."""
        if name in self._shares:
            raise SmPartitionError(f"model {name!r} already has an SM share")
        if sms < 1:
            raise SmPartitionError(f"model {name!r}: an SM share needs at least 1 SM, got {sms}")
        count = -(-sms // self.granularity)
        if count > len(self._free):
            raise SmPartitionError(
                f"model {name!r} asks for {sms} SMs; {self.free} of the device's "
                f"{self.total} are left (shares are multiples of {self.granularity})"
            )
        return count

    def take(self, name: str, sms: int) -> torch.cuda.ExternalStream:
        """A stream whose kernels run on `sms` SMs (rounded up to the granularity) of
        the device's, for `name` alone. Raises `SmPartitionError` if too few are left."""
        count = self.check(name, sms)
        cu = self._cu
        granules = self._free[:count]
        resources = [self._granules[i] for i in granules]
        desc = self._call("cuDevResourceGenerateDesc", cu.cuDevResourceGenerateDesc(
            resources, len(resources)))  # fmt: skip
        flags = cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM
        green = self._call("cuGreenCtxCreate", cu.cuGreenCtxCreate(desc, self._dev, flags))
        non_blocking = cu.CUstream_flags.CU_STREAM_NON_BLOCKING
        raw = self._call("cuGreenCtxStreamCreate", cu.cuGreenCtxStreamCreate(
            green, non_blocking, 0))  # fmt: skip
        del self._free[:count]
        stream = torch.cuda.ExternalStream(int(raw), device=torch.device("cuda", self._index))
        self._shares[name] = (granules, green, raw, stream)
        log.info("%s: %d of %d SMs (%d left)", name, count * self.granularity, self.total,
                 self.free)  # fmt: skip
        return stream

    def sms_of(self, name: str) -> int:
        """SMs the share of `name` has, as the driver reports for its stream."""
        green = self._shares[name][1]
        sm_type = self._cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
        res = self._call("cuGreenCtxGetDevResource", self._cu.cuGreenCtxGetDevResource(
            green, sm_type))  # fmt: skip
        return int(res.sm.smCount)

    def release(self, name: str) -> None:
        """Free `name`'s granules for the next share. Its green context and stream stay
        (idle) for the life of the process: torch's pinned-memory cache records an event
        on every stream a block was copied on when the block is freed, which may come
        after the model is gone, and recording on a destroyed stream aborts."""
        entry = self._shares.pop(name, None)
        if entry is None:
            return
        granules, green, raw, stream = entry
        self._call("cuStreamSynchronize", self._cu.cuStreamSynchronize(raw))
        self._retired.append((green, raw, stream))
        self._free = sorted(self._free + granules)

    def close(self) -> None:
        for name in list(self._shares):
            self.release(name)

    def _call(self, call: str, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self._cu.CUresult.CUDA_SUCCESS:
            raise SmPartitionError(f"{call} failed: {getattr(err, 'name', err)}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else tuple(rest)
