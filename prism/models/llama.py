"""Decoder-only transformer for Llama, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm).

The model owns no storage: it is built empty and `bind_weights` hands it the exact tensors
to compute with (HF names, shapes from `weight_specs`). Whoever owns GPU memory allocates,
binds, then copies checkpoint data in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F

from prism.models.attention import AttentionBackend, AttentionMetadata, KVCache
from prism.models.config import ModelConfig
from prism.models.layers import RotaryEmbedding, add_rms_norm, rms_norm, swiglu_mlp
from prism.models.torch_attention import TorchAttention
from prism.models.weights import WeightLoadError, allocate_weights


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's tensors (H hidden, I intermediate, D head dim)."""

    input_norm: torch.Tensor  # [H]
    q_proj: torch.Tensor  # [Hq * D, H]
    k_proj: torch.Tensor  # [Hkv * D, H]
    v_proj: torch.Tensor  # [Hkv * D, H]
    o_proj: torch.Tensor  # [H, Hq * D]
    post_norm: torch.Tensor  # [H]
    gate_proj: torch.Tensor  # [I, H]
    up_proj: torch.Tensor  # [I, H]
    down_proj: torch.Tensor  # [H, I]
    q_bias: torch.Tensor | None  # [Hq * D], Qwen2
    k_bias: torch.Tensor | None  # [Hkv * D]
    v_bias: torch.Tensor | None  # [Hkv * D]
    q_norm: torch.Tensor | None  # [D], Qwen3
    k_norm: torch.Tensor | None  # [D]
    # q, k, v (and their biases) and gate, up as one tensor each when they lie back to back
    # in memory (as the weight layout puts them): one GEMM instead of three, and of two.
    qkv: torch.Tensor | None = None  # [(Hq + 2 Hkv) * D, H]
    qkv_bias: torch.Tensor | None = None
    gate_up: torch.Tensor | None = None  # [2 I, H]

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor], layer: int) -> LayerWeights:
        p = f"model.layers.{layer}."
        a = p + "self_attn."
        qkv = back_to_back([t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"]])
        qkv_bias = None
        if a + "q_proj.bias" in t:
            biases = [t[a + "q_proj.bias"], t[a + "k_proj.bias"], t[a + "v_proj.bias"]]
            qkv_bias = back_to_back(biases)
            qkv = qkv if qkv_bias is not None else None  # both fused, or neither
        return cls(
            qkv=qkv,
            qkv_bias=qkv_bias,
            gate_up=back_to_back([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]]),
            input_norm=t[p + "input_layernorm.weight"],
            q_proj=t[p + "self_attn.q_proj.weight"],
            k_proj=t[p + "self_attn.k_proj.weight"],
            v_proj=t[p + "self_attn.v_proj.weight"],
            o_proj=t[p + "self_attn.o_proj.weight"],
            post_norm=t[p + "post_attention_layernorm.weight"],
            gate_proj=t[p + "mlp.gate_proj.weight"],
            up_proj=t[p + "mlp.up_proj.weight"],
            down_proj=t[p + "mlp.down_proj.weight"],
            q_bias=t.get(p + "self_attn.q_proj.bias"),
            k_bias=t.get(p + "self_attn.k_proj.bias"),
            v_bias=t.get(p + "self_attn.v_proj.bias"),
            q_norm=t.get(p + "self_attn.q_norm.weight"),
            k_norm=t.get(p + "self_attn.k_norm.weight"),
        )


def back_to_back(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """One tensor over `parts` (rows concatenated, no copy) if they lie back to back in one
    storage, contiguous, of one dtype and row shape; None otherwise."""
    first = parts[0]
    address = first.data_ptr()
    for part in parts:
        if (
            part.data_ptr() != address
            or not part.is_contiguous()
            or part.dtype != first.dtype
            or part.shape[1:] != first.shape[1:]
            or part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
        ):
            return None
        address += part.nbytes
    rows = sum(part.shape[0] for part in parts)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


class LlamaModel:
    """forward(input_ids, positions, kv_caches, meta) -> hidden; compute_logits(hidden)."""

    def __init__(self, config: ModelConfig, attention: AttentionBackend | None = None) -> None:
        self.config = config
        self.attention = attention if attention is not None else TorchAttention()
        self.scale = config.head_dim**-0.5
        self._weights: dict[str, torch.Tensor] = {}
        self._layers: list[LayerWeights] = []
        self._rotary: RotaryEmbedding | None = None

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device | str,
        attention: AttentionBackend | None = None,
    ) -> LlamaModel:
        """A model bound to freshly allocated, uninitialised weights."""
        model = cls(config, attention)
        model.bind_weights(allocate_weights(config, dtype, device))
        return model

    # ---- weights --------------------------------------------------------------------------

    def bind_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Compute with exactly these tensors from now on (no copy).

        `tensors` must hold every name of `config.weight_shapes()` with that shape, all of
        one dtype and on one device.
        """
        self._check_bindable(tensors)
        cfg = self.config
        self._weights = {name: tensors[name] for name in cfg.weight_shapes()}
        self._layers = [LayerWeights.from_tensors(self._weights, i) for i in range(cfg.num_layers)]
        embed = self._weights["model.embed_tokens.weight"]
        self._rotary = RotaryEmbedding(
            cfg.head_dim,
            cfg.max_position_embeddings,
            cfg.rope_theta,
            cfg.rope_scaling,
            dtype=embed.dtype,
            device=embed.device,
        )

    def _check_bindable(self, tensors: Mapping[str, torch.Tensor]) -> None:
        shapes = self.config.weight_shapes()
        missing = [n for n in shapes if n not in tensors]
        unexpected = [n for n in tensors if n not in shapes]
        if missing or unexpected:
            raise WeightLoadError(
                f"cannot bind: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, shape in shapes.items():
            if tuple(tensors[name].shape) != shape:
                got = tuple(tensors[name].shape)
                raise WeightLoadError(f"cannot bind {name!r}: got shape {got}, expected {shape}")
        kinds = {(t.dtype, t.device) for t in tensors.values()}
        if len(kinds) != 1:
            raise WeightLoadError(
                f"weights must share one dtype and device, got {sorted(map(str, kinds))}"
            )

    @property
    def weights(self) -> Mapping[str, torch.Tensor]:
        """The bound tensors by HF name (read-only mapping; the tensors are live)."""
        return MappingProxyType(self._weights)

    @property
    def dtype(self) -> torch.dtype:
        return self._embed.dtype

    @property
    def device(self) -> torch.device:
        return self._embed.device

    @property
    def _embed(self) -> torch.Tensor:
        if not self._weights:
            raise RuntimeError("model has no weights yet: call bind_weights() first")
        return self._weights["model.embed_tokens.weight"]

    # ---- compute --------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, H]."""
        if len(kv_caches) != self.config.num_layers:
            raise ValueError(f"expected {self.config.num_layers} KV caches, got {len(kv_caches)}")
        eps = self.config.rms_norm_eps
        residual = F.embedding(input_ids, self._embed)  # [T, H]
        x = rms_norm(residual, self._layers[0].input_norm, eps)
        norms = [layer.input_norm for layer in self._layers[1:]]
        norms.append(self._weights["model.norm.weight"])
        for layer, kv_cache, next_norm in zip(self._layers, kv_caches, norms, strict=True):
            out = self._attention(layer, x, positions, kv_cache, meta)
            x, residual = add_rms_norm(out, residual, layer.post_norm, eps)
            out = swiglu_mlp(x, layer.gate_proj, layer.up_proj, layer.down_proj, layer.gate_up)
            x, residual = add_rms_norm(out, residual, next_norm, eps)
        return x

    __call__ = forward

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> logits [N, vocab] in the model dtype."""
        head = self._weights.get("lm_head.weight", self._embed)
        return F.linear(hidden, head)

    def _attention(
        self,
        layer: LayerWeights,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """x: [T, H] -> attention output projected back to [T, H]."""
        cfg = self.config
        tokens = x.shape[0]
        if layer.qkv is not None:  # views of one product: rows strided, last dim dense
            q, k, v = F.linear(x, layer.qkv, layer.qkv_bias).split(
                [cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1
            )
        else:
            q = F.linear(x, layer.q_proj, layer.q_bias)
            k = F.linear(x, layer.k_proj, layer.k_bias)
            v = F.linear(x, layer.v_proj, layer.v_bias)
        q = q.view(tokens, cfg.num_heads, cfg.head_dim)
        k = k.view(tokens, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(tokens, cfg.num_kv_heads, cfg.head_dim)
        if layer.q_norm is not None and layer.k_norm is not None:
            q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        assert self._rotary is not None
        q, k = self._rotary(q, k, positions)
        out = self.attention.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return F.linear(out.view(tokens, cfg.q_size), layer.o_proj)  # [T, H]
