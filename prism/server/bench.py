"""`prism bench`: load a running server with synthetic requests or the Azure LLM 2023
trace and report TTFT, TPOT, inter-token and end-to-end latency (mean, p50, p99) and
throughput.

Requests go to `/v1/completions` as token-id prompts with `ignore_eos`, streamed, so each
has exactly the prompt and output lengths the workload states and the first token is
seen when it arrives; the last chunk's usage gives the output tokens as the server
counted them. Each request runs on a thread of its own (stdlib HTTP, nothing to
install), at most `concurrency` at once; a request that waits for a free slot starts its
clock when it is sent, as vLLM's benchmark does. A chunk carries the text of one or
more tokens (bytes of a character split over tokens wait for the rest), so the first
token and the gaps are those of visible text.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prism.sim.workloads import DEFAULT_TRACES, azure_trace

# Prompt token ids are drawn from here: ordinary tokens in every vocabulary we serve
# (specials sit at the ends), so no prompt is refused and none hits a special token.
PROMPT_IDS = (1000, 30000)


@dataclass(frozen=True, slots=True)
class BenchRequest:
    arrival_s: float  # when it is due, from the start of the run
    prompt_tokens: int
    output_tokens: int


@dataclass(slots=True)
class RequestResult:
    prompt_tokens: int
    output_tokens: int = 0  # as the server counted them
    ttft_s: float | None = None  # sent → first text
    latency_s: float = 0.0  # sent → last byte
    itl_s: list[float] = field(default_factory=list)  # gaps between chunks of text
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft_s is not None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (vLLM's definition)."""
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


# ---- workloads ----------------------------------------------------------------------------


def synthetic(
    num_requests: int, prompt_tokens: int, output_tokens: int, rate: float, seed: int = 0
) -> list[BenchRequest]:
    """Fixed lengths, Poisson arrivals at `rate` per second (inf: all due at once)."""
    rng = random.Random(seed)
    requests, t = [], 0.0
    for _ in range(num_requests):
        requests.append(BenchRequest(t, prompt_tokens, output_tokens))
        if math.isfinite(rate):
            t += rng.expovariate(rate)
    return requests


def azure(
    num_requests: int, traces: str | Path = DEFAULT_TRACES, rate_scale: float = 1.0
) -> list[BenchRequest]:
    """The first `num_requests` of the Azure LLM 2023 code trace (Patel et al.,
    "Splitwise", ISCA 2024; CC-BY 4.0): its arrivals, `rate_scale` times as dense, and
    its context and generated lengths."""
    workload = azure_trace(1, traces=traces, rate_scale=rate_scale, max_tokens=1 << 20)
    return [
        BenchRequest(r.arrival, r.prompt_tokens, r.output_tokens)
        for r in workload.requests[:num_requests]
    ]


def clip(
    requests: Sequence[BenchRequest],
    max_model_len: int,
    max_prompt: int | None = None,
    max_output: int | None = None,
) -> list[BenchRequest]:
    """Lengths cut to the caps, then the prompt cut so prompt + output fit the model."""
    clipped = []
    for r in requests:
        output = max(1, min(r.output_tokens, max_output or r.output_tokens, max_model_len - 1))
        prompt = max(1, min(r.prompt_tokens, max_prompt or r.prompt_tokens, max_model_len - output))
        clipped.append(BenchRequest(r.arrival_s, prompt, output))
    return clipped


# ---- the client ---------------------------------------------------------------------------


class BenchClient:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def models(self) -> list[dict[str, Any]]:
        """The server's model cards (`/v1/models`)."""
        with urllib.request.urlopen(self._request("/v1/models"), timeout=30) as response:
            return list(json.load(response)["data"])

    def run(
        self, model: str, requests: Sequence[BenchRequest], concurrency: int, seed: int = 0
    ) -> tuple[list[RequestResult], float]:
        """Send every request when it is due (or when a slot frees); the results in
        request order and the run's wall time."""
        rng = random.Random(seed)
        prompts = [[rng.randrange(*PROMPT_IDS) for _ in range(r.prompt_tokens)] for r in requests]
        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            start = time.perf_counter()
            futures = []
            for request, prompt in zip(requests, prompts, strict=True):
                time.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
                futures.append(pool.submit(self.send, model, request, prompt))
            results = [f.result() for f in futures]
        return results, time.perf_counter() - start

    def send(self, model: str, request: BenchRequest, prompt: list[int]) -> RequestResult:
        """One streamed completion, timed."""
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": request.output_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        result = RequestResult(request.prompt_tokens)
        start = time.perf_counter()
        try:
            http = self._request("/v1/completions", body)
            with urllib.request.urlopen(http, timeout=self.timeout_s) as response:
                _read_events(response, result, start)
        except urllib.error.HTTPError as e:
            result.error = f"{e.code}: {_error_message(e.read())}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            result.error = f"{type(e).__name__}: {e}"
        result.latency_s = time.perf_counter() - start
        return result

    def _request(self, path: str, body: Mapping[str, Any] | None = None) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        return urllib.request.Request(self.url + path, data, headers)


def _read_events(response: Any, result: RequestResult, start: float) -> None:
    last = start
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        now = time.perf_counter()
        if "error" in chunk:
            result.error = _error_message(data.encode())
            return
        if chunk.get("usage"):
            result.output_tokens = int(chunk["usage"]["completion_tokens"])
        if any(choice.get("text") for choice in chunk["choices"]):
            if result.ttft_s is None:
                result.ttft_s = now - start
            else:
                result.itl_s.append(now - last)
            last = now


def _error_message(body: bytes) -> str:
    text = body.decode(errors="replace")
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text.strip()


# ---- the report ---------------------------------------------------------------------------


def summary(results: Sequence[RequestResult], duration_s: float, **about: Any) -> dict[str, Any]:
    """Counts, throughput and latency statistics (ms) of a run; `about` says what ran."""
    done = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens for r in done)
    errors = Counter(r.error or "no output" for r in results if not r.ok)
    return {
        **about,
        "requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration_s,
        "prompt_tokens": prompt,
        "output_tokens": output,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output / duration_s,
        "total_token_throughput": (prompt + output) / duration_s,
        "ttft_ms": _stats([r.ttft_s for r in done]),
        "tpot_ms": _stats([r.tpot_s for r in done]),
        "itl_ms": _stats([gap for r in done for gap in r.itl_s]),
        "e2e_ms": _stats([r.latency_s for r in done]),
        "errors": dict(errors.most_common(5)),
    }


def _stats(seconds: Sequence[float | None]) -> dict[str, float | None]:
    values = np.array([s for s in seconds if s is not None], dtype=np.float64) * 1e3
    if not values.size:
        return {"mean": None, "p50": None, "p99": None}
    mean, p50, p99 = values.mean(), np.percentile(values, 50), np.percentile(values, 99)
    return {"mean": float(mean), "p50": float(p50), "p99": float(p99)}


_LATENCIES = {"TTFT ms": "ttft_ms", "TPOT ms": "tpot_ms", "ITL ms": "itl_ms", "E2E ms": "e2e_ms"}


def _cell(value: float | None) -> str:
    return f"{'-':>10}" if value is None else f"{value:>10.1f}"


def report_text(s: Mapping[str, Any]) -> str:
    lines = [
        f"{s['workload']}: {s['requests']} requests to {s['model']}, "
        f"at most {s['concurrency']} at once",
        f"completed {s['completed']}, failed {s['failed']} in {s['duration_s']:.1f} s",
        f"throughput: {s['request_throughput']:.2f} req/s, "
        f"{s['output_throughput']:.1f} output tok/s, {s['total_token_throughput']:.1f} tok/s",
        f"{'':<10}{'mean':>10}{'p50':>10}{'p99':>10}",
    ]
    for label, key in _LATENCIES.items():
        lines.append(f"{label:<10}" + "".join(_cell(s[key][k]) for k in ("mean", "p50", "p99")))
    lines += [f"error ({n}×): {message}" for message, n in s["errors"].items()]
    return "\n".join(lines)


# ---- the command --------------------------------------------------------------------------


def add_bench_parser(sub: Any, environ: Mapping[str, str]) -> None:
    url_default = "http://127.0.0.1:8000"
    bench = sub.add_parser(
        "bench", help="load a live server (trace or synthetic) and report TTFT/TPOT/throughput"
    )
    bench.add_argument("--url", default=url_default, help=f"the server (default: {url_default})")
    bench.add_argument(
        "--api-key", default=environ.get("PRISM_API_KEY") or None, help="default: $PRISM_API_KEY"
    )
    bench.add_argument("--model", default=None, help="default: the server's first model")
    bench.add_argument("--trace", choices=["azure"], default=None, help="default: synthetic")
    bench.add_argument("--trace-dir", default=str(DEFAULT_TRACES), help="the traces' folder")
    bench.add_argument("--rate-scale", type=float, default=1.0, help="trace: × its request rate")
    bench.add_argument("--num-requests", type=int, default=100)
    bench.add_argument("--rate", type=float, default=math.inf, help="synthetic: requests/s")
    bench.add_argument("--prompt-tokens", type=int, default=128, help="synthetic")
    bench.add_argument("--output-tokens", type=int, default=32, help="synthetic")
    bench.add_argument("--max-prompt-tokens", type=int, default=None, help="cut longer prompts")
    bench.add_argument("--max-output-tokens", type=int, default=None, help="cut longer outputs")
    bench.add_argument("--concurrency", type=int, default=64, help="requests in flight at most")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", action="store_true", help="print the summary as JSON")
    bench.add_argument("--output", default=None, help="also write the JSON summary here")
    bench.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    client = BenchClient(args.url, args.api_key)
    try:
        cards = client.models()
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"prism bench: cannot list the models of {args.url}: {e}", file=sys.stderr)
        return 1
    card = next((c for c in cards if args.model in (None, c["id"])), None)
    if card is None:
        print(f"prism bench: no model {args.model!r} at {args.url}", file=sys.stderr)
        return 1
    requests, workload = _workload(args)
    requests = clip(requests, card["max_model_len"], args.max_prompt_tokens, args.max_output_tokens)
    results, duration = client.run(card["id"], requests, args.concurrency, args.seed)
    s = summary(
        results, duration, model=card["id"], workload=workload, concurrency=args.concurrency
    )
    if args.output:
        Path(args.output).write_text(json.dumps(s, indent=2) + "\n")
    print(json.dumps(s, indent=2) if args.json else report_text(s))
    return 0 if s["completed"] else 1


def _workload(args: argparse.Namespace) -> tuple[list[BenchRequest], str]:
    if args.trace == "azure":
        name = f"azure-2023 (first {args.num_requests}, rate ×{args.rate_scale:g})"
        return azure(args.num_requests, args.trace_dir, args.rate_scale), name
    name = (
        f"synthetic (prompt {args.prompt_tokens}, output {args.output_tokens} tokens, "
        f"{args.rate:g} req/s)"
    )
    requests = synthetic(
        args.num_requests, args.prompt_tokens, args.output_tokens, args.rate, args.seed
    )
    return requests, name
