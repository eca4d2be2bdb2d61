"""`prism serve` argument handling (the server itself is covered by the other tests)."""

from __future__ import annotations

from prism.cli import build_parser, model_specs, parse_model_spec
from prism.models import default_model_path
from prism.server import ModelSpec


def test_serve_defaults_to_the_embedded_model_on_localhost() -> None:
    args = build_parser({}).parse_args(["serve"])
    assert (args.host, args.port, args.device, args.api_key) == ("127.0.0.1", 8000, "cpu", None)
    [spec] = model_specs(args)
    assert spec == ModelSpec("SmolLM2-135M-Instruct", str(default_model_path()))


def test_api_key_comes_from_the_flag_or_the_environment() -> None:
    env = {"PRISM_API_KEY": "from-env"}
    assert build_parser(env).parse_args(["serve"]).api_key == "from-env"
    assert build_parser(env).parse_args(["serve", "--api-key", "flag"]).api_key == "flag"


def test_model_specs_with_and_without_names() -> None:
    assert parse_model_spec("a=/models/x.gguf") == ModelSpec("a", "/models/x.gguf")
    assert parse_model_spec("/models/Qwen3-1.7B") == ModelSpec("Qwen3-1.7B", "/models/Qwen3-1.7B")
    assert parse_model_spec("/m/a=b") == ModelSpec("a=b", "/m/a=b")
    args = build_parser({}).parse_args(["serve", "--model", "a=/x", "--model", "b=/x"])
    assert [s.name for s in model_specs(args)] == ["a", "b"]


def test_balloon_is_still_there() -> None:
    args = build_parser({}).parse_args(["balloon", "--budget-mib", "64"])
    assert args.budget_mib == 64
