"""`ElasticTensor`: one reserved address range seen as a torch tensor.

Pages are mapped in and out underneath the tensor; its address never moves, so kernels
and CUDA graphs captured over it stay valid while the balloon inflates and deflates.
Reading an unmapped page is a fault (host: SIGSEGV; CUDA: illegal address): callers
keep their reads inside mapped pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch

from prism.memory.tensor_view import bytes_tensor, typed_view
from prism.memory.vmm import VirtualMemory, VMMError


class ElasticTensor:
    """A tensor of `shape` and `dtype` over a reserved range, backed page by page."""

    def __init__(self, vmm: VirtualMemory, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.vmm = vmm
        self.shape = shape
        self.dtype = dtype
        self.nbytes = prod(shape) * torch.empty((), dtype=dtype).element_size()
        self.reservation = vmm.reserve(max(self.nbytes, 1))
        self.page_size = vmm.page_size
        self.num_pages = self.reservation.size // self.page_size
        # handle mapped at each page index, or None
        self._handles: list[int | None] = [None] * self.num_pages
        self.raw = bytes_tensor(self.reservation.base, self.reservation.size, vmm.device)
        self.tensor = typed_view(self.raw, dtype, shape)
        self._closed = False

    @property
    def base(self) -> int:
        return self.reservation.base

    @property
    def mapped_pages(self) -> int:
        return sum(h is not None for h in self._handles)

    def is_mapped(self, page: int) -> bool:
        return self._handles[page] is not None

    def handle_at(self, page: int) -> int | None:
        return self._handles[page]

    def map(self, first_page: int, handles: Sequence[int]) -> None:
        """Map `handles` at pages first_page, first_page+1, ... (one backend call)."""
        last = first_page + len(handles)
        if first_page < 0 or last > self.num_pages:
            raise IndexError(f"pages [{first_page}, {last}) outside 0..{self.num_pages}")
        for page in range(first_page, last):
            if self._handles[page] is not None:
                raise VMMError("map", f"page {page} of this tensor is already mapped")
        self.vmm.map(self.base + first_page * self.page_size, handles)
        self._handles[first_page:last] = list(handles)

    def unmap(self, first_page: int, count: int = 1) -> list[int]:
        """Unmap `count` pages from `first_page`; returns their handles, still alive."""
        last = first_page + count
        if first_page < 0 or last > self.num_pages:
            raise IndexError(f"pages [{first_page}, {last}) outside 0..{self.num_pages}")
        handles = self._handles[first_page:last]
        if any(h is None for h in handles):
            raise VMMError("unmap", f"pages [{first_page}, {last}) are not all mapped")
        self.vmm.unmap(self.base + first_page * self.page_size, count)
        self._handles[first_page:last] = [None] * count
        return [h for h in handles if h is not None]

    def unmap_all(self) -> list[int]:
        """Unmap every mapped page (run by run); returns the handles."""
        freed: list[int] = []
        page = 0
        while page < self.num_pages:
            if self._handles[page] is None:
                page += 1
                continue
            end = page
            while end < self.num_pages and self._handles[end] is not None:
                end += 1
            freed += self.unmap(page, end - page)
            page = end
        return freed

    def close(self) -> list[int]:
        """Unmap everything and give the address range back; returns the handles."""
        if self._closed:
            return []
        freed = self.unmap_all()
        self.vmm.free_reservation(self.reservation)
        self._closed = True
        return freed
