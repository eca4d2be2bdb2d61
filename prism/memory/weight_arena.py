"""`WeightArena`: a model's weights in pool pages, so one ledger covers all its memory.

The arena lays named tensors out in one reserved range (each aligned to 256 bytes) and
maps all of its pages at once when the model is resident. Unmapping gives every page
back to the pool while the address range — and so every tensor view and every CUDA
graph that reads the weights — stays valid for the next `materialize`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from prism.memory.elastic_tensor import ElasticTensor
from prism.memory.page_pool import PagePool
from prism.memory.tenant import ReclaimLevel
from prism.memory.tensor_view import typed_view

_ALIGN = 256


@dataclass(frozen=True, slots=True)
class WeightSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


def layout(specs: Sequence[WeightSpec]) -> tuple[list[int], int]:
    """Byte offset of each tensor in an arena, and the arena's size."""
    offsets: list[int] = []
    end = 0
    for spec in specs:
        offsets.append(end)
        end += -(-spec.nbytes // _ALIGN) * _ALIGN
    return offsets, end


def views_over(flat: torch.Tensor, specs: Sequence[WeightSpec]) -> dict[str, torch.Tensor]:
    """Typed views of a flat uint8 buffer laid out as an arena of `specs` lays it out:
    a host copy in this layout is copied into the arena in large contiguous runs."""
    offsets, end = layout(specs)
    if flat.dtype != torch.uint8 or flat.numel() < end:
        raise ValueError(f"need a uint8 buffer of at least {end} bytes, got {flat.numel()}")
    return {
        spec.name: typed_view(flat[off : off + spec.nbytes], spec.dtype, spec.shape)
        for spec, off in zip(specs, offsets, strict=True)
    }


class WeightArena:
    """Named weight tensors over one elastic range, resident or not as a whole."""

    def __init__(
        self, name: str, specs: Sequence[WeightSpec], pool: PagePool, *, priority: int = 0
    ) -> None:
        self.name = name
        self.pool = pool
        offsets, end = layout(specs)
        self.nbytes = end
        self._range = ElasticTensor(pool.vmm, (max(end, 1),), torch.uint8)
        self.num_pages = self._range.num_pages
        # views[name] has the spec's shape and dtype; valid to touch only while resident
        self.views = views_over(self._range.tensor, specs)
        # (first page past the tensor's end, name) in layout order: a tensor may be
        # written once every page up to that one is mapped
        self._ends = [
            (-(-(off + spec.nbytes) // self._range.page_size), spec.name)
            for spec, off in zip(specs, offsets, strict=True)
        ]
        self._lock = threading.Lock()
        # Called when the pool must take this arena's live pages (the worker sleeps the
        # model, then calls `evict`); returns pages released.
        self.on_pressure: Callable[[int], int] | None = None
        self.account = pool.register(
            name, max_pages=self.num_pages, priority=priority, consumer=self
        )

    @property
    def resident(self) -> bool:
        return self._range.mapped_pages == self.num_pages

    def materialize(
        self,
        fill: Callable[[str, torch.Tensor], None] | None = None,
        chunk_pages: int = 32,
        *,
        source: torch.Tensor | None = None,
    ) -> bool:
        """Map every page; False if no memory. With `source` (a flat uint8 buffer in the
        arena's layout, see `views_over`), each run of `chunk_pages` pages is copied from
        it (asynchronously on the current stream) as soon as it is mapped, so the copy
        runs alongside the mapping of the pages after it and ends one run behind it.
        With `fill`, each tensor is handed to `fill(name, view)` once its pages are mapped."""
        if source is not None and source.numel() < self.nbytes:
            raise ValueError(f"{self.name}: source has {source.numel()} bytes, need {self.nbytes}")
        with self._lock:
            if self.resident:
                return True
            pages = self.pool.acquire(self.name, self.num_pages)
            if pages is None:
                return False
            ready = 0  # tensors handed to fill so far
            for first in range(0, self.num_pages, chunk_pages):
                self._range.map(first, pages[first : first + chunk_pages])
                mapped = min(first + chunk_pages, self.num_pages)
                if source is not None:
                    lo, hi = (
                        first * self._range.page_size,
                        min(mapped * self._range.page_size, self.nbytes),
                    )
                    self._range.tensor[lo:hi].copy_(source[lo:hi], non_blocking=True)
                while fill is not None and ready < len(self._ends):
                    end, name = self._ends[ready]
                    if end > mapped:
                        break
                    fill(name, self.views[name])
                    ready += 1
            return True

    def evict(self) -> int:
        """Unmap every page and give them back to the pool; returns pages released."""
        with self._lock:
            pages = self._range.unmap_all()
        self.pool.release(self.name, pages)
        return len(pages)

    # ---- PoolConsumer: weights hold no spare pages; live pages go only on pressure ----

    def reclaimable(self, level: ReclaimLevel) -> int:
        if level is ReclaimLevel.PRESSURE and self.on_pressure is not None:
            return self.account.num_owned
        return 0

    def shrink(self, pages: int, level: ReclaimLevel) -> int:
        if level is ReclaimLevel.PRESSURE and self.on_pressure is not None:
            return self.on_pressure(pages)
        return 0

    def refill_reserve(self) -> None:
        return None

    def close(self) -> None:
        if self._range.mapped_pages:
            self.evict()
        self._range.close()
        self.pool.unregister(self.name)
