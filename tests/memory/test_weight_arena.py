"""WeightArena over real host virtual memory: weights as pool pages."""

from __future__ import annotations

import pytest
import torch

from prism.memory import HostVMM, PagePool, WeightArena, WeightSpec
from prism.memory.weight_arena import layout, views_over

PAGE = 64 << 10


def _specs() -> list[WeightSpec]:
    return [
        WeightSpec("embed", (300, 128), torch.float32),  # 150 KiB: spans pages
        WeightSpec("norm", (128,), torch.float32),
        WeightSpec("proj", (256, 256), torch.bfloat16),
        WeightSpec("tail", (7,), torch.float32),
    ]


def test_materialize_fills_each_tensor_once_its_pages_are_mapped() -> None:
    """`fill` sees every tensor exactly once, in layout order, only after its pages map."""
    vmm = HostVMM(PAGE)
    pool = PagePool(vmm, 8 << 20)
    arena = WeightArena("m/weights", _specs(), pool)
    seen: list[str] = []

    def fill(name: str, view: torch.Tensor) -> None:
        view.fill_(len(seen) + 1)  # writing an unmapped page would fault the process
        seen.append(name)

    assert arena.materialize(fill, chunk_pages=1)
    assert seen == ["embed", "norm", "proj", "tail"]
    assert all(float(arena.views[n].float().mean()) == i + 1 for i, n in enumerate(seen))
    assert pool.tenant("m/weights").num_owned == arena.num_pages
    pool.check_integrity()
    arena.close()
    pool.check_integrity()


def test_evict_returns_every_page_and_keeps_the_addresses() -> None:
    """Eviction gives all pages back; the next materialize maps the same addresses."""
    vmm = HostVMM(PAGE)
    pool = PagePool(vmm, 8 << 20)
    arena = WeightArena("m/weights", _specs(), pool)
    assert arena.materialize()
    ptr = arena.views["proj"].data_ptr()
    assert arena.evict() == arena.num_pages
    assert pool.tenant("m/weights").num_owned == 0 and not arena.resident
    assert arena.materialize()
    assert arena.views["proj"].data_ptr() == ptr
    arena.close()
    pool.check_integrity()


def test_materialize_without_memory_is_false_and_changes_nothing() -> None:
    """An arena larger than the free pool reports no memory instead of failing."""
    vmm = HostVMM(PAGE)
    pool = PagePool(vmm, 2 * PAGE)
    arena = WeightArena("m/weights", _specs(), pool)
    assert not arena.materialize()
    assert pool.tenant("m/weights").num_owned == 0
    pool.check_integrity()
    arena.close()


def test_materialize_from_a_flat_source_copies_every_tensor() -> None:
    """A host buffer in the arena's layout is copied in runs of pages; every tensor
    arrives intact, whatever the run length, wake after wake."""
    specs = _specs()
    flat = torch.zeros(layout(specs)[1], dtype=torch.uint8)
    host = views_over(flat, specs)
    for i, view in enumerate(host.values()):
        view.copy_(torch.randn(view.shape, generator=torch.Generator().manual_seed(i)))
    pool = PagePool(HostVMM(PAGE), 8 << 20)
    arena = WeightArena("m/weights", specs, pool)
    for chunk in (1, 2, 32):
        assert arena.materialize(chunk_pages=chunk, source=flat)
        assert all(torch.equal(arena.views[n], host[n]) for n in host)
        arena.evict()
        pool.check_integrity()
    with pytest.raises(ValueError, match="source has"):
        arena.materialize(source=flat[:100])
    with pytest.raises(ValueError, match="uint8 buffer of at least"):
        views_over(flat[:100], specs)
    arena.close()
