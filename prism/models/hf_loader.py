"""Hugging Face checkpoint directories: config.json and (sharded) safetensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from prism.models.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"


def read_hf_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    return ModelConfig.from_hf_dict(json.loads(path.read_text()))


def safetensors_files(model_dir: Path) -> list[Path]:
    """The shard files in index order, or the lone `*.safetensors` files sorted by name."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"safetensors shard {f.name} listed in {INDEX_FILE} is missing")
    return files


def iter_hf_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, CPU tensor) one at a time, so only one tensor is resident at once."""
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)
