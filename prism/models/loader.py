"""One call from a model source to a ready model and its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from prism.models.attention import AttentionBackend
from prism.models.checkpoint import LoadFormat, open_checkpoint
from prism.models.config import ModelConfig
from prism.models.llama import LlamaModel
from prism.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    model: LlamaModel
    tokenizer: Tokenizer | None  # None for presets and directories without tokenizer.json


def load_model(
    source: str | Path | ModelConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    load_format: LoadFormat = "auto",
    seed: int = 0,
    attention: AttentionBackend | None = None,
) -> LoadedModel:
    """Load an HF directory, a GGUF file, or random weights (load_format="dummy").

    Storage is allocated on `device` first and filled in place, one checkpoint tensor at a
    time, so peak host memory is one tensor rather than the whole model.
    """
    checkpoint = open_checkpoint(source, load_format)
    model = LlamaModel.allocate(checkpoint.config, dtype, torch.device(device), attention)
    checkpoint.fill(model.weights, seed=seed)
    return LoadedModel(checkpoint.config, model, checkpoint.load_tokenizer())
