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


class WeightArena:
    """Named weight tensors over one elastic range, resident or not as a whole."""

    def __init__(
        self, name: str, specs: Sequence[WeightSpec], pool: PagePool, *, priority: int = 0
    ) -> None:
        self.name = name
        self.pool = pool
        offsets: list[int] = []
        end = 0
        for spec in specs:
            offsets.append(end)
            end += -(-spec.nbytes // _ALIGN) * _ALIGN
        self.nbytes = end
        self._range = ElasticTensor(pool.vmm, (max(end, 1),), torch.uint8)
        self.num_pages = self._range.num_pages
        # views[name] has the spec's shape and dtype; valid to touch only while resident
        self.views = {
            spec.name: typed_view(
                self._range.tensor[off : off + spec.nbytes], spec.dtype, spec.shape
            )
            for spec, off in zip(specs, offsets, strict=True)
        }
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
        self, fill: Callable[[str, torch.Tensor], None] | None = None, chunk_pages: int = 256
    ) -> bool:
        """Map every page; False if no memory. With `fill`, each tensor is handed to
        `fill(name, view)` as soon as its pages are mapped, so an asynchronous copy into
        it overlaps the mapping of the pages after it."""
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
