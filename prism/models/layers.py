"""Building blocks shared by the decoder layers: RMSNorm, rotary embedding, SwiGLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prism.models import triton_ops
from prism.models.config import RopeScaling


def _triton(x: torch.Tensor) -> bool:
    return x.is_cuda and triton_ops.AVAILABLE


def _fused(x: torch.Tensor) -> bool:
    """Use the Triton kernels for contiguous CUDA tensors."""
    return _triton(x) and x.is_contiguous()


def _rows_dense(x: torch.Tensor) -> bool:
    """A CUDA [T, H, D] tensor whose heads and dims are dense (rows may be strided: q, k
    and v as views of one fused projection): what the Triton RoPE kernel indexes."""
    return _triton(x) and x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., N], weight: [N]. Statistics in fp32, scaling in x's dtype (as HF does)."""
    if _triton(x):  # a strided x (q/k norm of a fused QKV) is copied to rows first
        return triton_ops.add_rms_norm(x, None, weight, eps)[0]
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x): a decoder layer's residual step."""
    if _fused(x) and residual.is_contiguous():
        return triton_ops.add_rms_norm(x, residual, weight, eps)
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def swiglu_mlp(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gate_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [T, H]; gate, up: [I, H]; down: [H, I] -> [T, H]. `gate_up` [2I, H], gate's rows
    then up's (the same memory), makes it one GEMM instead of two."""
    if gate_up is not None:
        gu = F.linear(x, gate_up)  # [T, 2I]: each row is gate's I values, then up's
        if _fused(gu):
            return F.linear(triton_ops.silu_mul_halves(gu), down)
        g, u = gu.chunk(2, dim=-1)
    else:
        g, u = F.linear(x, gate), F.linear(x, up)
    act = triton_ops.silu_mul(g, u) if _fused(g) and _fused(u) else F.silu(g) * u
    return F.linear(act, down)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, after optional scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    return _llama3_inv_freq(inv_freq, scaling)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    old_len = s.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    ramp = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, ramp, scaled)


class RotaryEmbedding:
    """Neox-style (rotate-half) RoPE with a cos/sin table for every position up front."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: RopeScaling | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        inv_freq = rope_inv_freq(head_dim, theta, scaling).to(device)
        positions = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        # Computed in fp32 and rounded to the model dtype, like HF's cos/sin.
        self.cos = freqs.cos().to(dtype)  # [P, D/2]
        self.sin = freqs.sin().to(dtype)  # [P, D/2]

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hkv, D], positions: [T] -> rotated q, k."""
        if _rows_dense(q) and _rows_dense(k):  # in place: q and k are fresh projections
            triton_ops.rope_(q, self.cos, self.sin, positions)
            triton_ops.rope_(k, self.cos, self.sin, positions)
            return q, k
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D/2]
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # each [T, H, D/2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
