"""Streaming detokenisation: token ids in, text deltas out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prism.models.tokenizer import Tokenizer

# Tokens of context decoded ahead of the new ones, so a leading space or a word joined
# across tokens comes out as it would in a full decode.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed generated ids with `step`; each call returns only the text that is final.

    Invariant: ids[:read] have been emitted; ids[prefix:read] is the context window that
    new ids are decoded behind. Text ending in U+FFFD is held back as an incomplete UTF-8
    character until more ids arrive (or `flush`).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_ids)
        self._prefix = max(len(self._ids) - _CONTEXT_TOKENS, 0)
        self._read = len(self._ids)
        self.text = ""  # everything emitted so far

    def step(self, new_ids: Iterable[int]) -> str:
        """Append ids; return the newly completed text (possibly empty)."""
        self._ids.extend(new_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is held back, incomplete characters included."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith(_REPLACEMENT) and not final):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)
