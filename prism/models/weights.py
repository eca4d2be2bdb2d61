"""Weight naming, allocation and checked copying, keyed by Hugging Face parameter names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from prism.memory.weight_arena import WeightSpec, layout, views_over
from prism.models.config import ModelConfig

# Buffers some checkpoints carry that the model recomputes itself.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class WeightLoadError(ValueError):
    """A checkpoint does not match the tensors the model expects."""


def weight_specs(config: ModelConfig, dtype: torch.dtype) -> list[WeightSpec]:
    """Every tensor `LlamaModel.bind_weights` expects, in checkpoint order."""
    return [WeightSpec(name, shape, dtype) for name, shape in config.weight_shapes().items()]


def allocate_weights(
    config: ModelConfig, dtype: torch.dtype, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Uninitialised storage for every weight: views of one buffer laid out as a weight
    arena lays it out, so that q/k/v and gate/up lie back to back (fused GEMMs)."""
    specs = weight_specs(config, dtype)
    flat = torch.empty(layout(specs)[1], dtype=torch.uint8, device=device)
    return views_over(flat, specs)


def copy_weights(
    dst: Mapping[str, torch.Tensor],
    src: Iterable[tuple[str, torch.Tensor]],
    config: ModelConfig,
) -> None:
    """Copy a stream of (HF name, tensor) into `dst`, converting dtype and device.

    Raises WeightLoadError naming the tensor on an unexpected name, a shape mismatch, or a
    tensor of `dst` that the stream never provided.
    """
    seen: set[str] = set()
    for name, tensor in src:
        if _ignored(name, config):
            continue
        if name not in dst:
            raise WeightLoadError(f"unexpected tensor {name!r} in checkpoint")
        target = dst[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise WeightLoadError(
                f"shape mismatch for {name!r}: checkpoint has {tuple(tensor.shape)}, "
                f"model expects {tuple(target.shape)}"
            )
        target.copy_(tensor)
        seen.add(name)
    missing = [name for name in dst if name not in seen]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightLoadError(f"checkpoint is missing tensor(s) {shown}{more}")


def _ignored(name: str, config: ModelConfig) -> bool:
    # Tied checkpoints sometimes still store lm_head; it must equal the embedding, so drop it.
    tied_head = config.tie_word_embeddings and name == "lm_head.weight"
    return tied_head or name.endswith(_IGNORED_SUFFIXES)


def init_dummy_weights(tensors: Mapping[str, torch.Tensor], seed: int, std: float = 0.02) -> None:
    """Fill weights in place with deterministic random values on their own device.

    Norm weights get 1 + noise, everything else N(0, std), so activations and logits stay in
    a sane range at any model size.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, tensor in tensors.items():
        gen = generators.get(tensor.device)
        if gen is None:
            gen = generators[tensor.device] = torch.Generator(tensor.device).manual_seed(seed)
        tensor.normal_(0.0, std, generator=gen)
        if name.endswith("norm.weight"):
            tensor.add_(1.0)
