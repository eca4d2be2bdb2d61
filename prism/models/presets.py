"""Published shapes of a few real models, for benchmarks with random weights."""

from __future__ import annotations

from prism.models.config import ModelConfig, RopeScaling

_LLAMA3_EOS = (128001, 128008, 128009)  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
_QWEN3_EOS = (151645, 151643)  # <|im_end|>, <|endoftext|>


def _llama3(
    hidden: int, inter: int, layers: int, heads: int, head_dim: int, factor: float, tied: bool
) -> ModelConfig:
    return ModelConfig(
        architecture="llama",
        vocab_size=128256,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=8,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling=RopeScaling(kind="llama3", factor=factor),
        tie_word_embeddings=tied,
        bos_token_id=128000,
        eos_token_ids=_LLAMA3_EOS,
    )


def _qwen3(hidden: int, inter: int, layers: int, heads: int, tied: bool) -> ModelConfig:
    return ModelConfig(
        architecture="qwen3",
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=tied,
        qk_norm=True,
        bos_token_id=151643,
        eos_token_ids=_QWEN3_EOS,
    )


PRESETS: dict[str, ModelConfig] = {
    "llama-3.1-8b": _llama3(4096, 14336, 32, 32, 128, factor=8.0, tied=False),
    "llama-3.2-1b": _llama3(2048, 8192, 16, 32, 64, factor=32.0, tied=True),
    "llama-3.2-3b": _llama3(3072, 8192, 28, 24, 128, factor=32.0, tied=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, tied=False),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, tied=True),
}
