"""Tokenizers of HF folders, both ways: a folder's ``tokenizer.json`` (the `tokenizers` library's
file, which transformers' fast tokenizers read) as attnlab's WordPiece (BERT) or BPE tokenizer, with
the end- and beginning-of-sequence tokens the folder declares; and any attnlab tokenizer written as
a ``PreTrainedTokenizerFast`` folder (tokenizer.json + tokenizer_config.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer

from attnlab.data.tokenizer import BPETokenizer, WordPieceTokenizer
from attnlab.errors import ConfigError
from attnlab.files import write_json, write_text

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConfigError(f"{str(path)!r} is corrupt (not JSON): {err}") from None
    return data if isinstance(data, dict) else {}


def _token_id(tok: Tokenizer, value) -> int | None:
    """A special token given as an id, a list of ids (the first), a string or {"content": ...}."""
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str):
        value = tok.token_to_id(value)
    return value if isinstance(value, int) and 0 <= value < tok.get_vocab_size() else None


def _eos_id(folder: Path, tok: Tokenizer) -> int | None:
    """What ends a reply: generation_config.json's eos_token_id, else config.json's, else the tokenizer's."""
    for name, key in (("generation_config.json", "eos_token_id"), ("config.json", "eos_token_id"),
                      (TOKENIZER_CONFIG, "eos_token")):
        found = _token_id(tok, _json(folder / name).get(key))
        if found is not None:
            return found
    return None


def _bos_id(folder: Path, tok: Tokenizer) -> int | None:
    """The token the folder's tokenizer puts before every text (Llama's <s>), as transformers does:
    what tokenizer.json's post-processor adds, unless tokenizer_config.json says add_bos_token false."""
    if _json(folder / TOKENIZER_CONFIG).get("add_bos_token") is False:
        return None
    plain, special = tok.encode("a", add_special_tokens=False).ids, tok.encode("a").ids
    return special[0] if len(special) == len(plain) + 1 and special[1:len(plain) + 1] == plain else None


def hf_tokenizer(folder: str | os.PathLike) -> BPETokenizer | WordPieceTokenizer | None:
    """The tokenizer of an HF folder, None when it has no tokenizer.json: WordPiece for BERT-style
    folders, else the folder's BPE (or other) model with its BOS and EOS tokens."""
    folder = Path(folder)
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed files
        raise ConfigError(f"{str(path)!r} is not a tokenizers file: {err}") from None
    if json.loads(tok.to_str())["model"]["type"] == "WordPiece":
        return WordPieceTokenizer(tok)
    return BPETokenizer(tok, eos_id=_eos_id(folder, tok), bos_id=_bos_id(folder, tok))


def save_hf_tokenizer(tokenizer, folder: str | os.PathLike, *, model_max_length: int) -> list[Path]:
    """Write ``tokenizer`` (any attnlab tokenizer) as a PreTrainedTokenizerFast folder:
    tokenizer.json and tokenizer_config.json naming its EOS/BOS tokens. Returns the paths."""
    folder = Path(folder)
    backend = tokenizer.backend
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False}
    for key, token_id in (("eos_token", getattr(tokenizer, "eos_id", None)),
                          ("bos_token", getattr(tokenizer, "bos_id", None))):
        if token_id is not None:
            config[key] = backend.id_to_token(token_id)
    write_text(folder / TOKENIZER_FILE, backend.to_str())
    write_json(folder / TOKENIZER_CONFIG, config)
    return [folder / TOKENIZER_FILE, folder / TOKENIZER_CONFIG]
