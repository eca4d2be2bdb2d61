"""Model shape and hyper-parameters for the Llama family (Llama, Mistral, Qwen2, Qwen3)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    import gguf

Architecture = Literal["llama", "qwen2", "qwen3"]

# HF `architectures` entry -> our architecture. Mistral is Llama without biases or norms of its own.
HF_ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPES: dict[str, Architecture] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}
SUPPORTED_ROPE_SCALING = ("llama3", "linear")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `llama3` uses all fields; `linear` only `factor`."""

    kind: Literal["llama3", "linear"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any] | None) -> RopeScaling | None:
        """Parse HF `rope_scaling` / `rope_parameters`; None for plain RoPE."""
        if not d:
            return None
        kind = d.get("rope_type", d.get("type", "default"))
        if kind == "default":
            return None
        if kind == "linear":
            return cls(kind="linear", factor=float(d["factor"]))
        if kind == "llama3":
            return cls(
                kind="llama3",
                factor=float(d["factor"]),
                low_freq_factor=float(d["low_freq_factor"]),
                high_freq_factor=float(d["high_freq_factor"]),
                original_max_position_embeddings=int(d["original_max_position_embeddings"]),
            )
        supported = ", ".join(SUPPORTED_ROPE_SCALING)
        raise ValueError(f"unsupported rope scaling type {kind!r}; supported: {supported}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model code needs to know about one checkpoint."""

    architecture: Architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict."""
        arch = _hf_architecture(d)
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window=True) is not supported")
        num_heads = int(d["num_attention_heads"])
        rope = d.get("rope_parameters") or {}  # transformers >= 5 folds rope_theta in here
        max_pos = int(d.get("max_position_embeddings", 4096))
        if d.get("sliding_window") and d.get("model_type") == "mistral":
            # Full attention equals Mistral's sliding window up to the window length.
            max_pos = min(max_pos, int(d["sliding_window"]))
        return cls(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // num_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            max_position_embeddings=max_pos,
            rope_scaling=RopeScaling.from_hf_dict(d.get("rope_scaling") or rope),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(d.get("attention_bias", False)),
            qk_norm=arch == "qwen3",
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(d.get("eos_token_id")),
        )

    @classmethod
    def from_gguf_metadata(cls, reader: gguf.GGUFReader) -> ModelConfig:
        """Build from the metadata (and tensor list) of an open GGUF file."""
        from prism.models.gguf_config import config_from_gguf

        return config_from_gguf(reader)

    # ---- derived shapes -------------------------------------------------------------------

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V bytes one token occupies across all layers."""
        return 2 * self.num_layers * self.kv_size * dtype.itemsize

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF parameter name -> shape, in checkpoint order. No `lm_head` when tied."""
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, self.hidden_size)
        }
        for i in range(self.num_layers):
            shapes.update(self._layer_shapes(f"model.layers.{i}."))
        shapes["model.norm.weight"] = (self.hidden_size,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return shapes

    def _layer_shapes(self, p: str) -> dict[str, tuple[int, ...]]:
        h, inter = self.hidden_size, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (self.q_size, h),
            p + "self_attn.k_proj.weight": (self.kv_size, h),
            p + "self_attn.v_proj.weight": (self.kv_size, h),
            p + "self_attn.o_proj.weight": (h, self.q_size),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if self.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (self.q_size,)
            shapes[p + "self_attn.k_proj.bias"] = (self.kv_size,)
            shapes[p + "self_attn.v_proj.bias"] = (self.kv_size,)
        if self.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (self.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (self.head_dim,)
        return shapes

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.weight_shapes().values())

    def weight_bytes(self, dtype: torch.dtype) -> int:
        return self.num_parameters * dtype.itemsize


def _hf_architecture(d: Mapping[str, Any]) -> Architecture:
    names = list(d.get("architectures") or [])
    for name in names:
        if name in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[name]
    if not names and d.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[d["model_type"]]
    found = ", ".join(names) or repr(d.get("model_type"))
    raise ValueError(f"unsupported architecture {found}; supported: {', '.join(HF_ARCHITECTURES)}")


def _as_id_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
