"""The embedded SmolLM2-135M-Instruct GGUF against transformers' own GGUF conversion.

transformers' `from_pretrained(..., gguf_file=...)` requires the `accelerate` package, which
this environment does not have, so the reference is built from transformers' GGUF loader
directly (`load_gguf_checkpoint`: its own dequantisation and its own Q/K un-permutation)
into a `from_config` model. Nothing in the reference goes through prism code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from models_helpers import PagedRunner

from prism.models import LoadedModel, Tokenizer, default_model_path, load_model

STEPS = 32
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name three colours of the rainbow."},
    ],
    [{"role": "user", "content": "Écris un haïku sur la mer. 🌊"}],
]
TEXTS = [
    "Hello, world!",
    "héllo wörld — naïve café, 世界 🙂👍🏽",
    "Prices: 12345 and 3.14159; x += 42",
    "  leading spaces\n\n\ttabs and\r\nnewlines  ",
    "def f(x):\n    return x ** 2  # square",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "",
]


@pytest.fixture(scope="module")
def ours() -> LoadedModel:
    return load_model(default_model_path(), dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_model() -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = default_model_path()
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation="eager"
        )
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def hf_greedy(hf_model: Any, prompt: list[int], steps: int) -> list[int]:
    """transformers' greedy continuation with its own KV cache, never stopping at EOS."""
    ids, cache, out = torch.tensor([prompt]), None, []
    with torch.no_grad():
        for _ in range(steps):
            result = hf_model(input_ids=ids, cache=cache, use_cache=True)
            cache = result.cache
            ids = result.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            out.append(int(ids))
    return out


def prompt_ids(tokenizer: Tokenizer, chat: list[dict[str, str]]) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(chat), add_special_tokens=False)


def test_config(ours: LoadedModel) -> None:
    cfg = ours.config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 1e5
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1


def test_greedy_tokens_match_transformers(
    ours: LoadedModel, hf_model: Any, paged_runner: type[PagedRunner]
) -> None:
    """Three chats decoded together for STEPS greedy steps; each equals transformers'
    greedy continuation of that chat alone. Prefill logits agree to 2e-3 (30 fp32 layers)."""
    assert ours.tokenizer is not None
    prompts = [prompt_ids(ours.tokenizer, chat) for chat in CHATS]
    runner = paged_runner(ours.model, len(prompts), max(map(len, prompts)) + STEPS, block_size=16)
    generated: list[list[int]] = [[] for _ in prompts]
    out = runner.step(prompts)
    with torch.no_grad():
        first = hf_model(torch.tensor([prompts[0]])).logits[0]
    assert out[0] is not None
    torch.testing.assert_close(out[0], first, atol=2e-3, rtol=0)
    for _ in range(STEPS):
        nxt = [[int(logits[-1].argmax())] for logits in out if logits is not None]
        for gen, tok in zip(generated, nxt, strict=True):
            gen += tok
        out = runner.step(nxt)
    for prompt, gen in zip(prompts, generated, strict=True):
        assert gen == hf_greedy(hf_model, prompt, STEPS)
    assert ours.tokenizer.decode(generated[0]).startswith("The capital of France is Paris")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(ours: LoadedModel, hf_tokenizer: Any, text: str) -> None:
    assert ours.tokenizer is not None
    ids = ours.tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert ours.tokenizer.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids)
    assert ours.tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    ours: LoadedModel, hf_tokenizer: Any, chat: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    assert ours.tokenizer is not None
    expected = hf_tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.tokenizer.apply_chat_template(chat, add_generation_prompt) == expected


def test_tokenizer_json_directory(hf_tokenizer: Any, ours: LoadedModel, tmp_path: Path) -> None:
    """The same tokenizer saved by transformers as tokenizer.json + config loads identically."""
    assert ours.tokenizer is not None
    hf_tokenizer.save_pretrained(tmp_path)
    from_dir = Tokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert from_dir.encode(text) == ours.tokenizer.encode(text)
    assert from_dir.apply_chat_template(CHATS[1]) == ours.tokenizer.apply_chat_template(CHATS[1])
    assert (from_dir.eos_token, from_dir.eos_token_id) == ("<|im_end|>", 2)
