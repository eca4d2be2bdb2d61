"""A `tokenizers.Tokenizer` rebuilt from GGUF tokenizer metadata (byte-level BPE only)."""

from __future__ import annotations

import gguf
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from prism.models.gguf_config import gguf_field

# Pre-tokenizer split patterns, by `tokenizer.ggml.pre`. These are the regexes the
# vocabularies were trained with (the same ones their tokenizer.json files carry).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("default", "gpt2", "gpt-2")
_DIGITS_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")

_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType values


def backend_from_gguf(reader: gguf.GGUFReader) -> Backend:
    """Byte-level BPE with the vocabulary, merges, pre-tokenizer and special tokens of the file."""
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"unsupported GGUF tokenizer model {kind!r}; only byte-level BPE ('gpt2') is supported"
        )
    tokens: list[str] = gguf_field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
    vocab = {token: i for i, token in enumerate(tokens)}
    # Llama 3 vocabularies take a whole pre-token if it is in the vocabulary, as llama.cpp does.
    bpe = models.BPE(vocab, merges, ignore_merges=pre in _LLAMA3_PRE)
    backend = Backend(bpe)
    if pre in _QWEN2_PRE:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, reader, tokens)
    _add_bos_eos(backend, reader, tokens)
    return backend


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _LLAMA3_PRE or pre in _QWEN2_PRE:
        pattern = _LLAMA3_SPLIT if pre in _LLAMA3_PRE else _QWEN2_SPLIT
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    known = _GPT2_PRE + _DIGITS_PRE + _LLAMA3_PRE + _QWEN2_PRE
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(known)}")


def _add_special_tokens(backend: Backend, reader: gguf.GGUFReader, tokens: list[str]) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens.

    Both are then matched whole in the input instead of being split by BPE.
    """
    types: list[int] = gguf_field(reader, "tokenizer.ggml.token_type", [])
    if not types:
        return
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind == _CONTROL
    ]
    plain = [
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind == _USER_DEFINED
    ]
    backend.add_special_tokens(special)
    backend.add_tokens(plain)


def _add_bos_eos(backend: Backend, reader: gguf.GGUFReader, tokens: list[str]) -> None:
    """Prepend BOS / append EOS on encode when the file asks for it."""
    parts_single, parts_pair, specials = ["$A:0"], ["$A:0", "$B:1"], []
    for flag, key, at_start in (
        ("add_bos_token", "bos_token_id", True),
        ("add_eos_token", "eos_token_id", False),
    ):
        token_id = gguf_field(reader, f"tokenizer.ggml.{key}", None)
        if not gguf_field(reader, f"tokenizer.ggml.{flag}", False) or token_id is None:
            continue
        token = tokens[token_id]
        if at_start:
            parts_single.insert(0, f"{token}:0")
            parts_pair.insert(0, f"{token}:0")
        else:
            parts_single.append(f"{token}:0")
            parts_pair.append(f"{token}:1")
        specials.append((token, int(token_id)))
    if specials:
        backend.post_processor = processors.TemplateProcessing(
            single=parts_single, pair=parts_pair, special_tokens=specials
        )
