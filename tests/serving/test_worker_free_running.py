"""DeviceWorker stepping in rounds against free running, on the CPU.

On the CPU a step has ended when `launch_step` returns, so the two modes cannot differ
there. These tests give each launched step a stand-in for its CUDA event (a fake, since
no GPU runs here) that ends a set time after launch: model `a` slow (an 8B prefill
chunk), model `b` fast (a 1B decode). The engines, caches and page pool are real."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from prism.engine import EngineConfig, SamplingParams
from prism.engine.engine import StepInFlight
from prism.serving.model_slot import ModelSpec
from prism.serving.worker import DeviceWorker, WorkerConfig
from tests.serving.test_worker import TINY, _prompt

ENGINE = EngineConfig(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=128)
SLOW_S = {"a": 0.4, "b": 0.0}  # device time of each model's step, from its launch


class _FakeEvent:
    """Ends `seconds` after it is made, as a CUDA event recorded after such a step."""

    def __init__(self, seconds: float) -> None:
        self.ends = time.perf_counter() + seconds

    def query(self) -> bool:
        return time.perf_counter() >= self.ends

    def synchronize(self) -> None:
        time.sleep(max(0.0, self.ends - time.perf_counter()))


def _worker(free_running: bool) -> DeviceWorker:
    worker = DeviceWorker(WorkerConfig(budget_bytes=32 << 20, free_running=free_running))
    for name in SLOW_S:
        worker.add_model(ModelSpec(name, TINY, load_format="dummy", engine=ENGINE))
        assert worker.wake(name)
        engine = worker.models[name].engine
        assert engine is not None
        launch = engine.launch_step

        def slow_launch(batch: Any, launch: Any = launch, name: str = name) -> StepInFlight:
            step = launch(batch)
            return step and dataclasses.replace(step, done=_FakeEvent(SLOW_S[name]))

        engine.launch_step = slow_launch  # type: ignore[method-assign]
    return worker


def _race(free_running: bool) -> tuple[int, dict[str, list[int]]]:
    """`a` asks for 3 tokens, `b` for 8: how many of `a`'s tokens had come when `b`
    finished, and every request's tokens."""
    worker = _worker(free_running)
    ids = {
        "a": worker.submit("a", _prompt(1, 40), SamplingParams(max_tokens=3, temperature=0.0)),
        "b": worker.submit("b", _prompt(2, 20), SamplingParams(max_tokens=8, temperature=0.0)),
    }
    tokens: dict[str, list[int]] = {m: [] for m in ids}
    a_when_b_done = -1
    while worker.has_work():
        for model, out in worker.step():
            tokens[model] += out.new_token_ids
            if model == "b" and out.finished:
                a_when_b_done = len(tokens["a"])
        worker.check_integrity()
    worker.close()
    return a_when_b_done, tokens


def test_free_running_lets_a_fast_model_step_past_a_slow_one() -> None:
    """Rounds: `b` gets one token per round, so `a` (0.4 s a step) finishes its 3 before
    `b` its 8. Free running: `b` finishes while `a`'s first step is still running; the
    greedy tokens are the same either way."""
    in_rounds, tokens_rounds = _race(free_running=False)
    free, tokens_free = _race(free_running=True)
    assert in_rounds == 3
    assert free == 0
    assert tokens_free == tokens_rounds
    assert [len(t) for t in tokens_free.values()] == [3, 8]


def test_abort_and_sleep_wait_for_the_step_in_flight() -> None:
    """An abort of a request whose model has a step in flight first finishes that step
    (its tokens come with the next `step()`), then frees the request's blocks; the
    model can then sleep, and nothing is left behind."""
    worker = _worker(free_running=True)
    slow = worker.submit("a", _prompt(3, 40), SamplingParams(max_tokens=50, temperature=0.0))
    worker.submit("b", _prompt(4, 20), SamplingParams(max_tokens=2, temperature=0.0))
    first = worker.step()  # returns once `b`'s step ends; `a`'s is still running
    assert [m for m, _ in first] == ["b"] and "a" in worker._in_flight
    aborted = worker.abort(slow)
    assert aborted is not None and aborted.finished
    assert "a" not in worker._in_flight
    assert aborted.num_output_tokens == 1  # the step that was in flight sampled one
    later = worker.run_until_idle()
    assert [len(out.new_token_ids) for m, out in later if m == "a"] == [1]
    assert worker.sleep("a") > 0
    worker.check_integrity()
    assert not worker.has_work()
    worker.close()
