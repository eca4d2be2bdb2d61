"""The engine maps its KV cache's warm reserve while a step runs, not in the next step's
scheduling: decode steps whose growth fits the reserve make no mapping of their own."""

from __future__ import annotations

from pathlib import Path

from prism.engine import SamplingParams
from tests.engine.engine_helpers import tiny_engine


def test_decode_growth_comes_from_the_reserve_mapped_during_the_step(
    tiny_checkpoint: Path,
) -> None:
    engine = tiny_engine(tiny_checkpoint, prefix_caching=False)
    cache = engine.kv_cache
    assert cache.config.reserve_groups >= 1
    params = SamplingParams(temperature=0.0, max_tokens=3 * cache.blocks_per_group * 16 // 4,
                            ignore_eos=True)  # fmt: skip
    for seed in range(4):  # 4 decodes: 4 tokens a step, well under a group's blocks
        engine.add_request([(seed * 31 + i) % 200 + 1 for i in range(8)], params)
    schedule = engine.schedule
    mapped_in_schedule = []

    def watched() -> object:
        before = cache.mapped_groups
        batch = schedule()
        mapped_in_schedule.append(cache.mapped_groups - before)
        return batch

    engine.schedule = watched  # type: ignore[method-assign]
    grown = cache.mapped_groups
    while engine.has_unfinished():
        engine.step()
        assert cache.allocator.empty_groups >= cache.config.reserve_groups
    assert cache.mapped_groups > grown + 1, "the run never needed new groups"
    assert sum(mapped_in_schedule[1:]) == 0, "a decode step mapped pages on the request path"
    engine.kv.check_integrity()
    cache.check_integrity()
