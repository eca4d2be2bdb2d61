"""Text side of a request: incremental detokenisation and stop strings.

Text is released to the caller only once no stop string can still begin inside it,
so a stop string never leaks out half-written.
"""

from __future__ import annotations

from prism.engine.sampling_params import SamplingParams
from prism.models.detokenizer import IncrementalDetokenizer
from prism.models.tokenizer import Tokenizer


class StopChecker:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = params.stop
        self._include = params.include_stop_str_in_output
        self._holdback = max((len(s) for s in self._stops), default=1) - 1
        self._text = ""  # decoded output so far (cut at a stop string once one is found)
        self._sent = 0  # characters of _text already returned
        self.stopped = False  # a stop string was found (and cut off)

    @property
    def text(self) -> str:
        return self._text

    def add(self, token_id: int) -> bool:
        """Decode one more token; True if a stop string now ends the text."""
        start = max(0, len(self._text) - self._holdback)
        self._text += self._detok.step([token_id])
        hits = [(self._text.find(stop, max(0, start - len(stop))), stop) for stop in self._stops]
        found = [(at, stop) for at, stop in hits if at >= 0]
        if not found:
            return False
        at, stop = min(found)  # the stop string that begins first in the text wins
        self._text = self._text[: at + len(stop) if self._include else at]
        self.stopped = True
        return True

    def release(self, finished: bool) -> str:
        """The text that is now safe to hand out."""
        if finished and not self.stopped:
            self._text += self._detok.flush()
        end = len(self._text) if finished else max(self._sent, len(self._text) - self._holdback)
        delta = self._text[self._sent : end]
        self._sent = end
        return delta
