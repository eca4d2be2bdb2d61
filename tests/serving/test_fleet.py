"""The fleet file: what a valid one yields, and errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from prism.serving.fleet import (
    DEFAULT_SLO,
    ControllerConfig,
    FleetConfigError,
    load_fleet,
    parse_fleet,
    parse_size,
    torch_device,
)
from prism.serving.policies import SLO
from prism.serving.worker import WorkerMode

FULL = """
devices: [0, cuda:1]
budget: 20GiB
host_budget: 100GiB
mode: prism
controller: {placement_interval_s: 5, idle_eviction_s: 30}
models:
  - name: llama-3.1-8b
    path: /models/Llama-3.1-8B-Instruct
    slo: {ttft_ms: 500, tpot_ms: 50}
    priority: high
    min_memory: 1GiB
    max_memory: 20GiB
    pinned: cuda:1
  - name: qwen
    preset: qwen3-1.7b
    priority: 3
    sms: 24
  - name: smol
    source: default
"""


def test_a_full_file_parses_to_plain_config(tmp_path: Path) -> None:
    """Every field lands where it should; defaults fill the rest."""
    path = tmp_path / "models.yaml"
    path.write_text(FULL)
    fleet = load_fleet(path)
    assert fleet.devices == ("cuda:0", "cuda:1") and fleet.device_ids() == fleet.devices
    assert fleet.budget_bytes == 20 << 30 and fleet.mode is WorkerMode.PRISM
    assert fleet.host_budget_bytes == 100 << 30
    assert fleet.controller == ControllerConfig(placement_interval_s=5, idle_eviction_s=30)
    llama, qwen, smol = fleet.models
    assert llama.source == "/models/Llama-3.1-8B-Instruct" and llama.load_format == "auto"
    assert llama.slo == SLO(ttft_s=0.5, tpot_s=0.05) and llama.priority == 1
    assert (llama.min_memory, llama.max_memory, llama.pinned) == (1 << 30, 20 << 30, "cuda:1")
    assert (qwen.source, qwen.load_format, qwen.priority) == ("qwen3-1.7b", "dummy", 3)
    assert qwen.sms == 24 and llama.sms is None
    assert smol.source == "default" and smol.slo == DEFAULT_SLO and smol.pinned is None
    assert fleet.path == str(path) and fleet.model("qwen") is qwen


def test_device_spellings() -> None:
    """`cpu`, `cpu:N`, GPU indices and `auto`; `cpu:N` workers run on the CPU."""
    models = "models: [{name: m, preset: qwen3-1.7b}]\n"
    assert parse_fleet(f"devices: cpu\n{models}").devices == ("cpu:0",)
    assert parse_fleet(f"devices: [cpu:0, cpu:1]\n{models}").devices == ("cpu:0", "cpu:1")
    assert parse_fleet(f"devices: [0, 1]\n{models}").devices == ("cuda:0", "cuda:1")
    assert parse_fleet(models).devices is None  # auto
    assert torch_device("cpu:1") == "cpu" and torch_device("cuda:1") == "cuda:1"


def test_sizes() -> None:
    assert parse_size("2GiB") == 2 << 30 and parse_size("1.5G") == 3 << 29
    assert parse_size("2GB") == 2_000_000_000 and parse_size(4096) == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("devices: cpu\n", r"fleet.yaml: the file: `models` is required"),
        ("models: []\n", r"fleet.yaml: models: must be a non-empty list"),
        ("models: [{path: /m}]\n", r"fleet.yaml: models\[0\]: `name` is required"),
        ("models: [{name: m}]\n", r"models\[0\] \(m\): needs exactly one of `path`, `source`"),
        ("models: [{name: m, path: /a, preset: qwen3-8b}]\n", r"needs exactly one of"),
        ("models: [{name: m, preset: nope}]\n", r"models\[0\] \(m\).preset: unknown preset 'nope'"),
        (
            "models: [{name: m, preset: qwen3-8b, load_format: gguf}]\n",
            r"models\[0\] \(m\).load_format: a preset has random weights",
        ),
        (
            "models: [{name: m, path: /m, slo: {ttft_ms: -5}}]\n",
            r"models\[0\] \(m\).slo.ttft_ms: must be a positive number, got -5",
        ),
        (
            "models: [{name: m, path: /m, slo: {ttft: 5}}]\n",
            r"models\[0\] \(m\).slo: unknown field\(s\) \['ttft'\]",
        ),
        (
            "models: [{name: m, path: /m, priority: urgent}]\n",
            r"models\[0\] \(m\).priority: must be low, normal, high or an integer",
        ),
        (
            "models: [{name: m, path: /m, max_memory: 10 bananas}]\n",
            r"models\[0\] \(m\).max_memory: not a size: '10 bananas'",
        ),
        (
            "models: [{name: m, path: /m, min_memory: 2GiB, max_memory: 1GiB}]\n",
            r"models\[0\] \(m\).max_memory: is below min_memory",
        ),
        (
            "devices: [cuda:0]\nmodels: [{name: m, path: /m, pinned: cuda:3}]\n",
            r"models\[0\] \(m\).pinned: cuda:3 is not in devices \['cuda:0'\]",
        ),
        (
            "devices: cpu\nmodels: [{name: m, path: /m, sms: 8}]\n",
            r"models\[0\] \(m\).sms: an SM share needs CUDA devices",
        ),
        (
            "models: [{name: m, path: /m, sms: 0}]\n",
            r"models\[0\] \(m\).sms: must be an integer >= 1, got 0",
        ),
        (
            "models: [{name: m, path: /m}, {name: m, path: /n}]\n",
            r"models\[1\].name: 'm' is used by an earlier model",
        ),
        ("devices: [gpu0]\nmodels: [{name: m, path: /m}]\n", r"devices\[0\]: not a device: 'gpu0'"),
        ("devices: [0, 0]\nmodels: [{name: m, path: /m}]\n", r"devices: a device is listed twice"),
        ("mode: fast\nmodels: [{name: m, path: /m}]\n", r"mode: must be one of \['prism'"),
        ("budget: -1\nmodels: [{name: m, path: /m}]\n", r"budget: not a size: -1"),
        ("host_budget: lots\nmodels: [{name: m, path: /m}]\n", r"host_budget: not a size"),
        ("modles: []\n", r"the file: unknown field\(s\) \['modles'\]"),
        (
            "controller: {tick_s: -1}\nmodels: [{name: m, path: /m}]\n",
            r"controller: tick_s: must be a finite number >= 0",
        ),
        (
            "controller: {max_inflight: 0}\nmodels: [{name: m, path: /m}]\n",
            r"controller: max_inflight: must be at least 1, got 0",
        ),
        (
            "controller: {tick: 1}\nmodels: [{name: m, path: /m}]\n",
            r"controller: unknown field\(s\) \['tick'\]",
        ),
        (
            "mode: static\nmodels: [{name: m, path: /m}]\n",
            r"models\[0\] \(m\).max_memory: mode static needs",
        ),
        ("models: [{name: m, path: /m}\n", r"fleet.yaml: not valid YAML"),
        ("- just a list\n", r"fleet.yaml: the file: must be a mapping, got list"),
    ],
)
def test_bad_files_name_the_file_and_the_field(text: str, message: str) -> None:
    with pytest.raises(FleetConfigError, match=message):
        parse_fleet(text, "fleet.yaml")


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FleetConfigError, match=r"missing.yaml: cannot read the fleet file"):
        load_fleet(tmp_path / "missing.yaml")
