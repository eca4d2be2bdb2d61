"""The offline API on the embedded SmolLM2-135M-Instruct GGUF, against transformers.

The reference is built the way tests/models builds it: transformers' own GGUF loader
(`load_gguf_checkpoint`: its dequantisation and Q/K un-permutation) into a `from_config`
model, because `from_pretrained(..., gguf_file=...)` needs `accelerate`, which this
environment lacks. Nothing in the reference goes through prism code.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from prism.engine import LLM, EngineConfig, FinishReason, SamplingParams
from prism.models import default_model_path

STEPS = 32
CHATS = [
    "What is the capital of France?",
    "Name three colours of the rainbow, then explain why the sky is blue.",
    "Écris un haïku sur la mer. 🌊",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(config=EngineConfig(kv_cache_bytes=64 << 20, max_model_len=1024))


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
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    model.tie_weights()
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


def chat_prompt(llm: LLM, content: str) -> str:
    tokenizer = llm.engine.tokenizer
    assert tokenizer is not None
    return tokenizer.apply_chat_template([{"role": "user", "content": content}])


def test_greedy_batch_matches_transformers(llm: LLM, hf_model: Any) -> None:
    """Three chats generated together (one continuous batch) for 32 greedy tokens each:
    every one equals transformers' greedy continuation of that prompt alone."""
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    outputs = llm.generate([chat_prompt(llm, c) for c in CHATS], params)
    for out in outputs:
        assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == STEPS
        assert out.token_ids == hf_greedy(hf_model, out.prompt_token_ids, STEPS)
    assert outputs[0].text.startswith("The capital of France is Paris")


def test_chat_stops_at_end_of_turn(llm: LLM) -> None:
    """`chat` renders the template and stops on the tokenizer's EOS (<|im_end|>), which is
    left out of the text."""
    out = llm.chat(
        [{"role": "user", "content": CHATS[0]}], SamplingParams(temperature=0, max_tokens=64)
    )
    assert out.finish_reason is FinishReason.STOP
    assert out.token_ids[-1] == llm.engine.tokenizer.eos_token_id  # type: ignore[union-attr]
    assert "Paris" in out.text and "<|im_end|>" not in out.text


def test_stop_string_on_real_text(llm: LLM) -> None:
    """A stop string the model really writes cuts the text before it (or after it with
    include_stop_str_in_output), finishing with STOP, and streams out consistently."""
    prompt = chat_prompt(llm, CHATS[0])
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0].text
    assert " Paris" in full
    cut = full[: full.index(" Paris")]
    stopped = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, stop=(" Paris",)))
    assert stopped[0].text == cut and stopped[0].finish_reason is FinishReason.STOP
    kept = SamplingParams(
        temperature=0, max_tokens=12, stop=(" Paris",), include_stop_str_in_output=True
    )
    assert llm.generate(prompt, kept)[0].text == cut + " Paris"


@pytest.mark.parametrize(
    "content",
    [
        "Écris un haïku sur la mer. 🌊",
        "用中文回答：天空为什么是蓝色的？",
        "Reply with three emoji: 🙂",
    ],
)
def test_streamed_deltas_rebuild_the_text(llm: LLM, content: str) -> None:
    """Unicode-heavy prompts: the text deltas, concatenated, equal a full decode of the
    output tokens, and no delta carries a half-written character (U+FFFD)."""
    engine = llm.engine
    request_id = engine.add_request(
        chat_prompt(llm, content), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    )
    deltas: list[str] = []
    tokens: list[int] = []
    for _ in range(100):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            assert out.request_id == request_id
            deltas.append(out.text_delta)
            tokens += out.new_token_ids
    assert engine.tokenizer is not None and len(tokens) == 24
    assert "".join(deltas) == engine.tokenizer.decode(tokens)
    assert not any("\ufffd" in d for d in deltas)
    assert any(ord(c) > 127 for c in "".join(deltas)), "expected non-ASCII output"
