"""Text <-> token ids and chat prompts, from tokenizer.json or GGUF metadata."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
from tokenizers import Tokenizer as Backend

from prism.models.chat_template import ChatTemplate
from prism.models.gguf_config import gguf_field
from prism.models.gguf_tokenizer import backend_from_gguf


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template around it."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._chat_template = ChatTemplate(chat_template) if chat_template else None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        """From `tokenizer.json` plus optional `tokenizer_config.json` / `chat_template.jinja`."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = model_dir / "chat_template.jinja"
        template = template_path.read_text() if template_path.is_file() else None
        return cls(
            Backend.from_file(str(path)),
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            chat_template=template or _default_template(config.get("chat_template")),
        )

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        tokens: list[str] = gguf_field(reader, "tokenizer.ggml.tokens")

        def token(key: str) -> str | None:
            token_id = gguf_field(reader, f"tokenizer.ggml.{key}", None)
            return None if token_id is None else tokens[token_id]

        return cls(
            backend_from_gguf(reader),
            bos_token=token("bos_token_id"),
            eos_token=token("eos_token_id"),
            chat_template=gguf_field(reader, "tokenizer.chat_template", None),
        )

    # ---- ids -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS where the tokenizer does.

        Encode a rendered chat prompt with add_special_tokens=False: templates write BOS.
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages` ({"role", "content"} dicts)."""
        if self._chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        return self._chat_template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **kwargs,
        )


def _token_text(value: str | Mapping[str, Any] | None) -> str | None:
    """tokenizer_config.json writes special tokens as a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        return str(value["content"])
    return value


def _default_template(value: str | list[Mapping[str, str]] | None) -> str | None:
    """`chat_template` is a string, or a list of named templates of which we use "default"."""
    if isinstance(value, list):
        named = {t["name"]: t["template"] for t in value}
        return named.get("default")
    return value
