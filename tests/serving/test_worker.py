"""DeviceWorker on the CPU: several tiny models over one real (HostVMM) page pool."""

from __future__ import annotations

import pytest

from prism.engine import EngineConfig, SamplingParams
from prism.models.config import ModelConfig
from prism.serving.model_slot import ModelSpec
from prism.serving.worker import DeviceWorker, WorkerConfig, WorkerMode

# 2 layers, 2 KV heads of 32, fp32: 1 KiB of KV per token; weights ≈ 0.6 MiB.
TINY = ModelConfig(
    architecture="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=2048,
)  # fmt: skip
ENGINE = EngineConfig(max_model_len=1024, max_num_seqs=16, max_num_batched_tokens=512)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 500 + 1 for i in range(length)]


def _worker(
    budget_mib: int, mode: WorkerMode = WorkerMode.PRISM, **spec_kw: object
) -> DeviceWorker:
    worker = DeviceWorker(WorkerConfig(budget_bytes=budget_mib << 20, mode=mode))
    for i, name in enumerate("abc"):
        worker.add_model(
            ModelSpec(name, TINY, load_format="dummy", engine=ENGINE, **spec_kw)  # type: ignore[arg-type]
        )
        assert worker.models[name].config == TINY and i >= 0
    return worker


def _run(
    worker: DeviceWorker, jobs: list[tuple[str, list[int]]], params: SamplingParams = GREEDY
) -> dict[str, list[int]]:
    ids = [worker.submit(model, prompt, params) for model, prompt in jobs]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    finished: set[str] = set()
    for _, out in worker.run_until_idle(max_steps=5000):
        tokens[out.request_id] += out.new_token_ids
        if out.finished:
            finished.add(out.request_id)
    assert finished == set(ids), "a request was lost"
    return {i: tokens[i] for i in ids}


def _kv_pages(worker: DeviceWorker) -> dict[str, int]:
    return {
        t.name.split("/")[0]: t.owned_pages
        for t in worker.pool.stats().tenants
        if t.name.endswith("/kv")
    }


def test_kv_memory_follows_load_between_models() -> None:
    """Load on one model grows its KV into the others' memory, and flows back when load moves."""
    worker = _worker(24)
    _run(worker, [(m, _prompt(i, 64)) for i, m in enumerate("abc")])  # all three awake
    base = _kv_pages(worker)
    _run(worker, [("a", _prompt(i, 900)) for i in range(12)])
    after_a = _kv_pages(worker)
    assert after_a["a"] > 4 * base["a"]
    worker.check_integrity()
    # b's requests overlap (100 tokens out each): more live KV than the free pages hold
    long = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    _run(worker, [("b", _prompt(i, 900)) for i in range(12)], long)
    after_b = _kv_pages(worker)
    assert after_b["b"] > 4 * base["b"]
    assert after_b["a"] < after_a["a"]  # a's memory went to b
    # ... from a's cached prefixes: an idle model is not put to sleep for memory that
    # stale prefixes can give
    assert all(slot.sleeps == 0 for slot in worker.models.values())
    stats = worker.pool.stats()
    assert stats.owned_pages <= stats.budget_pages
    worker.check_integrity()
    worker.close()


def test_sleep_and_wake_give_identical_outputs() -> None:
    """A model put to sleep and woken by its next request answers exactly as before."""
    worker = _worker(24)
    jobs = [("a", _prompt(1, 100)), ("a", _prompt(2, 37))]
    before = list(_run(worker, jobs).values())
    freed = worker.sleep("a")
    assert freed > 0 and worker.models["a"].state.value == "asleep"
    assert worker.stats().models[0].weights_mapped_bytes == 0
    after = list(_run(worker, jobs).values())  # the request wakes it
    assert after == before
    assert worker.models["a"].wakes == 2 and worker.models["a"].sleeps == 1
    worker.check_integrity()
    worker.close()


def test_pool_exhaustion_sleeps_idle_models_and_loses_nothing() -> None:
    """With room for about two models, a third's request sleeps an idle one; all complete."""
    worker = _worker(4)
    results = _run(worker, [(m, _prompt(i, 200)) for i, m in enumerate("abcabc")])
    assert all(len(t) == GREEDY.max_tokens for t in results.values())
    sleeps = sum(slot.sleeps for slot in worker.models.values())
    assert sleeps > 0, "the pool never had to sleep anyone"
    # Interleaved load on all three keeps completing.
    results = _run(worker, [(m, _prompt(i, 300)) for i, m in enumerate("cbacba")])
    assert all(len(t) == GREEDY.max_tokens for t in results.values())
    worker.check_integrity()
    worker.close()


def test_busy_model_gives_memory_by_preemption_and_recovers() -> None:
    """When one model's load fills the pool, another model's request still gets served."""
    worker = _worker(8)
    jobs = [("a", _prompt(i, 900)) for i in range(6)] + [("b", _prompt(99, 300))]
    results = _run(worker, jobs)
    assert all(len(t) == GREEDY.max_tokens for t in results.values())
    worker.check_integrity()
    worker.close()


def test_swap_mode_keeps_one_model_resident() -> None:
    """`swap` wakes one model at a time and sleeps the others."""
    worker = _worker(24, mode=WorkerMode.SWAP)
    _run(worker, [("a", _prompt(1, 50))])
    _run(worker, [("b", _prompt(2, 50))])
    states = {m.name: m.state for m in worker.stats().models}
    assert states["b"] == "active" and states["a"] == "asleep"
    worker.check_integrity()
    worker.close()


def test_swap_mode_serves_models_first_come_first_served() -> None:
    """`swap` serves requests in arrival order across models: a request for the resident
    model that arrives after one for a sleeping model waits for that model's turn (the
    resident finishes what it runs, then sleeps), and then the first model wakes again.
    Held for a wake, a request keeps its arrival time in the engine."""
    worker = _worker(24, mode=WorkerMode.SWAP)
    a1 = worker.submit("a", _prompt(1, 40), GREEDY)
    worker.step()  # a wakes; a1 runs
    b1 = worker.submit("b", _prompt(2, 40), GREEDY)  # a holds KV: b1 is held for b's wake
    a2 = worker.submit("a", _prompt(3, 40), GREEDY)  # queued in a's engine, after b1
    assert worker.models["b"].state.value != "active"
    first: dict[str, int] = {}
    for i in range(5000):
        if not worker.has_work():
            break
        for _, out in worker.step():
            if out.new_token_ids:
                first.setdefault(out.request_id, i)
    assert set(first) == {a1, b1, a2}
    assert first[a1] < first[b1] < first[a2]
    wakes = {m.name: m.wakes for m in worker.stats().models}
    assert wakes["a"] == 2 and wakes["b"] == 1
    worker.check_integrity()
    worker.close()


def test_a_request_held_for_a_wake_keeps_its_arrival_time() -> None:
    """Its engine orders it (and counts its deadline) from when it was submitted, not
    from when its model woke."""
    worker = _worker(24, mode=WorkerMode.SWAP)
    worker.submit("a", _prompt(1, 40), GREEDY)
    worker.step()
    worker.submit("b", _prompt(2, 40), GREEDY, request_id="held")
    since = worker._pending[0].since
    for _ in range(5000):
        engine = worker.models["b"].engine
        if engine is not None and "held" in engine._requests:
            break
        worker.step()
    assert engine is not None and engine._requests["held"].arrival_time == since
    worker.run_until_idle(max_steps=5000)
    worker.close()


def test_static_mode_needs_shares_and_never_sleeps() -> None:
    """`static` gives each model a fixed KV share, all resident from the start."""
    with pytest.raises(ValueError, match="max_kv_bytes"):
        _worker(24, mode=WorkerMode.STATIC)
    worker = _worker(24, mode=WorkerMode.STATIC, max_kv_bytes=4 << 20)
    assert all(m.state == "active" for m in worker.stats().models)
    _run(worker, [(m, _prompt(i, 300)) for i, m in enumerate("abc")])
    with pytest.raises(RuntimeError, match="never sleeps"):
        worker.sleep("a")
    worker.check_integrity()
    worker.close()


def test_worker_errors_are_clear() -> None:
    """Unknown models and duplicate names raise errors that say what is wrong."""
    worker = _worker(24)
    with pytest.raises(KeyError, match="unknown model 'zzz'"):
        worker.submit("zzz", [1, 2, 3])
    with pytest.raises(ValueError, match="already on this worker"):
        worker.add_model(ModelSpec("a", TINY, load_format="dummy"))
    worker.close()


def test_equal_priority_model_gets_its_fair_share_back_without_waiting() -> None:
    """A fills the whole pool with a long backlog; B's request (same priority) takes back
    memory above A's fair share by preempting A, instead of waiting out A's backlog."""
    worker = _worker(6)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    a_ids = [worker.submit("a", _prompt(i, 900), params) for i in range(16)]
    counts = {i: 0 for i in a_ids}
    for _ in range(10):
        for _, out in worker.step():
            counts[out.request_id] += len(out.new_token_ids)
    a_engine = worker.models["a"].engine
    assert a_engine is not None and len(a_engine.scheduler.running) > 1
    b_id = worker.submit("b", _prompt(99, 900), params)
    counts[b_id] = 0
    finished: set[str] = set()
    while not counts[b_id]:
        for _, out in worker.step():
            counts[out.request_id] += len(out.new_token_ids)
            if out.finished:
                finished.add(out.request_id)
        worker.check_integrity()
    assert len(finished) < 8, "b waited for most of a's backlog"
    preempted = sum(r.num_preemptions for i in a_ids if (r := a_engine.request(i)) is not None)
    assert preempted > 0
    stats = {m.name: m.preemptions for m in worker.stats().models}
    assert stats["a"] >= preempted and stats["b"] == 0
    for _, out in worker.run_until_idle(max_steps=20_000):
        counts[out.request_id] += len(out.new_token_ids)
    assert all(n == params.max_tokens for n in counts.values()), "a request lost tokens"
    worker.check_integrity()
    worker.close()


def test_a_model_below_its_share_takes_it_back_from_one_ranked_first_every_round() -> None:
    """B decodes one request while A (same priority) fills the pool with a backlog whose
    deadlines (all already missed) rank A's queue first in every round. A model keeps its
    blocks for the round once scheduled, so B's next prompt, which needs memory A holds
    beyond its fair share, must be scheduled before A to take it back: its first token
    comes in the next round, not after A's requests finish."""
    from prism.serving.policies.slo import SLO

    worker = DeviceWorker(WorkerConfig(budget_bytes=6 << 20))
    for name in "abc":
        spec = ModelSpec(name, TINY, load_format="dummy", engine=ENGINE, slo=SLO(0.001, 1.0))
        worker.add_model(spec)
    worker.submit("b", _prompt(98, 20), SamplingParams(max_tokens=400, ignore_eos=True))
    for _ in range(3):
        worker.step()
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for i in range(16):
        worker.submit("a", _prompt(i, 900), params)
    for _ in range(10):
        worker.step()
    pages = _kv_pages(worker)
    share = worker._fair_kv_share(None)  # as the round orders by it
    assert pages["b"] < share < pages["a"], "the setting: A above its share, B below"
    b_id = worker.submit("b", _prompt(99, 1000), params)
    a_finished = 0
    for _ in range(2):
        outputs = worker.step()
        a_finished += sum(o.finished for name, o in outputs if name == "a")
        if any(o.request_id == b_id for _, o in outputs):
            break
    else:
        pytest.fail(f"b's prompt waited on a's backlog (pages {_kv_pages(worker)})")
    assert a_finished == 0 and _kv_pages(worker)["b"] >= share - 4
    worker.run_until_idle(max_steps=20_000)
    worker.check_integrity()
    worker.close()


def test_release_memory_preempts_the_owners_of_one_group_only() -> None:
    """Taking pages from a busy model preempts the owners of one group, the group whose
    owners hold the fewest blocks (least to recompute) — not every running request, as
    preempting latest-first until a group empties would on an interleaved cache (prompts'
    blocks taken a chunk at a time interleave them; reserved whole, the latest request's
    prompt fills a group of its own)."""
    from dataclasses import replace

    worker = DeviceWorker(WorkerConfig(budget_bytes=24 << 20))
    chunked = replace(ENGINE, reserve_prompt=False)
    for name in "abc":
        worker.add_model(ModelSpec(name, TINY, load_format="dummy", engine=chunked))
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    ids = [worker.submit("a", _prompt(i, 20 + 40 * i), params) for i in range(12)]
    for _ in range(60):
        worker.step()
    engine = worker.models["a"].engine
    assert engine is not None
    engine.kv.reset_prefix_cache()
    engine.kv_cache.trim(0)  # no spare groups left: the next page must come from requests
    running = len(engine.scheduler.running)
    groups = engine.kv_cache.mapped_groups
    assert running == 12 and groups > 2
    per_group = engine.kv_cache.blocks_per_group
    owners: dict[int, set[str]] = {}
    held = {r.request_id: len(r.block_ids) for r in engine.scheduler.running}
    for req in engine.scheduler.running:
        for block in req.block_ids:
            owners.setdefault(block // per_group, set()).add(req.request_id)
    owners.pop(0)
    least = min(sum(held[i] for i in o) for o in owners.values())
    order = [r.request_id for r in engine.scheduler.running][::-1]  # latest first
    latest_first = next(k for k in range(1, running + 1)
                        if any(o <= set(order[:k]) for o in owners.values()))  # fmt: skip
    released = engine.release_memory(1)
    preempted = [i for i in ids if (r := engine.request(i)) is not None and r.num_preemptions]
    assert released >= 1 and engine.kv_cache.mapped_groups < groups
    assert set(preempted) in owners.values()  # the owners of one group, all of them
    assert sum(held[i] for i in preempted) == least
    assert len(preempted) < latest_first
    worker.check_integrity()
    done = {out.request_id for _, out in worker.run_until_idle() if out.finished}
    assert done == set(ids)
    worker.check_integrity()
    worker.close()


def test_host_budget_drops_least_recently_used_host_copies() -> None:
    """Host copies beyond the host budget are dropped, least recently used first and never
    an active model's; a dropped model's next request reads its weights again and
    answers as before."""
    worker = DeviceWorker(WorkerConfig(budget_bytes=24 << 20, host_budget_bytes=1))
    worker.add_model(ModelSpec("a", TINY, load_format="dummy", engine=ENGINE))
    one = worker.models["a"].host_bytes
    worker.close()
    worker = DeviceWorker(WorkerConfig(budget_bytes=24 << 20, host_budget_bytes=2 * one))
    for name in "abc":
        worker.add_model(ModelSpec(name, TINY, load_format="dummy", engine=ENGINE))
    states = {m.name: (m.state, m.host_bytes) for m in worker.stats().models}
    assert states["a"] == ("registered", 0)  # the least recently used
    assert states["b"] == ("cached", one) and states["c"] == ("cached", one)
    expected = _run(worker, [("b", _prompt(1, 50))])  # b active
    answers = _run(worker, [("a", _prompt(1, 50))])  # a reloads; c (idle, LRU) drops
    assert list(answers.values()) == list(expected.values())  # same dummy weights
    states = {m.name: (m.state, m.host_bytes) for m in worker.stats().models}
    assert states["a"] == ("active", one) and states["c"] == ("registered", 0)
    assert sum(m.host_bytes for m in worker.stats().models) <= 2 * one
    worker.check_integrity()
    worker.close()


def test_stats_count_rounds_and_their_time() -> None:
    """Every `step()` that launched something is a round, its time split into the host's
    work before the wait and the wait; a step with nothing to do is not counted. Each
    model counts its steps and the prompt tokens they computed (not decode tokens)."""
    worker = _worker(24)
    assert worker.step() == [] and worker.stats().rounds == 0
    _run(worker, [("a", _prompt(1, 40)), ("b", _prompt(2, 40)), ("b", _prompt(3, 600))])
    stats = worker.stats()
    assert stats.rounds >= GREEDY.max_tokens  # one token per round at most
    assert stats.round_host_s > 0 and stats.round_wait_s >= 0
    models = {m.name: m for m in stats.models}
    assert models["a"].prefill_tokens == 40 and models["b"].prefill_tokens == 640
    assert models["a"].steps == GREEDY.max_tokens  # the prompt's step yields the first token
    assert models["b"].steps >= GREEDY.max_tokens + 1  # 600 tokens: two 512-token chunks
    assert models["c"].steps == models["c"].prefill_tokens == 0
    worker.close()


def _schedule_order(worker: DeviceWorker) -> list[str]:
    """Records the order in which the models' engines are scheduled."""
    order: list[str] = []
    for name, slot in worker.models.items():
        assert slot.engine is not None
        schedule = slot.engine.schedule

        def recorded(name: str = name, schedule: object = schedule) -> object:
            order.append(name)
            return schedule()  # type: ignore[operator]

        slot.engine.schedule = recorded  # type: ignore[method-assign]
    return order


def test_rounds_admit_the_most_urgent_model_first() -> None:
    """With SLOs, the round schedules (takes memory and launches) first the model whose
    waiting requests the local scheduler admits first: the tight-SLO model's, though it
    arrived later; without them, the models take turns."""
    from prism.serving.policies.slo import SLO

    def worker_with(slos: dict[str, SLO | None]) -> DeviceWorker:
        worker = DeviceWorker(WorkerConfig(budget_bytes=24 << 20))
        for name, slo in slos.items():
            worker.add_model(ModelSpec(name, TINY, load_format="dummy", engine=ENGINE, slo=slo))
            worker.wake(name)
        return worker

    loose, tight = SLO(ttft_s=60.0, tpot_s=1.0), SLO(ttft_s=0.5, tpot_s=1.0)
    worker = worker_with({"a": loose, "b": tight})
    order = _schedule_order(worker)
    for _ in range(3):  # the rotation would put b first on every other round
        worker.submit("a", _prompt(1, 30), GREEDY)
        worker.submit("b", _prompt(2, 30), GREEDY)
        order.clear()
        worker.step()
        assert order == ["b", "a"]
        worker.run_until_idle()
    worker.close()

    worker = worker_with({"a": None, "b": tight})  # an SLO missing: turns
    order = _schedule_order(worker)
    worker.submit("a", _prompt(1, 30), GREEDY)
    worker.submit("b", _prompt(2, 30), GREEDY)
    firsts = []
    for _ in range(2):
        order.clear()
        worker.step()
        firsts.append(order[0])
    assert sorted(firsts) == ["a", "b"]
    worker.run_until_idle()
    worker.close()


def test_kv_beyond_the_weights_bounds_a_request_it_never_fits() -> None:
    """Budget 2 MiB, weights 1.7 MiB: a's KV can never hold more than one 256-token page
    group (less the padding block). Its max_model_len (1,024) is lowered to that, so a
    prompt beyond it is refused at submit, naming the limit, and a request whose output
    would grow past it stops there with finish reason 'length' — before, it was preempted
    and recomputed forever, and a prompt that never fits held the queue behind it."""
    from prism.engine.request import FinishReason

    worker = DeviceWorker(WorkerConfig(budget_bytes=2 << 20))
    worker.add_model(ModelSpec("a", TINY, load_format="dummy", engine=ENGINE))
    grows = SamplingParams(max_tokens=800, temperature=0.0, ignore_eos=True)
    long_id = worker.submit("a", _prompt(1, 100), grows)
    short_id = worker.submit("a", _prompt(2, 20), GREEDY)
    engine = worker.models["a"].engine
    assert engine is not None
    limit = engine.config.max_model_len
    assert limit == engine.kv_cache.max_tokens_held < ENGINE.max_model_len
    with pytest.raises(ValueError, match=rf"this model takes at most {limit - 1}"):
        worker.submit("a", _prompt(3, limit), GREEDY)
    finished = {out.request_id: out for _, out in worker.run_until_idle(2000) if out.finished}
    assert finished[short_id].finish_reason is FinishReason.LENGTH
    assert finished[long_id].finish_reason is FinishReason.LENGTH
    assert finished[long_id].num_output_tokens == limit - 100
    assert worker.stats().models[0].preemptions == 0
    worker.check_integrity()
    worker.close()
