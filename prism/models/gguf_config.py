"""ModelConfig from the metadata of a llama.cpp GGUF file."""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np
import torch

from prism.models.config import Architecture, ModelConfig, RopeScaling
from prism.models.layers import rope_inv_freq

GGUF_ARCHITECTURES: tuple[Architecture, ...] = ("llama", "qwen2", "qwen3")
_MISSING = object()


def gguf_field(reader: gguf.GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """The python value of metadata `key`; `default` (or KeyError) when absent."""
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
            raise KeyError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()


def gguf_architecture(reader: gguf.GGUFReader) -> Architecture:
    arch = gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    return arch


def config_from_gguf(reader: gguf.GGUFReader) -> ModelConfig:
    arch = gguf_architecture(reader)
    tensors = {t.name: t for t in reader.tensors}

    def meta(key: str, default: Any = _MISSING) -> Any:
        return gguf_field(reader, f"{arch}.{key}", default)

    hidden = int(meta("embedding_length"))
    num_heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // num_heads))
    theta = _decimal(meta("rope.freq_base", 10000.0))
    embed = tensors["token_embd.weight"]
    return ModelConfig(
        architecture=arch,
        vocab_size=int(meta("vocab_size", int(embed.shape[-1]))),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=_decimal(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        max_position_embeddings=int(meta("context_length")),
        rope_scaling=_rope_scaling(reader, arch, tensors, head_dim, theta),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_ids=_eos_ids(reader),
    )


def _decimal(value: float) -> float:
    """GGUF floats are float32: 1e-5 reads back as 9.99999974e-06. Take the shortest decimal
    that rounds to the same float32, which is what the model's author wrote."""
    return float(str(np.float32(value)))


def _eos_ids(reader: gguf.GGUFReader) -> tuple[int, ...]:
    # llama.cpp stops on end-of-turn / end-of-message tokens as well as on EOS.
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = [gguf_field(reader, f"tokenizer.ggml.{k}", None) for k in keys]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _rope_scaling(
    reader: gguf.GGUFReader, arch: str, tensors: dict[str, Any], head_dim: int, theta: float
) -> RopeScaling | None:
    kind = gguf_field(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        return RopeScaling(
            kind="linear", factor=_decimal(gguf_field(reader, f"{arch}.rope.scaling.factor"))
        )
    if kind not in ("none", ""):
        raise ValueError(f"unsupported GGUF rope scaling type {kind!r}; supported: linear, llama3")
    if "rope_freqs.weight" in tensors:
        factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float32)
        original = int(gguf_field(reader, f"{arch}.rope.scaling.original_context_length", 8192))
        return _fit_llama3(torch.from_numpy(factors.copy()), head_dim, theta, original)
    return None


def _fit_llama3(
    factors: torch.Tensor, head_dim: int, theta: float, original_context: int = 8192
) -> RopeScaling:
    """llama.cpp stores llama3 scaling as per-frequency divisors; recover the parameters.

    factors: [head_dim / 2], inv_freq_scaled = inv_freq / factors. The largest divisor is the
    scaling factor; the low/high frequency factors (1, 4) and original context (8192 unless
    the file says) have been the same for every Llama 3.x release. Checked, not assumed.
    """
    scaling = RopeScaling(
        kind="llama3",
        factor=_decimal(float(factors.max())),
        original_max_position_embeddings=original_context,
    )
    expected = rope_inv_freq(head_dim, theta, None) / factors
    if not torch.allclose(rope_inv_freq(head_dim, theta, scaling), expected, rtol=1e-4):
        raise ValueError("GGUF rope_freqs.weight does not match llama3 rope scaling")
    return scaling
