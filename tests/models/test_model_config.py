"""ModelConfig parsing, presets and derived sizes; RoPE and RMSNorm against transformers."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from prism.models import PRESETS, ModelConfig, RopeScaling
from prism.models.layers import rms_norm, rope_inv_freq

LLAMA_31_8B_JSON: dict[str, Any] = {  # the published config.json, old-style rope keys
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
}


def test_llama_json_matches_preset() -> None:
    """Old-style rope keys and an eos list parse to exactly the llama-3.1-8b preset."""
    assert ModelConfig.from_hf_dict(LLAMA_31_8B_JSON) == PRESETS["llama-3.1-8b"]


@pytest.mark.parametrize(
    "name, params",
    [
        ("llama-3.1-8b", 8_030_261_248),
        ("llama-3.2-1b", 1_235_814_400),
        ("llama-3.2-3b", 3_212_749_824),
        ("qwen3-8b", 8_190_735_360),
        ("qwen3-1.7b", 1_720_574_976),
    ],
)
def test_preset_parameter_counts(name: str, params: int) -> None:
    """Counts equal the published models' (tied embeddings counted once)."""
    config = PRESETS[name]
    assert config.num_parameters == params
    assert config.weight_bytes(torch.bfloat16) == 2 * params


def test_kv_bytes_per_token() -> None:
    # 2 (K and V) * 32 layers * 8 kv heads * 128 dims * 2 bytes
    assert PRESETS["llama-3.1-8b"].kv_bytes_per_token(torch.bfloat16) == 131072
    assert PRESETS["qwen3-8b"].kv_bytes_per_token(torch.float32) == 2 * 36 * 8 * 128 * 4


def test_family_flags() -> None:
    base = {k: v for k, v in LLAMA_31_8B_JSON.items() if not k.startswith("rope")}
    qwen2 = ModelConfig.from_hf_dict({**base, "architectures": ["Qwen2ForCausalLM"]})
    assert (qwen2.architecture, qwen2.attention_bias, qwen2.qk_norm) == ("qwen2", True, False)
    qwen3 = ModelConfig.from_hf_dict(
        {**base, "architectures": ["Qwen3ForCausalLM"], "head_dim": 64}
    )
    assert (qwen3.architecture, qwen3.attention_bias, qwen3.qk_norm) == ("qwen3", False, True)
    assert (
        qwen3.head_dim == 64 and "model.layers.0.self_attn.q_norm.weight" in qwen3.weight_shapes()
    )
    assert qwen2.rope_scaling is None and qwen2.rope_theta == 10000.0


def test_mistral_sliding_window_caps_context() -> None:
    """Full attention is exact up to the window, so the usable context stops there."""
    d = {**LLAMA_31_8B_JSON, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    config = ModelConfig.from_hf_dict({**d, "sliding_window": 4096, "rope_scaling": None})
    assert config.architecture == "llama" and config.max_position_embeddings == 4096


def test_tied_config_has_no_lm_head() -> None:
    assert "lm_head.weight" not in PRESETS["llama-3.2-1b"].weight_shapes()
    assert "lm_head.weight" in PRESETS["llama-3.1-8b"].weight_shapes()


def test_unsupported_architecture_is_named() -> None:
    d = {**LLAMA_31_8B_JSON, "architectures": ["GPT2LMHeadModel"]}
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        ModelConfig.from_hf_dict(d)


def test_unsupported_rope_scaling_is_named() -> None:
    d = {**LLAMA_31_8B_JSON, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ValueError, match=r"'yarn'.*llama3, linear"):
        ModelConfig.from_hf_dict(d)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["qwen3-8b"].num_layers = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "rope_scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ],
)
def test_rope_inv_freq_matches_transformers(rope_scaling: dict[str, Any] | None) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(
        hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling=rope_scaling
    )
    kind = hf.rope_parameters["rope_type"]
    if kind == "default":
        expected = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    ours = rope_inv_freq(128, 500000.0, RopeScaling.from_hf_dict(rope_scaling))
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
        x = torch.randn(5, 64).to(dtype) * 3
        torch.testing.assert_close(rms_norm(x, norm.weight, 1e-5), norm(x), atol=0, rtol=0)
