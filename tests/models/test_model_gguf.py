"""GGUF loading on tiny files written here the way llama.cpp's converter writes them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from models_helpers import TINY_VARIANTS, PagedRunner

from prism.models import LlamaModel, ModelConfig, RopeScaling, open_checkpoint
from prism.models.gguf_loader import hf_name, unpermute_rope_rows
from prism.models.layers import rope_inv_freq

ATOL_FP32 = 1e-4
PROMPTS = [[5, 17, 200, 3, 9], list(range(20, 31))]

_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(name: str) -> str:
    if name in _TO_GGUF:
        return _TO_GGUF[name]
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{_LAYER_TO_GGUF[rest]}"


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows of `llama` models (pairs j, j+D/2 adjacent)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(hf_model: Any, path: Path) -> None:
    """A float32 GGUF of `hf_model`, metadata as llama.cpp names it (no tokenizer)."""
    cfg = ModelConfig.from_hf_dict(hf_model.config.to_dict())
    arch = cfg.architecture
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    scaling = cfg.rope_scaling
    if scaling is not None and scaling.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling.factor)
    elif scaling is not None:  # llama3: llama.cpp stores per-frequency divisors instead
        base = rope_inv_freq(cfg.head_dim, cfg.rope_theta, None)
        divisors = base / rope_inv_freq(cfg.head_dim, cfg.rope_theta, scaling)
        writer.add_tensor("rope_freqs.weight", divisors.numpy().astype(np.float32))
        writer.add_rope_scaling_orig_ctx_len(scaling.original_max_position_embeddings)
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.detach().numpy().astype(np.float32)
        if arch == "llama" and "q_proj" in name:
            w = llama_cpp_permute(w, cfg.num_heads)
        elif arch == "llama" and "k_proj" in name:
            w = llama_cpp_permute(w, cfg.num_kv_heads)
        writer.add_tensor(gguf_name(name), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_gguf_matches_transformers(
    variant: str,
    tiny_checkpoint: Callable[[str], tuple[Any, Path]],
    paged_runner: type[PagedRunner],
    tmp_path: Path,
) -> None:
    """Config from metadata equals the HF config's; logits within ATOL_FP32 of transformers."""
    hf_model, hf_dir = tiny_checkpoint(variant)
    path = tmp_path / f"{variant}.gguf"
    write_gguf(hf_model, path)
    checkpoint = open_checkpoint(path)
    expected_config = open_checkpoint(hf_dir).config
    assert checkpoint.config == expected_config
    model = LlamaModel.allocate(checkpoint.config, torch.float32, "cpu")
    checkpoint.fill(model.weights)
    out = paged_runner(model, len(PROMPTS), 16).step(PROMPTS)
    for seq, logits in zip(PROMPTS, out, strict=True):
        with torch.no_grad():
            expected = hf_model(torch.tensor([seq])).logits[0]
        torch.testing.assert_close(logits, expected, atol=ATOL_FP32, rtol=0)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    restored = unpermute_rope_rows(torch.from_numpy(llama_cpp_permute(w, 6)), 6)
    assert torch.equal(restored, torch.from_numpy(w))


def test_llama3_rope_recovered_from_freq_divisors() -> None:
    from prism.models.gguf_config import _fit_llama3

    scaling = RopeScaling(kind="llama3", factor=32.0)
    divisors = rope_inv_freq(64, 500000.0, None) / rope_inv_freq(64, 500000.0, scaling)
    assert _fit_llama3(divisors, 64, 500000.0) == scaling
    with pytest.raises(ValueError, match="rope_freqs"):
        _fit_llama3(divisors * 1.5, 64, 500000.0)


def test_name_mapping() -> None:
    assert hf_name("blk.12.attn_k_norm.weight") == "model.layers.12.self_attn.k_norm.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(KeyError, match=r"blk\.0\.ffn_gate_exps\.weight"):
        hf_name("blk.0.ffn_gate_exps.weight")


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(path, "phi2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'phi2'.*llama, qwen2, qwen3"):
        open_checkpoint(path)
