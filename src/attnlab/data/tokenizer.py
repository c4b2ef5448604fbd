"""Tokenizers: character level (the corpus's own characters), byte-level BPE (HF tokenizers) and
BERT's WordPiece, each saved as one ``tokenizer.json`` next to a checkpoint; :func:`tokenize` gives
any of them a text's tokens with their character spans."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from attnlab._checks import one_of, positive_int
from attnlab.errors import ConfigError, InputTypeError
from attnlab.files import atomic_output

ENDOFTEXT = "<|endoftext|>"


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise InputTypeError(f"text must be a str, got {type(text).__name__}")


def _check_ids(ids, vocab_size: int) -> list[int]:
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab_size]
    if bad:
        raise ConfigError(f"ids contain {bad[:5]!r}: expected integers in [0, {vocab_size})")
    return ids


class CharTokenizer:
    """One id per character, ids in sorted character order (as nanoGPT's shakespeare_char)."""

    eos_id = None  # no end-of-sequence token: generation runs to its length

    def __init__(self, chars):
        chars = list(chars)
        if not chars or len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ConfigError(f"chars={''.join(map(str, chars))[:40]!r}: expected a non-empty set of distinct single characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self._lut = np.full(max(map(ord, chars)) + 1, -1, dtype=np.int64)
        self._lut[[ord(c) for c in chars]] = np.arange(len(chars))

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        _check_text(text)
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def _unknown(self, text: str) -> ConfigError:
        unknown = sorted({c for c in text if c not in self.stoi})
        shown = ", ".join(f"{c!r} (U+{ord(c):04X}, first at index {text.index(c)})" for c in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        return ConfigError(
            f"text has {len(unknown)} character(s) the character tokenizer does not know: {shown}{more}; "
            f"it knows only the {self.vocab_size} characters of its training corpus"
        )

    def encode_array(self, text: str) -> np.ndarray:
        """Vectorised :meth:`encode`: int64 ids of every character of ``text``."""
        _check_text(text)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = self._lut[np.minimum(codes, len(self._lut) - 1)]
        if (ids < 0).any() or (codes >= len(self._lut)).any():
            raise self._unknown(text)
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in _check_ids(ids, self.vocab_size))

    def save(self, path: str | os.PathLike) -> None:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps({"type": "char", "chars": "".join(self.chars)}, ensure_ascii=False), encoding="utf-8")

    @property
    def backend(self) -> Tokenizer:
        """The same tokenizer as an HF ``tokenizers.Tokenizer`` (what transformers' fast tokenizers
        read): a BPE without merges over the characters, so every character is one token."""
        tok = Tokenizer(models.BPE(vocab=dict(self.stoi), merges=[]))
        tok.decoder = decoders.Fuse()
        return tok


class _Backed:
    """A tokenizer that wraps an HF ``tokenizers.Tokenizer`` (``self._tok``)."""

    _tok: Tokenizer

    @property
    def backend(self) -> Tokenizer:
        """The HF ``tokenizers.Tokenizer`` underneath."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()


class BPETokenizer(_Backed):
    """Byte-level BPE (GPT-2 style, via HF ``tokenizers``): any text encodes, nothing is unknown.
    ``eos_id`` is the token that ends a reply (a pretrained model's), None where there is none;
    ``bos_id``, when set, starts every encoded text (as Llama's tokenizers add <s>)."""

    def __init__(self, tokenizer, eos_id: int | None = None, bos_id: int | None = None):
        self._tok = tokenizer
        self.eos_id, self.bos_id = eos_id, bos_id

    @classmethod
    def train(cls, text: str, vocab_size: int = 2048, min_frequency: int = 2) -> "BPETokenizer":
        """Learn merges on ``text`` until ``vocab_size`` tokens (256 bytes + <|endoftext|> + merges)."""
        _check_text(text)
        positive_int("vocab_size", vocab_size)
        if vocab_size < 257:
            raise ConfigError(f"vocab_size={vocab_size} is not allowed: byte-level BPE needs at least 257 (256 bytes + {ENDOFTEXT})")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[ENDOFTEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        chunk = 1 << 16
        tok.train_from_iterator((text[i:i + chunk] for i in range(0, len(text), chunk)), trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        _check_text(text)
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ids if self.bos_id is None else [self.bos_id, *ids]

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        with atomic_output(path) as tmp:
            tmp.write_text(self._tok.to_str(), encoding="utf-8")


@dataclass
class Tokenized:
    """A text as the model sees it: ids, a display string per token, and each token's character
    span in the text (None for tokens that stand for no text, such as [CLS])."""

    text: str
    ids: list[int]
    tokens: list[str]
    spans: list[tuple[int, int] | None]


class WordPieceTokenizer(_Backed):
    """BERT's WordPiece (HF ``tokenizers``, from a tokenizer.json): lower-cases, splits rare words
    into ``##`` pieces and wraps the text in [CLS] … [SEP]. Never truncates or pads."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "WordPieceTokenizer":
        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self.tokenize(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def tokenize(self, text: str) -> Tokenized:
        if not isinstance(text, str):
            raise InputTypeError(f"text must be a str, got {type(text).__name__}")
        enc = self._tok.encode(text)
        spans = [None if special else tuple(span) for span, special in zip(enc.offsets, enc.special_tokens_mask)]
        return Tokenized(text, list(enc.ids), list(enc.tokens), spans)

    def save(self, path: str | os.PathLike) -> None:
        self._tok.save(str(path))


def tokenize(tokenizer, text: str) -> Tokenized:
    """Tokens and character spans from any attnlab tokenizer. Without a native ``tokenize``, a
    token's span ends where the decoded prefix up to it ends (a token holding part of a
    multi-byte character gets None; the token completing the character gets its span). A BOS token
    the tokenizer puts first stands for no text either."""
    if hasattr(tokenizer, "tokenize"):
        return tokenizer.tokenize(text)
    ids = tokenizer.encode(text)
    lead = int(bool(ids) and ids[0] == getattr(tokenizer, "bos_id", None))
    tokens, spans, start = [tokenizer.decode(ids[:1])] * lead, [None] * lead, 0
    for k in range(lead, len(ids)):
        tokens.append(tokenizer.decode(ids[k:k + 1]))
        prefix = tokenizer.decode(ids[lead:k + 1])
        if text.startswith(prefix) and len(prefix) > start:
            spans.append((start, len(prefix)))
            start = len(prefix)
        else:
            spans.append(None)
    return Tokenized(text, list(ids), tokens, spans)


def train_tokenizer(kind: str, text: str, vocab_size: int | None = None):
    """A tokenizer for ``text``: ``"char"`` (vocab = its characters) or ``"bpe"`` (vocab_size, default 2048)."""
    one_of("tokenizer", kind, ("char", "bpe"))
    if kind == "char":
        if vocab_size is not None:
            raise ConfigError(f"vocab_size={vocab_size} is not allowed with tokenizer='char': its vocabulary is the corpus's characters")
        return CharTokenizer.from_text(text)
    return BPETokenizer.train(text, vocab_size=2048 if vocab_size is None else vocab_size)


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer saved by ``.save``; ``path`` may be the tokenizer.json file or its folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"tokenizer file {str(path)!r} does not exist")
    raw = path.read_text(encoding="utf-8")
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise ConfigError(f"tokenizer file {str(path)!r} is not valid JSON: {err}") from None
    if isinstance(data, dict) and data.get("type") == "char" and isinstance(data.get("chars"), str):
        return CharTokenizer(data["chars"])
    if isinstance(data, dict) and "model" in data:
        try:
            return BPETokenizer(Tokenizer.from_str(raw))
        except Exception as err:
            raise ConfigError(f"tokenizer file {str(path)!r} is corrupt: {err}") from None
    raise ConfigError(f"tokenizer file {str(path)!r} is neither a character tokenizer nor an HF tokenizers file")
