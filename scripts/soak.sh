#!/usr/bin/env bash
# Soak run of the memory-pressure chaos tests (tests/serving/test_worker_chaos.py): each
# test runs SECONDS of random submits, aborts, sleeps, wakes and KV limits per seed, for
# ROUNDS seeds in a row; the figures of every run are printed.
#   scripts/soak.sh [SECONDS (default 600)] [ROUNDS (default 1)] [FIRST_SEED (default 1)]
# Any failure stops the loop and names the seed (PRISM_CHAOS_SEED=... replays it).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
rounds=${2:-1}
first=${3:-1}
for ((seed = first; seed < first + rounds; seed++)); do
  echo "== soak: seed $seed, ${seconds}s per test"
  if ! PRISM_SOAK_SECONDS="$seconds" PRISM_CHAOS_SEED="$seed" \
    .venv/bin/python -m pytest tests/serving/test_worker_chaos.py -q -s -p no:cacheprovider; then
    echo "== soak FAILED at seed $seed: PRISM_CHAOS_SEED=$seed PRISM_SOAK_SECONDS=$seconds" >&2
    exit 1
  fi
done
echo "== soak passed: $rounds seed(s) from $first, ${seconds}s per test"
