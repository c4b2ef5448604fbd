"""Pretrained models by name, and one way to run any of them on a text.

``load_attention_model(spec)`` takes a name ("minilm": all-MiniLM-L6-v2 in attnlab's encoder,
"smollm2": SmolLM2-135M in attnlab's GPT — both read by :mod:`attnlab.hf`), an attnlab checkpoint
folder or a local HF checkpoint folder (:func:`attnlab.hf.checkpoint.from_hf_pretrained`) and returns an :class:`AttentionModel` whose ``attention(text)`` gives the tokens and every
layer's per-head weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from attnlab.attention.record import RecordsAttention, record_attention
from attnlab.data.tokenizer import Tokenized, WordPieceTokenizer, tokenize
from attnlab.errors import ConfigError, InputTypeError
from attnlab.hf.bert import load_minilm
from attnlab.hf.checkpoint import from_hf_pretrained, hf_model_type
from attnlab.hf.tokenizer import hf_tokenizer
from attnlab.hf.smollm2 import load_smollm2
from attnlab.models.base import load_pretrained, load_tokenizer_from
from attnlab.models.encoder import Encoder

NAMES = ("minilm", "smollm2")


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
    """"minilm", "smollm2", the folder of a saved attnlab model or a local HF checkpoint folder
    (either with its tokenizer.json)."""
    if not isinstance(spec, str):
        raise InputTypeError(f"model must be a str (a name or a folder), got {type(spec).__name__}")
    if spec == "minilm":
        model, tokenizer = load_minilm(device=device)
    elif spec == "smollm2":
        model, tokenizer = load_smollm2(device=device)
    elif Path(spec).is_dir() and hf_model_type(spec) is not None:
        model, tokenizer = from_hf_pretrained(spec, device=device), hf_tokenizer(spec)
        if tokenizer is None:
            raise ConfigError(f"HF folder {spec!r} has no tokenizer.json: reading a text needs the model's tokenizer "
                              "(its logits do not: attnlab.hf.from_hf_pretrained)")
    elif Path(spec).is_dir():
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
        raise ConfigError(f"model={spec!r} is not allowed: expected {names}, an attnlab checkpoint folder or a "
                          "local HF checkpoint folder")
    return AttentionModel(spec, model, tokenizer, _context_length(model))
