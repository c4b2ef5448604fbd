"""Language models, each saved/loaded as a folder (config.json + model.safetensors [+ tokenizer.json])."""

from attnlab.models.base import SaveLoadMixin, load_pretrained, load_tokenizer_from, register_model

__all__ = ["SaveLoadMixin", "load_pretrained", "load_tokenizer_from", "register_model"]
