"""Hugging Face models and files in attnlab's own modules: whole local checkpoint folders
(:func:`from_hf_pretrained`, :mod:`attnlab.hf.checkpoint`) and back out (:func:`export_hf`),
tokenizer.json files (:mod:`attnlab.hf.tokenizer`), transformers' attention modules
(:func:`from_hf`), BERT-style encoders and MiniLM (:mod:`attnlab.hf.bert`), SmolLM2 from its GGUF
file (:mod:`attnlab.hf.smollm2`)."""

from attnlab.hf.checkpoint import from_hf_pretrained
from attnlab.hf.export import export_hf
from attnlab.hf.modules import HF_LOADERS, from_hf, register_hf_loader
from attnlab.hf.tokenizer import hf_tokenizer

__all__ = ["from_hf", "register_hf_loader", "HF_LOADERS", "from_hf_pretrained", "export_hf", "hf_tokenizer"]
