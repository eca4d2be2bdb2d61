"""SM shares (`prism.serving.sm_partition`): how a GPU's SMs are split in proportion to
demand, and the errors a worker gives for a share it cannot make. The shares themselves
need a GPU: tests/serving/test_worker_gpu.py."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prism.models.config import ModelConfig
from prism.serving.model_slot import ModelSpec
from prism.serving.sm_partition import SmPartitionError, proportional_sms
from prism.serving.worker import DeviceWorker, WorkerConfig


def test_shares_follow_demand_in_granules() -> None:
    shares = proportional_sms({"big": 6.0, "mid": 3.0, "small": 1.0}, 132, 8)
    assert shares == {"big": 72, "mid": 40, "small": 16}  # 16 granules: 1 each + 13 by demand
    assert proportional_sms({"a": 0.0, "b": 0.0}, 132, 8) == {"a": 64, "b": 64}


def test_every_model_gets_its_minimum() -> None:
    shares = proportional_sms({"hot": 1000.0, "idle": 0.0}, 132, 8, minimum=16)
    assert shares == {"hot": 112, "idle": 16}
    with pytest.raises(SmPartitionError, match="do not fit"):
        proportional_sms({f"m{i}": 1.0 for i in range(17)}, 132, 8)


@given(
    st.dictionaries(st.text(min_size=1, max_size=3), st.floats(0, 1e6), min_size=1, max_size=16),
    st.sampled_from([1, 2, 8]),
)
def test_shares_use_the_device_and_never_exceed_it(demands: dict[str, float], granule: int) -> None:
    total = 132
    shares = proportional_sms(demands, total, granule)
    assert set(shares) == set(demands)
    assert all(s >= granule and s % granule == 0 for s in shares.values())
    assert total - granule < sum(shares.values()) <= total
    # more demand never gets fewer SMs
    ranked = sorted(demands, key=demands.__getitem__)
    for lo, hi in itertools.pairwise(ranked):
        if demands[hi] > demands[lo]:
            assert shares[hi] >= shares[lo] - granule


def test_a_share_on_the_cpu_is_refused() -> None:
    tiny = ModelConfig(
        architecture="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=2048,
    )  # fmt: skip
    worker = DeviceWorker(WorkerConfig(budget_bytes=16 << 20))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        worker.add_model(ModelSpec("a", tiny, load_format="dummy", sms=8))
    assert not worker.models
    worker.close()
