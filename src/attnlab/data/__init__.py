"""Corpora, tokenizers and memory-mapped token datasets."""

from attnlab.data.corpus import (
    TokenDataset,
    default_cache_dir,
    extract_shakespeare,
    fetch_shakespeare,
    load_corpus,
    prepare_dataset,
    strip_gutenberg_boilerplate,
)
from attnlab.data.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "load_corpus",
    "fetch_shakespeare",
    "extract_shakespeare",
    "strip_gutenberg_boilerplate",
    "default_cache_dir",
    "prepare_dataset",
    "TokenDataset",
    "CharTokenizer",
    "BPETokenizer",
    "train_tokenizer",
    "load_tokenizer",
]
