"""`prism serve --config FLEET.yaml`: a one-device fleet served in this process."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from controller_helpers import TINY_HF_CONFIG, fleet_yaml, write_tiny

from prism.cli import _fleet_registry, build_parser
from prism.models import Tokenizer, default_model_path
from prism.serving.fleet import in_process_worker, parse_fleet


def _args(*argv: str) -> object:
    return build_parser({}).parse_args(["serve", *argv])


def _tiny_with_tokenizer(directory: Path) -> Path:
    """A 2-layer config with SmolLM2's vocabulary and its tokenizer.json: random weights
    (`load_format: dummy`), a real tokenizer, as the server needs."""
    config = {**TINY_HF_CONFIG, "vocab_size": 49152, "tie_word_embeddings": True}
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_gguf(gguf.GGUFReader(default_model_path()))
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    return directory


def test_a_one_device_fleet_is_served_in_process(tmp_path: Path) -> None:
    """Two models, cached until asked for, each with its fleet settings."""
    tiny = _tiny_with_tokenizer(tmp_path / "tiny")
    path = tmp_path / "models.yaml"
    path.write_text(
        "devices: cpu\nbudget: 256MiB\nmodels:\n"
        f"  - {{name: m, path: {tiny}, load_format: dummy, max_model_len: 512, priority: high}}\n"
        f"  - {{name: m-b, path: {tiny}, load_format: dummy, max_memory: 64MiB}}\n"
    )
    registry = _fleet_registry(_args("--config", str(path)))
    try:
        assert [m.name for m in registry] == ["m", "m-b"]
        assert [m.state.value for m in registry] == ["cached", "cached"]
        m, m_b = registry.models()
        assert m.max_model_len == 512 and m.engine._slot.spec.priority == 1
        assert m_b.engine._slot.spec.max_kv_bytes == (64 << 20) - m_b.engine.weight_bytes
    finally:
        registry.close()


def test_fleet_serving_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    tiny = write_tiny(tmp_path / "tiny")
    two = tmp_path / "two.yaml"
    two.write_text(fleet_yaml(tiny, "ab"))
    with pytest.raises(SystemExit, match="model 'a' has no tokenizer"):  # several devices
        _fleet_registry(_args("--config", str(two)))
    with pytest.raises(SystemExit, match="the --config file sets these; drop --model, --budget"):
        _fleet_registry(_args("--config", str(two), "--model", "x", "--budget", "1GiB"))
    with pytest.raises(SystemExit, match="drop --max-waiting, --max-inflight"):
        _fleet_registry(_args("--config", str(two), "--max-waiting", "4", "--max-inflight", "8"))
    one = tmp_path / "one.yaml"
    one.write_text(fleet_yaml(tiny, "a", devices="cpu"))
    with pytest.raises(SystemExit, match="model 'a' has no tokenizer"):
        _fleet_registry(_args("--config", str(one)))
    with pytest.raises(SystemExit, match=r"bad.yaml: models\[0\] \(a\): .*not found"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(fleet_yaml(tmp_path / "nowhere", "a", devices="cpu"))
        _fleet_registry(_args("--config", str(bad)))


def test_in_process_worker_preloads_what_fits(tmp_path: Path) -> None:
    """With `preload`, models wake as far as the budget allows; the rest stay cached."""
    tiny = write_tiny(tmp_path / "tiny")
    fleet = parse_fleet(fleet_yaml(tiny, "abc", devices="cpu", budget="5MiB"), "f.yaml")
    worker = in_process_worker(fleet, preload=True)
    try:
        states = {m.name: m.state for m in worker.stats().worker.models}
        assert sorted(states.values()) == ["active", "active", "cached"]
    finally:
        worker.close()


def test_the_fleet_files_request_bounds_reach_the_workers(tmp_path: Path) -> None:
    """`controller.max_waiting`, `controller.max_inflight` and `host_budget` bound the
    in-process worker and every worker the controller starts."""
    from prism.serving.controller import Controller

    tiny = write_tiny(tmp_path / "tiny")
    bounds = "{tick_s: null, max_waiting: 3, max_inflight: 5}"
    host = "host_budget: 3MiB\n"
    fleet = parse_fleet(host + fleet_yaml(tiny, "a", devices="cpu", controller=bounds), "f.yaml")
    worker = in_process_worker(fleet)
    try:
        assert worker.worker.config.max_inflight == 5
        assert worker.worker.config.host_budget_bytes == 3 << 20
        assert worker.models["a"].max_waiting == 3
    finally:
        worker.close()
    two = parse_fleet(host + fleet_yaml(tiny, "ab", controller=bounds), "f.yaml")
    config, _ = Controller(two)._worker_config("cpu:1")
    assert config.max_inflight == 5 and config.host_budget_bytes == 3 << 20
