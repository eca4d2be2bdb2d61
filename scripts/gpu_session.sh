#!/usr/bin/env bash
# The GPU checks and benchmarks, one part per device call (each fits the 10-minute limit):
#
#   bash scripts/gpu_session.sh PART [PART ...]
#
#   tests       every `-m gpu` test (pool, caches, kernels, engine, worker, chaos) →
#               gpu_tests_h200.json (outcomes, the chaos figures); the modules that
#               import the server hold none and need fastapi and openai (not in the image)
#   engine      benchmarks/bench_engine.py: decode/prefill against the floor, the host's
#               share of a batch-128 decode step, a 1,100-token step's graph padding
#               (part `padding`, not in the default list), offline (ENGINE_PARTS picks the parts,
#               ENGINE_MODELS the offline models: the 1B's part takes ~4 min, the 8B's ~7)
#   worker      benchmarks/bench_worker.py: overlap of co-located models, shift at 3 rates
#   wake        benchmarks/bench_worker.py: wake latency against the H2D floor, steady
#   multimodel  benchmarks/bench_multimodel.py: 8 models at 80 GiB; MODES (default
#               prism,static,spatial,swap) and SLOS (a JSON of solo SLOs from an earlier call, put
#               under .traces/ and carried) split it over calls: a mode takes ~5-9 min;
#               MM_ARGS adds options (e.g. "--seconds 20 --grace 10 --solo-seconds 20
#               --solo-requests 20"); a mode written prism:free runs free running
#   memory      benchmarks/bench_memory.py (driver floor, moves, p99s); PIN_CPU=N pins it
#               to core N (pinned to core 2 at d527b03, the request-path p50 was 3x the
#               unpinned run's at 8a508d1; pinning or the host, not known yet)
#   validate    benchmarks/validate_sim.py: the simulator against the live worker
#               (GRAPH_TOKENS: graphs for prefill steps, e.g. 64,128,256 or none;
#               default the engine's)
#
# Results go under $OUT (the device tool copies them back); logs print as they run.
# Needs PRISM_COMMIT (the device checkout's git HEAD may be stale). Traces come from
# TRACES (default .traces, laid out as ../shared/traces: azure-llm-2023/ and
# servegen/data/language/m-large/); carry `.whl` (the gguf wheel) and `.traces`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results}
TRACES=${TRACES:-.traces}
mkdir -p "$OUT"
export PRISM_COMMIT=${PRISM_COMMIT:-$(git rev-parse --short HEAD)}
# The image's pip may serve another interpreter: install the carried wheels beside the tree.
if ! python -c "import gguf" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
azure=$TRACES/azure-llm-2023/AzureLLMInferenceTrace_code.csv

for part in "$@"; do
    echo "=== $part ($(date -u +%H:%M:%S)) ==="
    case $part in
        tests)
            status=0  # a failing run still writes its report, then fails the script
            python -m pytest -m gpu -q -p no:cacheprovider -o junit_family=xunit1 \
                --junitxml="$OUT/gpu_tests.xml" \
                --ignore tests/server --ignore tests/serving/test_fleet_serve.py \
                --ignore tests/sim/test_sim_cli.py \
                2>&1 | tee "$OUT/gpu_tests.log" | tail -40 || status=$?
            python scripts/gpu_test_report.py "$OUT/gpu_tests.xml" "$OUT/gpu_tests_h200.json"
            [ "$status" -eq 0 ] || exit "$status"
            ;;
        engine)
            python benchmarks/bench_engine.py --trace "$azure" --out "$OUT/bench_engine_h200.json" \
                --parts "${ENGINE_PARTS:-decode,hostprofile,prefill,offline}" \
                --models "${ENGINE_MODELS:-llama-3.2-1b,llama-3.1-8b}"
            ;;
        worker)
            python benchmarks/bench_worker.py --parts overlap,shift --rates 8,11,14 \
                --out "$OUT/bench_worker_shift_h200.json"
            ;;
        wake)
            python benchmarks/bench_worker.py --parts wake,steady --out "$OUT/bench_worker_h200.json"
            ;;
        multimodel)
            # shellcheck disable=SC2086  # MM_ARGS is a list of options
            python benchmarks/bench_multimodel.py --traces "$TRACES" \
                --modes "${MODES:-prism,static,spatial,swap}" ${SLOS:+--slos "$SLOS"} ${MM_ARGS:-} \
                --out "$OUT/bench_multimodel_h200.json"
            ;;
        memory)
            python benchmarks/bench_memory.py ${PIN_CPU:+--pin-cpu "$PIN_CPU"} \
                --out "$OUT/bench_memory_h200.json"
            ;;
        validate)
            python benchmarks/validate_sim.py --device cuda --traces "$TRACES" \
                ${GRAPH_TOKENS:+--graph-tokens "$GRAPH_TOKENS"} --out "$OUT/validate_sim_h200.json"
            ;;
        *)
            echo "unknown part: $part" >&2
            exit 2
            ;;
    esac
done
