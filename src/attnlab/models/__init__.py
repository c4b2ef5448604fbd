"""Language models and encoders, each saved/loaded as a folder (config.json + model.safetensors
[+ tokenizer.json]). Importing the package registers every model type, so
``load_pretrained(folder)`` can rebuild any of them from its config's "model_type"."""

from attnlab.models.base import SaveLoadMixin, count_params, load_pretrained, load_tokenizer_from, model_class, register_model
from attnlab.models.encdec import EncDecConfig, EncoderDecoder
from attnlab.models.encoder import Encoder, EncoderConfig
from attnlab.models.gpt import GPT, GPTConfig
from attnlab.models.mlp import MLPLM, MLPConfig
from attnlab.models.ngram import NGramConfig, NGramLM
from attnlab.models.rnn import RNNConfig, RNNLM

__all__ = [
    "SaveLoadMixin",
    "load_pretrained",
    "load_tokenizer_from",
    "model_class",
    "register_model",
    "count_params",
    "GPT",
    "GPTConfig",
    "Encoder",
    "EncoderConfig",
    "NGramLM",
    "NGramConfig",
    "MLPLM",
    "MLPConfig",
    "RNNLM",
    "RNNConfig",
    "EncoderDecoder",
    "EncDecConfig",
]
