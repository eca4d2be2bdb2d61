"""Probe: what an SM share of the GPU gives (CUDA green contexts, through cuda.bindings).

A bf16 8192³ matmul and a 512 MiB copy on every SM and on shares of 8, 16, 32 and 64 SMs
(10 timed runs after a warm-up), and the matmul captured as a CUDA graph on a share's
stream, replayed there and on an ordinary stream (it keeps the share). Run on the H200
on 29 Nov 2026 at e4b5cc5 (from an ignored folder, as first written; tidied since, the
measurement unchanged): its printed figures are `benchmarks/results/sm_partition_h200.json`.
The static partition of `bench_multimodel.py` and its simulation in `sim_multimodel.py`
rest on them.

Usage: python benchmarks/probe_sm_partition.py
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from cuda.bindings import driver as cu


def timed(fn: Callable[[], object], stream: torch.cuda.Stream, n: int = 10) -> float:
    """Milliseconds per call of `fn` on `stream`."""
    with torch.cuda.stream(stream):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e3


def check(result: Any) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(str(err))
    return rest[0] if len(rest) == 1 else tuple(rest)


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    print("torch", torch.__version__, "SMs", props.multi_processor_count)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB

    def matmul() -> object:
        return a @ b

    def copy() -> object:
        return x.clone()

    full = torch.cuda.Stream()
    print(f"full: matmul {timed(matmul, full):.3f} ms copy {timed(copy, full):.3f} ms")
    dev = check(cu.cuDeviceGet(0))
    res = check(cu.cuDeviceGetDevResource(dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
    print("sm resource:", res.sm.smCount, getattr(res.sm, "minSmPartitionSize", None),
          getattr(res.sm, "smCoscheduledAlignment", None))  # fmt: skip
    for sms in (8, 16, 32, 64):
        try:
            groups, _, _ = check(cu.cuDevSmResourceSplitByCount(1, res, 0, sms))
            desc = check(cu.cuDevResourceGenerateDesc([groups[0]], 1))
            flags = cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM
            green = check(cu.cuGreenCtxCreate(desc, dev, flags))
            raw = check(
                cu.cuGreenCtxStreamCreate(green, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0)
            )
            share = torch.cuda.ExternalStream(int(raw))
            print(f"green {groups[0].sm.smCount} SMs: matmul {timed(matmul, share):.3f} ms "
                  f"copy {timed(copy, share):.3f} ms")  # fmt: skip
            graph, out = torch.cuda.CUDAGraph(), torch.empty_like(a)
            with torch.cuda.stream(share):
                torch.matmul(a, b, out=out)
                torch.cuda.synchronize()
                with torch.cuda.graph(graph, stream=share):
                    torch.matmul(a, b, out=out)
            ok = torch.allclose(out.float(), (a @ b).float(), atol=1, rtol=0.05)
            print(f"   graph replay on green stream: {timed(graph.replay, share):.3f} ms, "
                  f"on full stream {timed(graph.replay, full):.3f} ms; ok {ok}")  # fmt: skip
        except Exception:
            traceback.print_exc()


if __name__ == "__main__":
    main()
