"""`prism serve` and `prism ctl` argument handling (the server and `ctl` against it are
covered by the other tests)."""

from __future__ import annotations

import argparse

import pytest

from prism.cli import (
    _serve_registry,
    build_parser,
    model_specs,
    parse_model_spec,
    parse_size,
    worker_config,
)
from prism.models import default_model_path
from prism.server import ModelSpec
from prism.serving.worker import WorkerConfig, WorkerMode


def test_serve_defaults_to_the_embedded_model_on_localhost() -> None:
    args = build_parser({}).parse_args(["serve"])
    assert (args.host, args.port, args.device, args.api_key) == ("127.0.0.1", 8000, "cpu", None)
    [spec] = model_specs(args)
    assert spec == ModelSpec("SmolLM2-135M-Instruct", str(default_model_path()))


def test_api_key_comes_from_the_flag_or_the_environment() -> None:
    env = {"PRISM_API_KEY": "from-env"}
    assert build_parser(env).parse_args(["serve"]).api_key == "from-env"
    assert build_parser(env).parse_args(["serve", "--api-key", "flag"]).api_key == "flag"


def test_max_body_bytes_is_a_size_of_8_mib_by_default() -> None:
    assert build_parser({}).parse_args(["serve"]).max_body_bytes == 8 << 20
    args = build_parser({}).parse_args(["serve", "--max-body-bytes", "1MiB"])
    assert args.max_body_bytes == 1 << 20


def test_read_timeout_and_connection_bound_are_checked() -> None:
    assert build_parser({}).parse_args(["serve"]).read_timeout == 30.0
    args = build_parser({}).parse_args(["serve", "--read-timeout", "-1"])
    with pytest.raises(SystemExit, match="read timeout must be >= 0 seconds, got -1"):
        _serve_registry(args, None)  # type: ignore[arg-type]
    args = build_parser({}).parse_args(["serve", "--max-connections", "0"])
    with pytest.raises(SystemExit, match="max connections must be at least 1, got 0"):
        _serve_registry(args, None)  # type: ignore[arg-type]


def test_model_specs_with_and_without_names() -> None:
    assert parse_model_spec("a=/models/x.gguf") == ModelSpec("a", "/models/x.gguf")
    assert parse_model_spec("/models/Qwen3-1.7B") == ModelSpec("Qwen3-1.7B", "/models/Qwen3-1.7B")
    assert parse_model_spec("/m/a=b") == ModelSpec("a=b", "/m/a=b")
    args = build_parser({}).parse_args(["serve", "--model", "a=/x", "--model", "b=/x"])
    assert [s.name for s in model_specs(args)] == ["a", "b"]


def test_balloon_is_still_there() -> None:
    args = build_parser({}).parse_args(["balloon", "--budget-mib", "64"])
    assert args.budget_mib == 64


def test_serve_builds_one_worker_for_the_device() -> None:
    args = build_parser({}).parse_args(["serve"])
    assert (args.mode, args.preload, args.max_kv) == ("prism", False, None)
    assert worker_config(args) == WorkerConfig("cpu", 4 << 30, WorkerMode.PRISM)
    argv = ["serve", "--budget", "2GiB", "--mode", "swap", "--preload", "--device", "cpu"]
    args = build_parser({}).parse_args([*argv, "--host-budget", "8GiB"])
    want = WorkerConfig("cpu", 2 << 30, WorkerMode.SWAP, host_budget_bytes=8 << 30)
    assert args.preload and worker_config(args) == want


def test_static_mode_needs_a_kv_share() -> None:
    args = build_parser({}).parse_args(["serve", "--mode", "static"])
    with pytest.raises(SystemExit, match="--max-kv"):
        worker_config(args)
    args = build_parser({}).parse_args(["serve", "--mode", "static", "--max-kv", "256MiB"])
    assert args.max_kv == 256 << 20 and worker_config(args).mode is WorkerMode.STATIC


@pytest.mark.parametrize(
    ("text", "size"),
    [("2GiB", 2 << 30), ("512MiB", 512 << 20), ("1.5G", 3 << 29), ("2GB", 2 * 10**9),
     ("64 kib", 64 << 10), ("1000", 1000)],
)  # fmt: skip
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "2XB", "-1GiB", "1e9"])
def test_bad_sizes_say_what_is_expected(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size(text)


def test_ctl_options_go_before_or_after_the_action() -> None:
    env = {"PRISM_API_KEY": "from-env"}
    args = build_parser(env).parse_args(["ctl", "list"])
    assert (args.action, args.url, args.api_key) == ("list", "http://127.0.0.1:8000", "from-env")
    args = build_parser(env).parse_args(["ctl", "--url", "http://h:1", "limit", "m", "64MiB"])
    assert (args.url, args.name, args.kv_bytes) == ("http://h:1", "m", 64 << 20)
    args = build_parser(env).parse_args(["ctl", "sleep", "m", "--api-key", "k", "--url", "u"])
    assert (args.action, args.name, args.api_key, args.url) == ("sleep", "m", "k", "u")


def test_top_and_bench_take_the_server_and_key_like_ctl() -> None:
    url = "http://127.0.0.1:8000"
    env = {"PRISM_API_KEY": "from-env"}
    args = build_parser(env).parse_args(["top", "--once"])
    assert (args.url, args.api_key, args.interval, args.once) == (url, "from-env", 1.0, True)
    args = build_parser(env).parse_args(["bench", "--url", "http://h:1", "--rate", "2.5"])
    assert (args.url, args.api_key, args.trace, args.rate) == ("http://h:1", "from-env", None, 2.5)
    assert (args.num_requests, args.concurrency, args.json) == (100, 64, False)
