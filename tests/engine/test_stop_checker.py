"""`StopChecker` on SmolLM2's tokenizer: stop strings across and inside tokens, holdback
of text that might start a stop string, and the include flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from prism.engine import SamplingParams
from prism.engine.stop_checker import StopChecker
from prism.models import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_checkpoint)


def feed(
    tokenizer: Tokenizer, text: str, params: SamplingParams
) -> tuple[StopChecker, list[str], bool]:
    """Feed `text`'s tokens one by one, releasing after each; (checker, deltas, stopped)."""
    checker = StopChecker(tokenizer, tokenizer.encode("Q:"), params)
    deltas: list[str] = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        if checker.add(token):
            deltas.append(checker.release(finished=True))
            return checker, deltas, True
        deltas.append(checker.release(finished=False))
    deltas.append(checker.release(finished=True))
    return checker, deltas, False


def test_no_stop_strings_releases_every_token(tokenizer: Tokenizer) -> None:
    """Without stop strings nothing is held back: each token's text comes out at once."""
    _, deltas, stopped = feed(tokenizer, "Hello there, world", SamplingParams())
    assert not stopped and deltas == ["Hello", " there", ",", " world", ""]


def test_stop_string_spanning_tokens(tokenizer: Tokenizer) -> None:
    """A stop string split over two tokens is found; text before it is all released."""
    checker, deltas, stopped = feed(
        tokenizer, "Hello there, world", SamplingParams(stop=("re, wo",))
    )
    assert stopped and checker.text == "Hello the" and "".join(deltas) == "Hello the"


def test_held_back_text_is_released_when_no_stop_follows(tokenizer: Tokenizer) -> None:
    """The last len(stop) - 1 characters, which could begin a stop string, are held back,
    then released in full when the stop string does not materialise."""
    _, deltas, stopped = feed(tokenizer, "Hello there, world", SamplingParams(stop=("re, wx",)))
    assert not stopped and "".join(deltas) == "Hello there, world"
    assert deltas[:2] == ["", "Hello "]


def test_include_stop_str_in_output(tokenizer: Tokenizer) -> None:
    """include_stop_str_in_output cuts just after the stop string."""
    params = SamplingParams(stop=("re,",), include_stop_str_in_output=True)
    checker, deltas, stopped = feed(tokenizer, "Hello there, world", params)
    assert stopped and checker.text == "Hello there," and "".join(deltas) == "Hello there,"


@pytest.mark.parametrize("stops", [("re", "th"), ("th", "re")])
def test_earliest_stop_inside_one_token_wins(tokenizer: Tokenizer, stops: tuple[str, ...]) -> None:
    """Two stop strings inside the same token (" there"): the text is cut at the one that
    comes first in the text, whatever their order in `stop`, so no stop string leaks."""
    checker, deltas, stopped = feed(tokenizer, "Hello there", SamplingParams(stop=stops))
    assert stopped and checker.text == "Hello " and "".join(deltas) == "Hello "


def test_stop_string_in_the_first_token(tokenizer: Tokenizer) -> None:
    """A stop string at the very start leaves the text empty."""
    checker, deltas, stopped = feed(tokenizer, "Hello there", SamplingParams(stop=("Hel",)))
    assert stopped and checker.text == "" and deltas == [""]


def test_multibyte_characters_are_not_split(tokenizer: Tokenizer) -> None:
    """Characters made of several byte tokens come out whole, and a stop string of such
    characters is matched."""
    text = "café 🙂👍🏽 世界 done"
    _, deltas, stopped = feed(tokenizer, text, SamplingParams())
    assert not stopped and "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    checker, deltas, stopped = feed(tokenizer, text, SamplingParams(stop=("👍🏽",)))
    assert stopped and checker.text == "café 🙂" and "".join(deltas) == "café 🙂"
