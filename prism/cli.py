"""`prism` command line.

`prism serve` runs the OpenAI-compatible server (with no arguments: the embedded
SmolLM2-135M-Instruct on the CPU at 127.0.0.1:8000); `prism balloon` shows the memory
layer at work: several models' KV caches growing into and out of one page pool.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Mapping

import torch

from prism.engine.engine import EngineConfig
from prism.kvcache import ElasticKVCache, KVCacheConfig
from prism.memory import PagePool, make_vmm
from prism.models.default import default_model_path
from prism.server.registry import ModelSpec, default_name


def _balloon(args: argparse.Namespace) -> int:
    """Three caches share one pool; load moves from one model to the next."""
    vmm = make_vmm(args.device)
    pool = PagePool(vmm, args.budget_mib << 20)
    caches = [
        ElasticKVCache(
            KVCacheConfig(f"model-{i}", 16, 8, 128, 16, torch.float16, max_tokens=1 << 20),
            pool,
        )
        for i in range(3)
    ]
    mib = vmm.page_size / (1 << 20)
    print(f"pool: {pool.budget_pages} pages of {mib:g} MiB on {vmm.device}")
    print(f"{'phase':<22}" + "".join(f"{c.config.name:>12}" for c in caches) + f"{'free':>10}")
    held: list[list[int]] = [[] for _ in caches]
    for phase, hot in enumerate([0, 1, 2, 0]):
        for i, cache in enumerate(caches):  # the cold models finish their requests
            if i != hot and held[i]:
                cache.free(held[i])
                held[i] = []
                cache.trim()
        start = time.perf_counter()
        while (blocks := caches[hot].allocate(64)) is not None:
            held[hot] += blocks
        ms = (time.perf_counter() - start) * 1e3
        stats = {t.name: t.owned_pages for t in pool.stats().tenants}
        row = "".join(f"{stats[c.config.name] * mib:>9.0f}MiB" for c in caches)
        print(f"{phase}: model-{hot} hot {ms:6.1f}ms {row}{pool.stats().free_pages * mib:>7.0f}MiB")
    for cache in caches:
        cache.check_integrity()
        cache.close()
    pool.check_integrity()
    pool.close()
    return 0


def parse_model_spec(text: str) -> ModelSpec:
    """`PATH` or `NAME=PATH`; a bare path is named after its file or directory."""
    name, sep, path = text.partition("=")
    if sep and name and path and "/" not in name:
        return ModelSpec(name, path)
    return ModelSpec(default_name(text), text)


def model_specs(args: argparse.Namespace) -> list[ModelSpec]:
    """The --model specs, or the embedded default model; names must be unique."""
    specs = args.model or [ModelSpec(default_name(p), str(p)) for p in [default_model_path()]]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"prism serve: model names must be unique: {', '.join(duplicates)}")
    return specs


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from prism.server import ModelRegistry, create_app

    specs = model_specs(args)
    config = EngineConfig()
    if args.max_model_len is not None:
        config = dataclasses.replace(config, max_model_len=args.max_model_len)
    for spec in specs:
        print(f"loading {spec.name} from {spec.source} on {args.device} ...", flush=True)
    registry = ModelRegistry.load(
        specs, device=args.device, config=config, max_waiting=args.max_waiting
    )
    app = create_app(registry, api_key=args.api_key)
    print(_banner(args, specs[0].name), flush=True)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,  # then open streams are cancelled (and aborted)
    )
    return 0


def _banner(args: argparse.Namespace, model: str) -> str:
    url = f"http://{args.host}:{args.port}"
    body = {"model": model, "messages": [{"role": "user", "content": "Hello!"}]}
    auth = ' -H "Authorization: Bearer $PRISM_API_KEY"' if args.api_key else ""
    return (
        f"Prism serving at {url}/v1 (OpenAI-compatible)\n"
        f"try: curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
        f"-d {shlex.quote(json.dumps(body))}"
    )


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The parser; `environ` supplies defaults (PRISM_API_KEY), read when main() runs."""
    parser = argparse.ArgumentParser(prog="prism", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")
    serve.add_argument(
        "--model",
        action="append",
        type=parse_model_spec,
        metavar="[NAME=]PATH",
        help="a GGUF file or HF directory to serve (repeatable); default: embedded SmolLM2",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        default=environ.get("PRISM_API_KEY") or None,
        help="require this bearer token on every route but /health (default: $PRISM_API_KEY)",
    )
    serve.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    serve.add_argument("--max-model-len", type=int, default=None, help="tokens per request")
    serve.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="requests that may queue per model beyond those running; more get 429",
    )
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)
    balloon = sub.add_parser("balloon", help="show KV caches ballooning in one page pool")
    balloon.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    balloon.add_argument("--budget-mib", type=int, default=512)
    balloon.set_defaults(func=_balloon)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(os.environ).parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
