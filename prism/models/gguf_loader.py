"""GGUF (llama.cpp) checkpoints: tensor names mapped to HF names, dequantised to float."""

from __future__ import annotations

import re
from collections.abc import Iterator

import gguf
import numpy as np
import torch

from prism.models.config import ModelConfig
from prism.models.gguf_config import gguf_architecture

# llama.cpp name -> HF name; `{}` is the layer index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Folded into ModelConfig.rope_scaling instead of loaded as a weight.
_CONFIG_ONLY = {"rope_freqs.weight"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(gguf_name: str) -> str:
    """The HF parameter name for a llama.cpp tensor name (KeyError if unknown)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise KeyError(f"unknown GGUF tensor {gguf_name!r}")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def iter_gguf_weights(
    reader: gguf.GGUFReader, config: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, fp32 CPU tensor) per GGUF tensor, dequantised one at a time."""
    undo_permute = gguf_architecture(reader) == "llama"
    for tensor in reader.tensors:
        if tensor.name in _CONFIG_ONLY:
            continue
        name = hf_name(tensor.name)
        # Row-major data already has the HF [out, in] layout (GGUF lists dims fastest first).
        weight = torch.from_numpy(np.ascontiguousarray(_dequantize(tensor)))
        if undo_permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = unpermute_rope_rows(weight, config.num_heads)
        elif undo_permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = unpermute_rope_rows(weight, config.num_kv_heads)
        yield name, weight


def _dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    shape = tuple(int(d) for d in reversed(tensor.shape))  # HF order
    data = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if not data.flags.writeable:  # F32 tensors come back as views of the read-only memmap
        data = data.copy()
    return data.reshape(shape)


def unpermute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation for the `llama` architecture.

    HF Llama applies RoPE rotate-half style: within a head, row j pairs with row j + D/2.
    llama.cpp's converter reorders each head's rows to interleave the pairs, (j, j + D/2) ->
    (2j, 2j + 1), which its GPT-J-style RoPE expects. w: [num_heads * D, ...].
    """
    rows = w.shape[0]
    half = rows // num_heads // 2
    # GGUF row h*D + 2j + t holds HF row h*D + t*D/2 + j.
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
