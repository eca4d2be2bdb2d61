"""Loading HF safetensors directories and random weights; binding external storage; errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from models_helpers import PagedRunner
from safetensors.torch import load_file, save_file

from prism.models import (
    PRESETS,
    LlamaModel,
    ModelConfig,
    WeightLoadError,
    load_model,
    open_checkpoint,
    weight_specs,
)

PROMPTS = [[1, 2, 3, 4, 5], [9, 10]]
SMALL = ModelConfig(
    architecture="qwen3",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=64,
    qk_norm=True,
)

Checkpoint = Callable[[str], tuple[Any, Path]]


def rewrite_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def logits_of(model: LlamaModel, runner_cls: type[PagedRunner]) -> list[torch.Tensor]:
    out = runner_cls(model, len(PROMPTS), 16).step(PROMPTS)
    return [t for t in out if t is not None]


# ---- errors ------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nowhere")


def test_missing_safetensors(tiny_checkpoint: Checkpoint) -> None:
    _, path = tiny_checkpoint("llama-llama3-rope")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_model(path)


def test_missing_shard(tiny_checkpoint: Checkpoint) -> None:
    hf_model, path = tiny_checkpoint("llama-llama3-rope")
    hf_model.save_pretrained(path, max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        load_model(path)


def test_unsupported_architecture(tiny_checkpoint: Checkpoint) -> None:
    _, path = tiny_checkpoint("llama-llama3-rope")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        load_model(path)


def test_missing_tensor_is_named(tiny_checkpoint: Checkpoint) -> None:
    _, path = tiny_checkpoint("qwen2-bias")
    rewrite_weights(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(
        WeightLoadError, match=r"missing.*model\.layers\.1\.self_attn\.k_proj\.bias"
    ):
        load_model(path, dtype=torch.float32)


def test_unexpected_tensor_is_named(tiny_checkpoint: Checkpoint) -> None:
    _, path = tiny_checkpoint("llama-llama3-rope")
    rewrite_weights(path, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}))
    with pytest.raises(WeightLoadError, match=r"unexpected.*model\.layers\.0\.mlp\.extra"):
        load_model(path, dtype=torch.float32)


def test_shape_mismatch_names_both_shapes(tiny_checkpoint: Checkpoint) -> None:
    _, path = tiny_checkpoint("llama-llama3-rope")
    rewrite_weights(path, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(WeightLoadError, match=r"model\.norm\.weight.*\(63,\).*\(64,\)"):
        load_model(path, dtype=torch.float32)


def test_random_weights_need_explicit_dummy() -> None:
    with pytest.raises(ValueError, match="load_format='dummy'"):
        load_model("llama-3.2-1b")


# ---- formats -----------------------------------------------------------------------------


def test_sharded_equals_single_file(
    tiny_checkpoint: Checkpoint, paged_runner: type[PagedRunner], tmp_path: Path
) -> None:
    hf_model, path = tiny_checkpoint("qwen3-qk-norm")
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    single = logits_of(load_model(path, dtype=torch.float32).model, paged_runner)
    multi = logits_of(load_model(sharded, dtype=torch.float32).model, paged_runner)
    for a, b in zip(single, multi, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_tied_checkpoint_with_stored_lm_head(tiny_checkpoint: Checkpoint) -> None:
    """A tied model whose file also stores lm_head loads, and uses the embedding."""
    _, path = tiny_checkpoint("llama-tied-linear-rope")
    rewrite_weights(path, lambda t: t.update({"lm_head.weight": torch.zeros(320, 64)}))
    model = load_model(path, dtype=torch.float32).model
    hidden = torch.randn(3, 64)
    embed = model.weights["model.embed_tokens.weight"]
    torch.testing.assert_close(model.compute_logits(hidden), hidden @ embed.T)


def test_dummy_weights_are_deterministic_and_sane(paged_runner: type[PagedRunner]) -> None:
    a = load_model(SMALL, load_format="dummy", dtype=torch.float32, seed=3).model
    b = load_model(SMALL, load_format="dummy", dtype=torch.float32, seed=3).model
    c = load_model(SMALL, load_format="dummy", dtype=torch.float32, seed=4).model
    for name, tensor in a.weights.items():
        assert torch.equal(tensor, b.weights[name])
        assert not torch.equal(tensor, c.weights[name])
    norm = a.weights["model.layers.0.input_layernorm.weight"]
    assert (norm - 1).abs().max() < 0.2
    logits = torch.cat(logits_of(a, paged_runner))
    assert torch.isfinite(logits).all() and logits.std() < 5


def test_dummy_keeps_directory_config(tiny_checkpoint: Checkpoint) -> None:
    _, path = tiny_checkpoint("qwen2-bias")
    loaded = load_model(path, load_format="dummy", dtype=torch.float32)
    assert loaded.config.attention_bias and loaded.config.vocab_size == 320


# ---- binding external storage ------------------------------------------------------------


def test_real_size_model_builds_without_memory() -> None:
    """An 8B model on the meta device: shapes only, no storage."""
    model = LlamaModel.allocate(PRESETS["llama-3.1-8b"], torch.bfloat16, "meta")
    assert model.device.type == "meta"
    assert model.weights["lm_head.weight"].shape == (128256, 4096)


def test_bind_uses_the_given_tensors(
    tiny_checkpoint: Checkpoint, paged_runner: type[PagedRunner]
) -> None:
    """The path an external memory manager takes: allocate from specs, bind, fill in place."""
    _, path = tiny_checkpoint("qwen2-bias")
    checkpoint = open_checkpoint(path)
    storage = {
        s.name: torch.empty(s.shape, dtype=s.dtype)
        for s in weight_specs(checkpoint.config, torch.float32)
    }
    model = LlamaModel(checkpoint.config)
    model.bind_weights(storage)
    checkpoint.fill(storage)
    for name, tensor in storage.items():
        assert model.weights[name] is tensor
    reference = logits_of(load_model(path, dtype=torch.float32).model, paged_runner)
    torch.testing.assert_close(logits_of(model, paged_runner), reference, atol=0, rtol=0)
    storage["model.norm.weight"].mul_(2)  # writes to the storage are seen by the model
    changed = logits_of(model, paged_runner)
    assert not torch.allclose(changed[0], reference[0])


def test_bind_rejects_wrong_tensors() -> None:
    specs = {s.name: torch.zeros(s.shape) for s in weight_specs(SMALL, torch.float32)}
    model = LlamaModel(SMALL)
    with pytest.raises(RuntimeError, match="bind_weights"):
        _ = model.device
    missing = dict(specs)
    missing.pop("model.norm.weight")
    with pytest.raises(WeightLoadError, match=r"missing \['model\.norm\.weight'\]"):
        model.bind_weights(missing)
    with pytest.raises(WeightLoadError, match="expected"):
        model.bind_weights({**specs, "model.norm.weight": torch.zeros(3)})
    with pytest.raises(WeightLoadError, match="one dtype"):
        model.bind_weights({**specs, "model.norm.weight": torch.zeros(64, dtype=torch.bfloat16)})
