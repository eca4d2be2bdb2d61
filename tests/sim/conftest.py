"""Fixtures for prism.sim tests: traces from ../shared/traces (skipped when absent) and
small scenarios built from the real cost model."""

from __future__ import annotations

from pathlib import Path

import pytest
from sim_helpers import RESULTS, TRACES

from prism.sim.cost_model import H200, CostModel
from prism.sim.gpu import GPUConfig


@pytest.fixture(scope="session")
def traces() -> Path:
    if not TRACES.is_dir():
        pytest.skip(f"no traces at {TRACES}")
    return TRACES


@pytest.fixture(scope="session")
def cost() -> CostModel:
    return CostModel.from_results(RESULTS)


@pytest.fixture(scope="session")
def h200() -> GPUConfig:
    return GPUConfig(H200.memory_bytes)
