"""`prism` command line.

`prism serve` runs the OpenAI-compatible server (with no arguments: the embedded
SmolLM2-135M-Instruct on the CPU at 127.0.0.1:8000), every model of the device on one
worker over one page pool; `prism ctl` lists, wakes, sleeps and limits the models of a
running server through its admin API, `prism top` shows them live, `prism bench` loads
a server and reports its latencies and throughput; `prism balloon` shows the memory
layer at work: several models' KV caches growing into and out of one page pool.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from prism.engine.engine import EngineConfig
from prism.kvcache import ElasticKVCache, KVCacheConfig
from prism.memory import PagePool, make_vmm
from prism.models.default import default_model_path
from prism.server.admin_client import AdminClient, AdminError
from prism.server.bench import add_bench_parser
from prism.server.connection import DEFAULT_READ_TIMEOUT_S, http_protocol
from prism.server.limits import DEFAULT_MAX_BODY_BYTES
from prism.server.registry import ModelRegistry, ModelSpec, Registry, default_name
from prism.server.top import add_top_parser
from prism.serving.async_worker import DEFAULT_MAX_WAITING
from prism.serving.worker import WorkerConfig, WorkerMode
from prism.sim.cli import add_simulate_parser

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_UNITS |= {f"{u}b": 1000 ** (i + 1) for i, u in enumerate("kmgt")}
_UNITS |= {f"{u}ib": 1 << (10 * (i + 1)) for i, u in enumerate("kmgt")}


def parse_size(text: str) -> int:
    """Bytes from `2GiB`, `512MiB`, `1.5G` (binary), `2GB` (decimal) or a plain number."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 512MiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def default_budget(device: str) -> int:
    """The pool's budget when --budget is not given: 4 GiB of host memory on the CPU; on
    a GPU, 90% of its free memory (the rest is for activations, graphs and torch)."""
    if device == "cpu":
        return 4 << 30
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free * 0.9)


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


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    if args.mode == WorkerMode.STATIC.value and args.max_kv is None:
        raise SystemExit("prism serve: --mode static needs --max-kv (each model's KV share)")
    budget = args.budget if args.budget is not None else default_budget(args.device)
    return WorkerConfig(
        device=args.device,
        budget_bytes=budget,
        mode=WorkerMode(args.mode),
        max_inflight=args.max_inflight,
        host_budget_bytes=args.host_budget,
    )


def _serve(args: argparse.Namespace) -> int:
    if args.config is not None:
        return _serve_registry(args, _fleet_registry(args))
    specs = model_specs(args)
    worker = worker_config(args)
    config = EngineConfig()
    if args.max_model_len is not None:
        config = dataclasses.replace(config, max_model_len=args.max_model_len)
    budget = format_size(worker.budget_bytes)
    print(f"{worker.device}: one {worker.mode.value} worker, budget {budget}", flush=True)
    for spec in specs:
        print(f"loading {spec.name} from {spec.source} ...", flush=True)
    try:
        registry = ModelRegistry.load(
            specs,
            worker=worker,
            engine=config,
            preload=args.preload,
            max_waiting=DEFAULT_MAX_WAITING if args.max_waiting is None else args.max_waiting,
            max_kv_bytes=args.max_kv,
        )
    except (ValueError, MemoryError, FileNotFoundError) as e:
        raise SystemExit(f"prism serve: {e}") from e
    return _serve_registry(args, registry)


def _serve_registry(args: argparse.Namespace, registry: Registry) -> int:
    import uvicorn

    from prism.server import create_app

    if isinstance(registry, ModelRegistry):  # a fleet's models load when the server starts
        for model in registry:
            print(f"  {model.name}: {model.state.value}", flush=True)
    try:
        protocol = http_protocol(args.read_timeout, args.max_connections)
    except ValueError as e:
        raise SystemExit(f"prism serve: {e}") from e
    app = create_app(registry, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    print(_banner(args, registry.models()[0].name), flush=True)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,  # then open streams are cancelled (and aborted)
        # h11 (whose 16 KiB bound on a request line and headers the tests check; "auto"
        # would take httptools whenever it happens to be installed), with read deadlines
        http=protocol,
    )
    return 0


def _fleet_registry(args: argparse.Namespace) -> Registry:
    """The models of a fleet file (`--config`): one device served in this process; several
    by the controller, a worker process per device (started with the server)."""
    from prism.server.fleet_registry import FleetRegistry
    from prism.serving.fleet import FleetConfigError, in_process_worker, load_fleet

    options = (
        "model", "budget", "host_budget", "max_kv", "max_model_len", "max_waiting", "max_inflight",
    )  # fmt: skip
    clashing = [f"--{o.replace('_', '-')}" for o in options if getattr(args, o) is not None]
    if clashing:
        raise SystemExit(f"prism serve: the --config file sets these; drop {', '.join(clashing)}")
    try:
        fleet = load_fleet(args.config)
        devices = fleet.device_ids()
        if len(devices) > 1:
            print(f"fleet {fleet.path}: {len(fleet.models)} models on {list(devices)}", flush=True)
            return FleetRegistry(fleet)
        for m in fleet.models:
            print(f"loading {m.name} from {m.source} on {devices[0]} ...", flush=True)
        worker = in_process_worker(fleet, preload=args.preload)
    except (FleetConfigError, ValueError, MemoryError, FileNotFoundError) as e:
        raise SystemExit(f"prism serve: {e}") from e
    try:
        return ModelRegistry([worker])
    except ValueError as e:  # a model without a tokenizer
        worker.close()
        raise SystemExit(f"prism serve: {e}") from e


def _banner(args: argparse.Namespace, model: str) -> str:
    url = f"http://{args.host}:{args.port}"
    body = {"model": model, "messages": [{"role": "user", "content": "Hello!"}]}
    auth = ' -H "Authorization: Bearer $PRISM_API_KEY"' if args.api_key else ""
    return (
        f"Prism serving at {url}/v1 (OpenAI-compatible)\n"
        f"try: curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
        f"-d {shlex.quote(json.dumps(body))}"
    )


_MODEL_COLUMNS: tuple[tuple[str, str, bool], ...] = (  # header, field, is a size in bytes
    ("NAME", "name", False),
    ("STATE", "state", False),
    ("DEVICE", "device", False),
    ("WEIGHTS", "weights_bytes_mapped", True),
    ("KV", "kv_bytes_mapped", True),
    ("KV LIMIT", "kv_bytes_limit", True),
    ("RUNNING", "num_running", False),
    ("WAITING", "num_waiting", False),
    ("WAKES", "wakes", False),
    ("SLEEPS", "sleeps", False),
)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = (
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in [header, *rows]
    )
    return "\n".join(line.rstrip() for line in lines)


def models_table(models: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        [format_size(m[key]) if is_size else str(m[key]) for _, key, is_size in _MODEL_COLUMNS]
        for m in models
    ]
    return format_table([h for h, _, _ in _MODEL_COLUMNS], rows)


def memory_table(devices: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for d in devices:
        parts.append(
            f"{d['device']} ({d['mode']}): budget {format_size(d['budget_bytes'])}, "
            f"used {format_size(d['used_bytes'])}, free {format_size(d['free_bytes'])}, "
            f"pages of {format_size(d['page_size'])}"
        )
        rows = [
            [t["name"], str(t["pages"]), format_size(t["bytes"]), format_size(t["limit_bytes"])]
            for t in d["tenants"]
        ]
        parts.append(format_table(["TENANT", "PAGES", "BYTES", "LIMIT"], rows))
    return "\n".join(parts)


def _ctl(args: argparse.Namespace) -> int:
    client = AdminClient(args.url, args.api_key)
    try:
        if args.action == "memory":
            print(memory_table(client.memory()))
            return 0
        if args.action == "list":
            models = client.models()
        elif args.action == "limit":
            models = [client.limit(args.name, args.kv_bytes)]
        else:  # wake, sleep
            models = [getattr(client, args.action)(args.name)]
    except AdminError as e:
        print(f"prism ctl {args.action}: {e}", file=sys.stderr)
        return 1
    print(models_table(models))
    return 0


def _add_ctl_parser(sub: Any, environ: Mapping[str, str]) -> None:
    """`prism ctl [--url U] [--api-key K] ACTION ...`; the two options also work after it."""
    url_default = "http://127.0.0.1:8000"
    key_default = environ.get("PRISM_API_KEY") or None
    ctl = sub.add_parser("ctl", help="list, wake, sleep and limit the models of a live server")
    ctl.add_argument("--url", default=url_default, help=f"the server (default: {url_default})")
    ctl.add_argument("--api-key", default=key_default, help="default: $PRISM_API_KEY")
    ctl.set_defaults(func=_ctl)
    common = argparse.ArgumentParser(add_help=False)  # SUPPRESS: unset keeps ctl's value
    common.add_argument("--url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--api-key", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    actions = ctl.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[common], help="every model: state, memory, requests")
    actions.add_parser("memory", parents=[common], help="each device's pool: budget, tenants")
    for action, text in (("wake", "make NAME resident now"), ("sleep", "give NAME's memory back")):
        actions.add_parser(action, parents=[common], help=text).add_argument("name")
    limit = actions.add_parser("limit", parents=[common], help="cap NAME's KV cache")
    limit.add_argument("name")
    limit.add_argument("kv_bytes", type=parse_size, metavar="BYTES", help="e.g. 256MiB")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The parser; `environ` supplies defaults (PRISM_API_KEY), read when main() runs."""
    parser = argparse.ArgumentParser(prog="prism", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(sub, environ)
    _add_ctl_parser(sub, environ)
    add_top_parser(sub, environ)
    add_bench_parser(sub, environ)
    add_simulate_parser(sub)
    balloon = sub.add_parser("balloon", help="show KV caches ballooning in one page pool")
    balloon.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    balloon.add_argument("--budget-mib", type=int, default=512)
    balloon.set_defaults(func=_balloon)
    return parser


def _add_serve_parser(sub: Any, environ: Mapping[str, str]) -> None:
    serve = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")
    serve.add_argument(
        "--config",
        metavar="FLEET.yaml",
        help="a fleet file: models (sources, SLOs, priorities, memory), devices, budget, mode",
    )
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
    serve.add_argument("--device", default="cpu", help="cpu or cuda[:N]: one worker serves all")
    serve.add_argument(
        "--budget",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="device memory the models' weights and KV caches share, e.g. 2GiB "
        "(default: 4GiB on the CPU, 90%% of the free memory of a GPU)",
    )
    serve.add_argument(
        "--mode",
        choices=[m.value for m in WorkerMode],
        default=WorkerMode.PRISM.value,
        help="prism: models sleep and wake, KV caches balloon; static: fixed KV shares, all "
        "resident; swap: one model resident at a time",
    )
    serve.add_argument(
        "--preload",
        action="store_true",
        help="wake every model at start (default: each wakes on its first request)",
    )
    serve.add_argument(
        "--host-budget",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="host memory for the models' weight copies; beyond it the least recently used "
        "model not on the device drops its copy (reloaded from disk when next woken)",
    )
    serve.add_argument(
        "--max-kv",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="cap on each model's KV cache (its share; needed by --mode static)",
    )
    serve.add_argument("--max-model-len", type=int, default=None, help="tokens per request")
    serve.add_argument(
        "--max-waiting-per-model",
        "--max-waiting",
        dest="max_waiting",
        type=int,
        default=None,
        help="requests that may queue per model beyond those running; more get 429 "
        f"(default {DEFAULT_MAX_WAITING}; a --config file sets it as controller.max_waiting)",
    )
    serve.add_argument(
        "--max-inflight",
        type=int,
        default=None,
        metavar="N",
        help="requests in flight on the device over all models; more get 429 (default: "
        "only the per-model bound; a --config file sets it as controller.max_inflight)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=parse_size,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="SIZE",
        help=f"larger request bodies get 413 (default: {format_size(DEFAULT_MAX_BODY_BYTES)})",
    )
    serve.add_argument(
        "--read-timeout",
        type=float,
        default=DEFAULT_READ_TIMEOUT_S,
        metavar="SECONDS",
        help="a request head must arrive within this long of its first byte (or of the "
        "connection), a body may pause this long between reads; then 408 and the "
        f"connection is closed (default: {DEFAULT_READ_TIMEOUT_S:g}; 0: no deadline)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=None,
        metavar="N",
        help="connections beyond N open ones get 503 and are closed at once (default: "
        "no bound; each idle or slow one lasts until its read deadline)",
    )
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)


def main(argv: list[str] | None = None) -> int:
    args = build_parser(os.environ).parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
