"""Fused Triton kernels against the plain torch code they replace (`pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of bf16 resolution at b's magnitude."""
    scale = b.float().abs().clamp_min(1e-3) * 2**-7
    return float(((a.float() - b.float()).abs() / scale).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_add_rms_norm_matches_torch(dtype: torch.dtype) -> None:
    """Fused residual add + RMSNorm equals add then norm (within one bf16 ulp)."""
    from prism.models import triton_ops

    x = torch.randn(37, 4096, device="cuda", dtype=dtype)
    r = torch.randn(37, 4096, device="cuda", dtype=dtype)
    w = torch.rand(4096, device="cuda", dtype=dtype) + 0.5
    out, res = triton_ops.add_rms_norm(x, r, w, 1e-5)
    want_res = r + x
    h = want_res.float()
    want = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert torch.equal(res, want_res)
    assert _ulps(out, want) <= 1.01


def test_rope_matches_torch() -> None:
    """In-place RoPE on q and k equals the rotate-half formula."""
    from prism.models import triton_ops
    from prism.models.layers import RotaryEmbedding

    rope = RotaryEmbedding(128, 4096, 500000.0, None, torch.bfloat16, torch.device("cuda"))
    q = torch.randn(19, 32, 128, device="cuda", dtype=torch.bfloat16)
    pos = torch.randint(0, 4096, (19,), device="cuda")
    cos, sin = rope.cos[pos].unsqueeze(1).float(), rope.sin[pos].unsqueeze(1).float()
    x1, x2 = q.float().chunk(2, dim=-1)
    want = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).bfloat16()
    got = q.clone()
    triton_ops.rope_(got, rope.cos, rope.sin, pos)
    assert _ulps(got, want) <= 1.01


def test_silu_mul_matches_torch() -> None:
    """Fused SiLU(gate) * up rounds exactly as F.silu(gate) * up does."""
    from prism.models import triton_ops

    g = torch.randn(13, 14336, device="cuda", dtype=torch.bfloat16)
    u = torch.randn(13, 14336, device="cuda", dtype=torch.bfloat16)
    assert _ulps(triton_ops.silu_mul(g, u), F.silu(g) * u) <= 1.01


def test_silu_mul_halves_matches_torch() -> None:
    """The fused gate/up product's halves: SiLU(gate) * up, rounded as torch rounds it."""
    from prism.models import triton_ops

    gu = torch.randn(13, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    g, u = gu.chunk(2, dim=-1)
    assert _ulps(triton_ops.silu_mul_halves(gu), F.silu(g) * u) <= 1.01


def test_rope_on_views_of_a_fused_projection() -> None:
    """q and k as row-strided views of one QKV product rotate as contiguous copies do,
    and v, beside them, is left alone."""
    from prism.models.layers import RotaryEmbedding

    rope = RotaryEmbedding(128, 4096, 500000.0, None, torch.bfloat16, torch.device("cuda"))
    qkv = torch.randn(19, (32 + 2 * 8) * 128, device="cuda", dtype=torch.bfloat16)
    pos = torch.randint(0, 4096, (19,), device="cuda")
    q, k, v = (t.view(19, -1, 128) for t in qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1))
    want_q, want_k = rope(q.contiguous(), k.contiguous(), pos)
    v_before = v.clone()
    got_q, got_k = rope(q, k, pos)
    assert got_q.data_ptr() == q.data_ptr()  # in place, through the strides
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(v, v_before)


def test_cuda_model_matches_transformers() -> None:
    """Our Llama on the GPU (fused kernels and projections, Triton attention) against
    transformers, bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prism.models.attention import AttentionMetadata
    from prism.models.config import ModelConfig
    from prism.models.llama import LlamaModel
    from prism.models.triton_attention import TritonAttention

    torch.manual_seed(0)
    hf_config = LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
    )  # fmt: skip
    hf = LlamaForCausalLM(hf_config).to("cuda", torch.bfloat16).eval()
    config = ModelConfig.from_hf_dict(hf_config.to_dict() | {"architectures": ["LlamaForCausalLM"]})
    ours = LlamaModel.allocate(config, torch.bfloat16, "cuda", TritonAttention())
    assert ours._layers[0].qkv is not None and ours._layers[0].gate_up is not None  # fused
    for name, param in hf.named_parameters():
        ours.weights[name].copy_(param.detach())
    ids = torch.randint(0, 1000, (1, 40), device="cuda")
    with torch.no_grad():
        want = hf(ids).logits[0].float()
    caches = [
        (torch.zeros(16, 16, 2, 32, device="cuda", dtype=torch.bfloat16),
         torch.zeros(16, 16, 2, 32, device="cuda", dtype=torch.bfloat16))
        for _ in range(3)
    ]  # fmt: skip
    meta = AttentionMetadata.build([40], [40], [[3, 5, 7]], 16, "cuda")
    with torch.no_grad():
        hidden = ours.forward(ids[0], torch.arange(40, device="cuda"), caches, meta)
        got = ours.compute_logits(hidden).float()
    err = (got - want).norm() / want.norm()
    assert err < 2e-2, err
