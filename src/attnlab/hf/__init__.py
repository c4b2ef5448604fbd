"""Hugging Face models and files in attnlab's own modules: transformers' attention modules
(:func:`from_hf`), BERT-style encoders and MiniLM (:mod:`attnlab.hf.bert`), SmolLM2 from its GGUF
file (:mod:`attnlab.hf.smollm2`)."""

from attnlab.hf.modules import HF_LOADERS, from_hf, register_hf_loader

__all__ = ["from_hf", "register_hf_loader", "HF_LOADERS"]
