"""DeviceWorker on the GPU: small random-weight models over one CUDA page pool.

The CPU scenarios of test_worker.py on real CUDA VMM pages (2 MiB), bf16, Triton attention
and decode CUDA graphs: memory follows load, sleep/wake keeps outputs and graphs, pool
exhaustion loses nothing.
"""

from __future__ import annotations

import pytest
import torch

from prism.engine import EngineConfig, SamplingParams
from prism.models.config import ModelConfig
from prism.serving.model_slot import ModelSpec
from prism.serving.worker import DeviceWorker, WorkerConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

MiB = 1 << 20
# 2 layers, 2 KV heads of 64, bf16: 1 KiB of KV per token, 2 MiB = 2048 tokens.
SMALL = ModelConfig(
    architecture="llama", vocab_size=1024, hidden_size=256, intermediate_size=512,
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=4096,
)  # fmt: skip
ENGINE = EngineConfig(
    max_model_len=2048, max_num_seqs=16, max_num_batched_tokens=2048,
    cuda_graph_sizes=(1, 2, 4, 8, 16),
)  # fmt: skip
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def _prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 1000 + 1 for i in range(length)]


def _worker(budget_mib: int, names: str = "abc", free_running: bool = False) -> DeviceWorker:
    config = WorkerConfig(device="cuda", budget_bytes=budget_mib * MiB, free_running=free_running)
    worker = DeviceWorker(config)
    for name in names:
        worker.add_model(ModelSpec(name, SMALL, load_format="dummy", engine=ENGINE))
    return worker


def _run(worker: DeviceWorker, jobs: list[tuple[str, list[int]]]) -> list[list[int]]:
    ids = [worker.submit(model, prompt, GREEDY) for model, prompt in jobs]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    finished: set[str] = set()
    for _, out in worker.run_until_idle(max_steps=20_000):
        tokens[out.request_id] += out.new_token_ids
        if out.finished:
            finished.add(out.request_id)
    assert finished == set(ids), "a request was lost"
    return [tokens[i] for i in ids]


def _kv_pages(worker: DeviceWorker) -> dict[str, int]:
    return {
        t.name.split("/")[0]: t.owned_pages
        for t in worker.pool.stats().tenants
        if t.name.endswith("/kv")
    }


def test_gpu_kv_memory_follows_load() -> None:
    worker = _worker(96)
    _run(worker, [(m, _prompt(i, 64)) for i, m in enumerate("abc")])
    base = _kv_pages(worker)
    _run(worker, [("a", _prompt(i, 1800)) for i in range(16)])
    after_a = _kv_pages(worker)
    assert after_a["a"] >= base["a"] + 8
    worker.check_integrity()
    _run(worker, [("b", _prompt(i, 1800)) for i in range(16)])
    after_b = _kv_pages(worker)
    assert after_b["b"] >= base["b"] + 8
    assert after_b["a"] < after_a["a"]
    stats = worker.pool.stats()
    assert stats.owned_pages <= stats.budget_pages
    worker.check_integrity()
    worker.close()


def test_gpu_sleep_wake_keeps_outputs_and_cuda_graphs() -> None:
    """Pages unmapped and mapped again at the same addresses: the decode graphs captured
    before sleeping replay correctly after waking, with no re-capture."""
    worker = _worker(96, names="a")
    jobs = [("a", _prompt(i, 40 + 13 * i)) for i in range(5)]  # decode batch of 5 → graph 8
    before = _run(worker, jobs)
    runner = worker.models["a"].engine.runner  # type: ignore[union-attr]
    graphs = dict(runner._graphs)
    assert graphs, "no decode CUDA graphs were captured"
    for _ in range(3):
        assert worker.sleep("a") > 0
        assert worker.stats().models[0].weights_mapped_bytes == 0
        assert _run(worker, jobs) == before  # the request wakes the model
    assert runner._graphs == graphs  # the very same graph objects: nothing re-captured
    assert worker.models["a"].wakes == 4
    worker.check_integrity()
    worker.close()


def test_gpu_never_slept_run_matches() -> None:
    """A worker whose model slept between requests answers as one that never slept."""
    jobs = [("b", _prompt(7, 300)), ("b", _prompt(8, 50))]
    fresh = _worker(96, names="b")
    expected = _run(fresh, jobs)
    fresh.close()
    worker = _worker(96, names="ab")
    _run(worker, [("b", _prompt(1, 20))])
    worker.sleep("b")
    _run(worker, [("a", _prompt(2, 500))])
    assert _run(worker, jobs) == expected
    worker.close()


def test_gpu_pool_exhaustion_loses_nothing() -> None:
    """A pool with room for about two models: requests to all three sleep idle ones and
    preempt where needed; every request completes with its full output."""
    weights_mib = SMALL.weight_bytes(torch.bfloat16) / MiB
    worker = _worker(int(2 * (weights_mib + 8)) + 6)
    results = _run(worker, [(m, _prompt(i, 700)) for i, m in enumerate("abcabcabc")])
    assert all(len(t) == GREEDY.max_tokens for t in results)
    assert sum(slot.sleeps for slot in worker.models.values()) > 0
    results = _run(worker, [(m, _prompt(i, 1500)) for i, m in enumerate("cbacbacba")])
    assert all(len(t) == GREEDY.max_tokens for t in results)
    worker.check_integrity()
    worker.close()


@pytest.mark.parametrize("free_running", [False, True], ids=["rounds", "free"])
def test_gpu_colocated_models_step_on_their_own_streams(free_running: bool) -> None:
    """Three models' steps are queued each on its own stream before any is waited for
    (in rounds, or each again as soon as its own step ended): every model's outputs
    equal its run alone (same batches, nothing raced), and the streams are three, none
    of them the default stream."""
    jobs = {
        m: [(m, _prompt(i + 10 * k, 60 + 40 * i)) for i in range(6)] for k, m in enumerate("abc")
    }
    alone = {}
    for m in "abc":
        solo = _worker(160, names=m)
        alone[m] = _run(solo, jobs[m])
        solo.close()
    worker = _worker(160, free_running=free_running)
    together = _run(worker, [job for m in "abc" for job in jobs[m]])
    assert together == [tokens for m in "abc" for tokens in alone[m]]
    streams = [slot.stream for slot in worker.models.values()]
    assert len({id(s) for s in streams}) == 3
    assert all(s is not None and s != torch.cuda.default_stream() for s in streams)
    worker.check_integrity()
    worker.close()


def test_gpu_sm_shares_hold_each_model_to_its_sms() -> None:
    """Models with SM shares (a static partition of the GPU): the driver reports each
    share's SMs, their outputs equal a run on the whole GPU, a matmul on an 8-SM share
    takes several times as long as on every SM, and a share beyond the SMs left is
    refused before anything loads."""
    jobs = [(m, _prompt(i + 10 * k, 60 + 40 * i)) for k, m in enumerate("ab") for i in range(4)]
    whole = _worker(160, names="ab")
    expected = _run(whole, jobs)
    whole.close()
    worker = DeviceWorker(WorkerConfig(device="cuda", budget_bytes=160 * MiB, free_running=True))
    for name, sms in (("a", 8), ("b", 12)):  # 12 rounds up to the granularity (8 on Hopper)
        worker.add_model(ModelSpec(name, SMALL, load_format="dummy", engine=ENGINE, sms=sms))
    shares = worker._partitions()
    granule = shares.granularity
    assert shares.sms_of("a") == max(8, granule)
    assert shares.sms_of("b") == -(-12 // granule) * granule
    assert _run(worker, jobs) == expected
    with pytest.raises(ValueError, match="SMs"):
        too_many = ModelSpec("c", SMALL, load_format="dummy", engine=ENGINE, sms=shares.free + 1)
        worker.add_model(too_many)
    assert "c" not in worker.models

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def timed(stream: torch.cuda.Stream) -> float:
        with torch.cuda.stream(stream):
            a @ a
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                a @ a
            end.record()
            end.synchronize()
        return start.elapsed_time(end)

    slot = worker.models["a"]
    assert slot.stream is not None
    assert timed(slot.stream) > 3 * timed(torch.cuda.Stream())
    worker.check_integrity()
    worker.close()
