"""Malformed checkpoint files: every load ends in an error that names the file.

Seed files (a tiny GGUF without a tokenizer and a tiny safetensors directory, both
valid) are mutated —
truncated at random offsets, bytes overwritten, length fields blown up — and each one
is loaded completely (config, every weight, tokenizer). A load may succeed (a flipped
byte inside a weight is still a valid file) or raise `CheckpointError`,
`WeightLoadError` or `FileNotFoundError`; anything else is a failure. The loads run in a
child process with a time limit, so a segfault or a hang fails the test instead of
killing or stalling the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from models_helpers import build_tiny_hf_model
from test_model_gguf import write_gguf

CASES = 150

CHILD = textwrap.dedent(
    """
    import json, random, shutil, sys
    from pathlib import Path
    import torch
    from prism.models.checkpoint import CheckpointError, open_checkpoint
    from prism.models.weights import WeightLoadError, weight_specs

    kind, seed_path, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    cases = int(sys.argv[4])
    target_name = "model.safetensors" if kind == "hf" else seed_path.name
    original = (seed_path / target_name if kind == "hf" else seed_path).read_bytes()
    rng = random.Random(1234)
    outcomes = {}

    def mutate(data):
        how = rng.choice(["truncate", "flip", "flip-header", "huge-length", "garbage"])
        b = bytearray(data)
        if how == "truncate":
            return how, bytes(b[: rng.randrange(len(b))])
        if how == "flip":
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif how == "flip-header":  # where counts, lengths, types and offsets live
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(min(len(b), 4096))] = rng.randrange(256)
        elif how == "huge-length":  # a 64-bit count or length set to a huge value
            at = rng.randrange(min(len(b), 4096) - 8)
            b[at : at + 8] = rng.choice([2**63 - 1, 2**40, 2**32 + 7]).to_bytes(8, "little")
        else:
            return how, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2048)))
        return how, bytes(b)

    for case in range(cases):
        how, data = mutate(original)
        if kind == "hf":
            target = work / f"case{case}"
            shutil.copytree(seed_path, target)
            (target / target_name).write_bytes(data)
        else:
            target = work / f"case{case}.gguf"
            target.write_bytes(data)
        try:
            ckpt = open_checkpoint(target)
            specs = weight_specs(ckpt.config, torch.float32)
            if sum(s.nbytes for s in specs) > 1 << 30:
                raise CheckpointError("claims more than 1 GiB of weights")  # a test limit
            ckpt.fill({s.name: torch.empty(s.shape) for s in specs})
            if kind == "hf":  # the tiny GGUF has no tokenizer to load
                ckpt.load_tokenizer()
            outcome = "loaded"
        except (CheckpointError, WeightLoadError, FileNotFoundError) as e:
            outcome = type(e).__name__
            assert str(target) in str(e) or isinstance(e, WeightLoadError), str(e)
        except Exception as e:
            print(f"case {case} ({how}): unexpected {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(1)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if kind == "hf":
            shutil.rmtree(target)
        else:
            target.unlink()
    print(json.dumps(outcomes))
    """
)


def _fuzz(kind: str, seed: Path, work: Path) -> dict[str, Any]:
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(seed), str(work), str(CASES)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    outcomes: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sum(outcomes.values()) == CASES
    assert outcomes.get("CheckpointError", 0) > CASES // 4  # the mutations did break files
    assert outcomes.get("loaded", 0) > 0  # and not every mutation does: the check is not blind
    return outcomes


def test_malformed_gguf_files_raise_clear_errors(tmp_path: Path) -> None:
    seed = tmp_path / "tiny.gguf"
    write_gguf(build_tiny_hf_model("llama-llama3-rope"), seed)
    _fuzz("gguf", seed, tmp_path / "work")


def test_malformed_safetensors_raise_clear_errors(tmp_path: Path) -> None:
    seed = tmp_path / "tiny-hf"
    build_tiny_hf_model("qwen2-bias").save_pretrained(seed)
    _fuzz("hf", seed, tmp_path / "work")


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", '{"architectures": 5}', "\xff\xfe"])
def test_malformed_config_json_names_the_file(tmp_path: Path, text: str) -> None:
    from prism.models.checkpoint import CheckpointError, open_checkpoint

    build_tiny_hf_model("qwen2-bias").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(text, errors="surrogateescape")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        open_checkpoint(tmp_path)
