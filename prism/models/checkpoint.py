"""A checkpoint source: its config, its weights as a stream of HF-named tensors, its tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gguf
import torch

from prism.models.config import ModelConfig
from prism.models.gguf_loader import iter_gguf_weights
from prism.models.hf_loader import iter_hf_weights, read_hf_config
from prism.models.presets import PRESETS
from prism.models.tokenizer import Tokenizer
from prism.models.weights import WeightLoadError, copy_weights, init_dummy_weights

CheckpointFormat = Literal["hf", "gguf", "dummy"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: truncated, corrupt, or of a kind Prism does not
    support. The message names the file and keeps the parser's message; the parser's own
    exception is chained as the cause."""


@contextmanager
def _reading(path: Path | None) -> Iterator[None]:
    """Turn whatever a parser raises on a malformed file into a `CheckpointError`."""
    try:
        yield
    except (CheckpointError, WeightLoadError, FileNotFoundError, PermissionError):
        raise
    except MemoryError as e:
        raise CheckpointError(f"{path}: claims more memory than there is ({e})") from e
    except Exception as e:  # parsers of three formats raise anything on a bad file
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e


LoadFormat = Literal["auto", "hf", "gguf", "dummy"]


@dataclass(frozen=True)
class Checkpoint:
    """Weights to load. `fill` writes them into storage that someone else allocated."""

    config: ModelConfig
    format: CheckpointFormat
    path: Path | None = None  # HF directory or GGUF file; None for a preset or bare config
    reader: gguf.GGUFReader | None = None  # open (memory-mapped) GGUF file

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, CPU tensor) pairs, one tensor materialised at a time."""
        if self.format == "hf" and self.path is not None:
            return iter_hf_weights(self.path)
        if self.format == "gguf" and self.reader is not None:
            return iter_gguf_weights(self.reader, self.config)
        raise ValueError(f"a {self.format!r} checkpoint has no stored weights")

    def fill(
        self,
        tensors: Mapping[str, torch.Tensor],
        seed: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Write this checkpoint's weights into `tensors` (names and shapes of weight_specs);
        `progress(nbytes)` is called after each tensor read."""
        if self.format == "dummy":
            init_dummy_weights(tensors, seed)
            if progress is not None:
                progress(sum(t.numel() * t.element_size() for t in tensors.values()))
            return
        with _reading(self.path):
            copy_weights(tensors, _reporting(self.iter_weights(), progress), self.config)

    def load_tokenizer(self) -> Tokenizer | None:
        with _reading(self.path):
            if self.reader is not None:
                return Tokenizer.from_gguf(self.reader)
            if self.path is not None and (self.path / "tokenizer.json").is_file():
                return Tokenizer.from_pretrained(self.path)
        return None


def _reporting(
    weights: Iterator[tuple[str, torch.Tensor]], progress: Callable[[int], None] | None
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        yield name, tensor
        if progress is not None:
            progress(tensor.numel() * tensor.element_size())


def open_checkpoint(
    source: str | Path | ModelConfig, load_format: LoadFormat = "auto"
) -> Checkpoint:
    """Resolve `source` (HF directory, GGUF file, preset name or ModelConfig) to a Checkpoint.

    Random weights are never chosen implicitly: presets and bare configs need
    load_format="dummy"; with a file or directory, "dummy" keeps its config and tokenizer.
    """
    if isinstance(source, ModelConfig) or (isinstance(source, str) and source in PRESETS):
        if load_format != "dummy":
            raise ValueError(f"{_describe(source)} has no weights: pass load_format='dummy'")
        config = source if isinstance(source, ModelConfig) else PRESETS[source]
        return Checkpoint(config, "dummy")
    path = Path(source)
    stored = _stored_format(path)
    if load_format not in ("auto", "dummy", stored):
        raise ValueError(f"{path} is a {stored!r} checkpoint, not {load_format!r}")
    fmt: CheckpointFormat = "dummy" if load_format == "dummy" else stored
    if stored == "hf":
        with _reading(path / "config.json"):
            return Checkpoint(read_hf_config(path), fmt, path)
    gguf_path = path if path.is_file() else _single_gguf(path)
    with _reading(gguf_path):
        reader = gguf.GGUFReader(gguf_path)
        return Checkpoint(ModelConfig.from_gguf_metadata(reader), fmt, gguf_path, reader)


def _stored_format(path: Path) -> Literal["hf", "gguf"]:
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    if path.is_dir() and list(path.glob("*.gguf")):
        return "gguf"
    if not path.exists():
        presets = ", ".join(PRESETS)
        raise FileNotFoundError(
            f"model {str(path)!r} not found (presets need load_format='dummy': {presets})"
        )
    raise FileNotFoundError(f"{path} is neither a .gguf file nor a directory with config.json")


def _single_gguf(model_dir: Path) -> Path:
    files = sorted(model_dir.glob("*.gguf"))
    if len(files) != 1:
        raise ValueError(f"expected one .gguf file in {model_dir}, found {[f.name for f in files]}")
    return files[0]


def _describe(source: str | ModelConfig) -> str:
    return f"preset {source!r}" if isinstance(source, str) else "a bare ModelConfig"
