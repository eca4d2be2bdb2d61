"""Engine benchmark on one GPU: decode and prefill against the physical floor, offline
throughput against Hugging Face transformers (continuous-batching `generate_batch` and
static-batch `generate`), KV memory mapped vs static reservation.

Everything is measured in one run: the copy bandwidth and bf16 matmul rate that make
the floors, then Prism's engine (random weights at real model shapes, bf16), then
transformers on the same shapes and requests.

Usage: python benchmarks/bench_engine.py --trace PATH/AzureLLMInferenceTrace_code.csv
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from prism.engine import Engine, EngineConfig, SamplingParams
from prism.models.config import ModelConfig
from prism.models.presets import PRESETS

GiB = 1 << 30


def ceilings() -> dict[str, float]:
    """Device-to-device copy bandwidth (read + write bytes) and bf16 matmul rate."""
    x = torch.empty(2 * GiB, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    bw = 2 * x.numel() / statistics.median(times[2:])
    del x, y
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    rate = 10 * 2 * n**3 / (time.perf_counter() - t)
    return {"copy_bytes_per_s": bw, "bf16_flops_per_s": rate}


def make_engine(config: ModelConfig, **kw: Any) -> Engine:
    return Engine.create(
        config, device="cuda", dtype=torch.bfloat16, config=EngineConfig(**kw), load_format="dummy"
    )


def matmul_params(config: ModelConfig) -> int:
    """Parameters multiplied per token (the embedding lookup is not a matmul)."""
    return config.num_parameters - config.vocab_size * config.hidden_size * (
        0 if config.tie_word_embeddings else 1
    )


def start_decoding(
    engine: Engine, batch: int, ctx: int, max_tokens: int, rng: random.Random
) -> list[str]:
    """`batch` requests of `ctx` random prompt tokens, prefilled and 5 steps into decode
    (graphs warm); returns their ids."""
    vocab = engine.model.config.vocab_size
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request([rng.randrange(vocab) for _ in range(ctx)], params)
           for _ in range(batch)]  # fmt: skip
    while any(r.num_output_tokens == 0 for r in map(engine.request, ids) if r):
        engine.step()  # prefill every request
    for _ in range(5):
        engine.step()
    return ids


def decode(config: ModelConfig, ceil: dict[str, float], batches: list[int], ctx: int) -> list[dict]:
    """Steady decode step time at each batch size, context `ctx`, vs the floor: with the
    engine's decode ahead (its default) and, in the same run, without it ("sync")."""
    engine = make_engine(
        config, max_num_seqs=max(batches), max_model_len=ctx + 256,
        max_num_batched_tokens=max(8192, ctx), kv_cache_bytes=40 * GiB, prefix_caching=False,
    )  # fmt: skip
    weight_bytes = config.weight_bytes(torch.bfloat16)
    kv_per_token = config.kv_bytes_per_token(torch.bfloat16)
    rows = []
    rng = random.Random(0)
    for batch in batches:
        ids = start_decoding(engine, batch, ctx, 200, rng)
        torch.cuda.synchronize()
        steps = 30
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        step_s = (time.perf_counter() - t) / steps
        ahead = engine.config
        engine.config = dataclasses.replace(ahead, decode_ahead=False)
        engine.step()  # takes the step launched ahead; from here one step at a time
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync_s = (time.perf_counter() - t) / steps
        engine.config = ahead
        graph = engine.runner._graphs.get(min(s for s in engine.runner._graphs if s >= batch))
        assert graph is not None
        t = time.perf_counter()
        for _ in range(steps):
            graph.replay()  # the GPU's share of a step: the captured forward alone
        torch.cuda.synchronize()
        graph_s = (time.perf_counter() - t) / steps
        kv_bytes = batch * (ctx + 20) * kv_per_token
        floor_bytes = (weight_bytes + kv_bytes) / ceil["copy_bytes_per_s"]
        floor_flops = 2 * matmul_params(config) * batch / ceil["bf16_flops_per_s"]
        floor = max(floor_bytes, floor_flops)
        rows.append({
            "batch": batch, "ctx": ctx, "step_ms": step_s * 1e3, "graph_ms": graph_s * 1e3,
            "floor_ms": floor * 1e3, "over_floor": step_s / floor,
            "graph_over_floor": graph_s / floor,
            "decode_ahead": ahead.decode_ahead, "sync_step_ms": sync_s * 1e3,
            "sync_over_floor": sync_s / floor,
        })  # fmt: skip
        for i in ids:
            engine.abort(i)
    engine.close()
    return rows


def host_profile(config: ModelConfig, batch: int, ctx: int, steps: int = 50) -> dict[str, Any]:
    """Where the host's time goes in decode steps at `batch` (cProfile over `steps` steps,
    the graph replay included): the functions with the most time of their own."""
    import cProfile
    import pstats

    engine = make_engine(
        config, max_num_seqs=batch, max_model_len=ctx + 256, max_num_batched_tokens=8192,
        kv_cache_bytes=40 * GiB, prefix_caching=False,
    )  # fmt: skip
    start_decoding(engine, batch, ctx, steps + 20, random.Random(3))
    profile = cProfile.Profile()
    t = time.perf_counter()
    profile.enable()
    for _ in range(steps):
        engine.step()
    profile.disable()
    step_s = (time.perf_counter() - t) / steps
    rows = []
    for (path, line, name), entry in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        calls, own, total = entry[1], entry[2], entry[3]
        rows.append({"function": f"{Path(path).name}:{line}({name})",
                     "calls": calls // steps, "own_ms": own / steps * 1e3,
                     "cumulative_ms": total / steps * 1e3})  # fmt: skip
    rows.sort(key=lambda r: -r["own_ms"])
    engine.close()
    return {"batch": batch, "ctx": ctx, "step_ms_profiled": step_s * 1e3,
            "top_own_ms_per_step": rows[:25]}  # fmt: skip


def prefill(
    config: ModelConfig, ceil: dict[str, float], lengths: list[int],
    graph_tokens: tuple[int, ...] = (),
) -> list[dict]:  # fmt: skip
    """One prompt of each length in one step: achieved FLOP rate vs the matmul rate.
    `graph_tokens`: the token-count CUDA graphs captured (a step replays the next size
    up; captured at the lengths themselves, each step replays its own); () launches every
    step eagerly."""
    engine = make_engine(
        config, max_num_seqs=4, max_model_len=max(lengths) + 16,
        max_num_batched_tokens=max([*lengths, *graph_tokens]), kv_cache_bytes=20 * GiB,
        prefix_caching=False, cuda_graph_sizes=(), cuda_graph_tokens=graph_tokens,
    )  # fmt: skip
    rows = []
    rng = random.Random(1)
    for n in lengths:
        times = []
        for _ in range(4):
            engine.add_request(
                [rng.randrange(config.vocab_size) for _ in range(n)],
                SamplingParams(max_tokens=1, temperature=0.0),
            )
            torch.cuda.synchronize()
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        step = statistics.median(times[1:])
        attn = 2 * config.num_layers * config.num_heads * config.head_dim * n * n  # causal QK+PV
        flops = 2 * matmul_params(config) * n + attn
        rows.append({"tokens": n, "graph": bool(graph_tokens), "step_ms": step * 1e3,
                     "tflops": flops / step / 1e12,
                     "of_matmul_rate": flops / step / ceil["bf16_flops_per_s"]})  # fmt: skip
    engine.close()
    return rows


def padding(
    config: ModelConfig, ceil: dict[str, float], lengths: tuple[int, ...] = (600, 1100, 1800)
) -> dict[str, Any]:
    """Steps of prompt tokens between two captured sizes, replayed from powers of two
    (the default before 2026-11-29: padded to the next power up), from the engine's
    default graphs (128 apart above 256), and eager — what padding costs a step with
    prefill, and what capturing more graphs costs at startup."""
    sizes = {"powers_of_two": (64, 128, 256, 512, 1024, 2048),
             "default": EngineConfig().cuda_graph_tokens, "eager": ()}  # fmt: skip
    out: dict[str, Any] = {"graph_sizes": {k: list(v) for k, v in sizes.items()}}
    for label, graph_tokens in sizes.items():
        t = time.perf_counter()
        rows = prefill(config, ceil, list(lengths), graph_tokens=graph_tokens)
        out[label] = {"rows": rows, "setup_and_run_s": time.perf_counter() - t}
    return out


def trace_requests(
    path: str, count: int, max_prompt: int, max_output: int
) -> list[tuple[int, int]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(2)
    picked = rng.sample(rows, count)
    return [
        (
            min(int(r["ContextTokens"]), max_prompt),
            max(1, min(int(r["GeneratedTokens"]), max_output)),
        )
        for r in picked
    ]


def offline_prism(
    config: ModelConfig, requests: list[tuple[int, int]], fixed_output: int | None
) -> dict:
    """All requests at once through the engine; output tokens per second."""
    max_prompt = max(p for p, _ in requests)
    engine = make_engine(
        config, max_num_seqs=256, max_model_len=max_prompt + 512, max_num_batched_tokens=8192,
        kv_cache_bytes=60 * GiB, prefix_caching=False,
    )  # fmt: skip
    rng = random.Random(3)
    prompts = [[rng.randrange(config.vocab_size) for _ in range(p)] for p, _ in requests]
    torch.cuda.synchronize()
    t = time.perf_counter()
    out_tokens = 0
    peak_mapped = 0
    for prompt, (_, out_len) in zip(prompts, requests, strict=True):
        n = fixed_output or out_len
        engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        out_tokens += sum(len(o.new_token_ids) for o in engine.step())
        peak_mapped = max(peak_mapped, engine.kv_cache.mapped_bytes)
    elapsed = time.perf_counter() - t
    kv_token = config.kv_bytes_per_token(torch.bfloat16)
    static = 256 * (max_prompt + 512) * kv_token  # every slot reserved for max_model_len
    engine.close()
    return {"requests": len(requests), "output_tokens": out_tokens, "seconds": elapsed,
            "tokens_per_s": out_tokens / elapsed, "peak_kv_mapped_gib": peak_mapped / GiB,
            "static_reservation_gib": static / GiB}  # fmt: skip


def hf_model(config: ModelConfig) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings, max_position_embeddings=8192,
    )  # fmt: skip
    with torch.device("cuda"):
        model = LlamaForCausalLM(hf).to(torch.bfloat16)
    return model.eval()


def offline_hf(config: ModelConfig, requests: list[tuple[int, int]], output: int) -> dict:
    """transformers' continuous-batching generate_batch on the same prompts."""
    from transformers.generation import GenerationConfig

    model = hf_model(config)
    model.set_attn_implementation("paged|sdpa")
    rng = random.Random(3)
    prompts = [[rng.randrange(config.vocab_size) for _ in range(p)] for p, _ in requests]
    gen = GenerationConfig(max_new_tokens=output, do_sample=False, eos_token_id=-1,
                           pad_token_id=0)  # fmt: skip
    torch.cuda.synchronize()
    t = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
    elapsed = time.perf_counter() - t
    tokens = sum(len(r.generated_tokens) for r in results.values())
    del model
    torch.cuda.empty_cache()
    return {"requests": len(requests), "output_tokens": tokens, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed}  # fmt: skip


def offline_hf_static(
    config: ModelConfig, requests: list[tuple[int, int]], output: int, batch: int = 64
) -> dict:
    """transformers' static-batch `generate` on the same prompts: batches of `batch` in
    arrival order, left-padded to the batch's longest prompt, `output` new tokens each."""
    from transformers.generation import GenerationConfig

    model = hf_model(config)
    model.set_attn_implementation("sdpa")
    rng = random.Random(3)
    prompts = [[rng.randrange(1, config.vocab_size) for _ in range(p)] for p, _ in requests]
    gen = GenerationConfig(max_new_tokens=output, min_new_tokens=output, do_sample=False,
                           eos_token_id=None, pad_token_id=0)  # fmt: skip
    torch.cuda.synchronize()
    t = time.perf_counter()
    tokens = 0
    for first in range(0, len(prompts), batch):
        group = prompts[first : first + batch]
        width = max(len(p) for p in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, p in enumerate(group):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                generation_config=gen,
            )
        tokens += (out.shape[1] - width) * len(group)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    del model
    torch.cuda.empty_cache()
    return {"requests": len(requests), "batch": batch, "output_tokens": tokens,
            "seconds": elapsed, "tokens_per_s": tokens / elapsed}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trace", required=True)
    parser.add_argument("--out", default="bench_engine.json")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument(
        "--parts", default="decode,prefill,offline", help="also: hostprofile, padding"
    )
    parser.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b", help="offline models")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    results: dict[str, Any] = {
        "benchmark": "bench_engine",
        "device": torch.cuda.get_device_name(0),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("PRISM_COMMIT", "unknown"),
        "torch": torch.__version__,
    }
    ceil = results["ceilings"] = ceilings()
    big = PRESETS["llama-3.1-8b"]
    if "decode" in parts:
        results["decode_8b"] = decode(big, ceil, [1, 8, 32, 128], ctx=512)
        # Long contexts at small batches: where attention, not the weights, sets the pace
        # unless each context is split over programs (flash-decoding).
        results["decode_8b_long"] = decode(big, ceil, [1, 8], ctx=8192)
    if "hostprofile" in parts:
        results["host_profile_8b"] = host_profile(big, 128, 512)
    if "prefill" in parts:
        results["prefill_8b"] = prefill(big, ceil, [512, 2048, 8192])
        # The same steps replayed from token-count graphs, and a small model's short
        # prompts, where launching layer by layer from Python sets the pace.
        results["prefill_8b_graph"] = prefill(big, ceil, [512, 2048, 8192], (512, 2048, 8192))
        small = PRESETS["llama-3.2-1b"]
        results["prefill_1b"] = prefill(small, ceil, [128, 512, 2048])
        results["prefill_1b_graph"] = prefill(small, ceil, [128, 512, 2048], (128, 512, 2048))
    if "padding" in parts:
        results["padding_8b"] = padding(big, ceil)
        results["padding_1b"] = padding(PRESETS["llama-3.2-1b"], ceil)
    if "offline" in parts:
        reqs = trace_requests(args.trace, args.requests, max_prompt=512, max_output=128)
        fixed = 64
        results["offline"] = {}
        for name in args.models.split(","):
            row: dict[str, Any] = {
                "trace_lengths": offline_prism(PRESETS[name], reqs, None),
                "fixed_output": offline_prism(PRESETS[name], reqs, fixed),
            }
            if not args.skip_hf:
                row["hf_generate_batch"] = offline_hf(PRESETS[name], reqs, fixed)
                row["prism_over_hf"] = (
                    row["fixed_output"]["tokens_per_s"] / row["hf_generate_batch"]["tokens_per_s"]
                )
                row["hf_generate_static"] = offline_hf_static(PRESETS[name], reqs, fixed)
                row["prism_over_hf_static"] = (
                    row["fixed_output"]["tokens_per_s"] / row["hf_generate_static"]["tokens_per_s"]
                )
            results["offline"][name] = row
            with open(args.out, "w") as f:  # keep what is done if a later part runs out of time
                json.dump(results, f, indent=2)
            print(name, json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\ncopy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s")  # fmt: skip
    for r in results.get("decode_8b", []) + results.get("decode_8b_long", []):
        print(f"decode 8B ctx {r['ctx']:>4} batch {r['batch']:>3}: step {r['step_ms']:6.2f} ms "
              f"(one at a time {r.get('sync_step_ms', float('nan')):6.2f}), "
              f"graph {r['graph_ms']:6.2f} ms vs floor {r['floor_ms']:6.2f} ms = "
              f"{r['over_floor']:.2f}x / {r['graph_over_floor']:.2f}x")  # fmt: skip
    if "host_profile_8b" in results:
        hp = results["host_profile_8b"]
        print(f"host profile, decode 8B batch {hp['batch']}: {hp['step_ms_profiled']:.2f} ms a "
              "step under cProfile; most time of their own (ms a step):")  # fmt: skip
        for row in hp["top_own_ms_per_step"][:12]:
            print(f"  {row['own_ms']:7.3f}  {row['function']}")
    for key in ("prefill_8b", "prefill_8b_graph", "prefill_1b", "prefill_1b_graph"):
        for r in results.get(key, []):
            print(f"prefill {key[8:]:>8} {r['tokens']:>5} tokens: {r['step_ms']:7.1f} ms, "
                  f"{r['tflops']:.0f} TFLOP/s = {r['of_matmul_rate']:.0%} of matmul")  # fmt: skip
    labels = ("powers_of_two", "default", "eager")
    for key in ("padding_8b", "padding_1b"):
        if key not in results:
            continue
        pad = results[key]
        for i, n in enumerate(pad["eager"]["rows"]):
            cells = [pad[k]["rows"][i] for k in labels]
            print(f"prefill {key[8:]} {n['tokens']:>5} tokens: " + ", ".join(
                f"{k} {c['step_ms']:.1f} ms ({c['of_matmul_rate']:.0%})"
                for k, c in zip(labels, cells, strict=True)))  # fmt: skip
        print("  engine setup + steps: "
              + ", ".join(f"{k} {pad[k]['setup_and_run_s']:.1f} s" for k in labels))  # fmt: skip
    for name, row in results.get("offline", {}).items():
        line = (f"offline {name}: trace {row['trace_lengths']['tokens_per_s']:.0f} tok/s, "
                f"fixed-64 {row['fixed_output']['tokens_per_s']:.0f} tok/s")  # fmt: skip
        if "hf_generate_batch" in row:
            line += (f", HF generate_batch {row['hf_generate_batch']['tokens_per_s']:.0f} "
                     f"tok/s = {row['prism_over_hf']:.1f}x")  # fmt: skip
        if "hf_generate_static" in row:
            line += (f", HF generate (static batches of 64) "
                     f"{row['hf_generate_static']['tokens_per_s']:.0f} tok/s = "
                     f"{row['prism_over_hf_static']:.1f}x")  # fmt: skip
        kv = row["trace_lengths"]
        line += (f"; KV peak {kv['peak_kv_mapped_gib']:.2f} GiB vs static "
                 f"{kv['static_reservation_gib']:.1f} GiB")  # fmt: skip
        print(line)


if __name__ == "__main__":
    main()
