"""Language models, each saved/loaded as a folder (config.json + model.safetensors [+ tokenizer.json]).

``load_pretrained(folder)`` imports ``attnlab.models.<model_type>`` on demand, so a model file
only has to call ``register_model(model_type, cls)`` with model_type equal to its module name.
"""

from attnlab.models.base import SaveLoadMixin, load_pretrained, load_tokenizer_from, register_model
from attnlab.models.mlp import MLPLM, MLPConfig
from attnlab.models.ngram import NGramConfig, NGramLM

__all__ = [
    "SaveLoadMixin",
    "load_pretrained",
    "load_tokenizer_from",
    "register_model",
    "NGramLM",
    "NGramConfig",
    "MLPLM",
    "MLPConfig",
]
