"""The Transformer encoder–decoder (Vaswani et al. 2017): a bidirectional encoder reads the whole
input (padding masked out), a causal decoder writes the output, and every decoder layer looks back
at every encoder position through cross-attention — attention without the recurrence.

Pre-norm blocks, sinusoidal positions (defined at any length, as in the paper), one embedding for
source and target tokens, tied to the output head. Decoding keeps per layer a KV cache for the
decoder's self-attention and one for the cross-attention, filled once from the encoder output
(:meth:`EncoderDecoder.start` / :meth:`EncoderDecoder.step`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnlab import _checks
from attnlab.attention.cache import KVCache
from attnlab.attention.cross import CrossAttention
from attnlab.attention.gqa import GroupedQueryAttention
from attnlab.errors import ConfigError, InputTypeError
from attnlab.models.base import SaveLoadMixin, register_model
from attnlab.ffn import SwiGLU
from attnlab.options import option

MODEL_TYPE = "encdec"


@dataclass
class EncDecConfig:
    """Everything needed to rebuild an encoder–decoder; saved as config.json next to the weights."""

    vocab_size: int = option(32, "token ids of sources and targets (one shared vocabulary)", flag=False)
    d_model: int = option(64, "width of the residual streams")
    n_head: int = option(4, "heads of every self- and cross-attention")
    n_encoder_layer: int = option(2, "encoder blocks (self-attention, FFN)")
    n_decoder_layer: int = option(2, "decoder blocks (causal self-attention, cross-attention, FFN)")
    ffn_hidden: int | None = option(None, "SwiGLU width; None: 8/3 · d_model rounded up to 8")
    pad_id: int = option(0, "the source id that marks padding (masked out of every attention over the input)")
    dropout: float = option(0.0, "on attention weights and residual branches while training")

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_head", "n_encoder_layer", "n_decoder_layer"):
            _checks.positive_int(name, getattr(self, name))
        _checks.divisible("d_model", self.d_model, "n_head", self.n_head)
        if self.ffn_hidden is None:
            self.ffn_hidden = 8 * ((8 * self.d_model // 3 + 7) // 8)
        _checks.positive_int("ffn_hidden", self.ffn_hidden)
        _checks.non_negative_int("pad_id", self.pad_id)
        if self.pad_id >= self.vocab_size:
            raise ConfigError(f"pad_id={self.pad_id} is not allowed: expected an id below vocab_size={self.vocab_size}")
        _checks.dropout_prob(self.dropout)


def sinusoidal_positions(length: int, dim: int, start: int = 0, device=None) -> torch.Tensor:
    """Vaswani et al.'s PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...): (length, dim)."""
    pos = torch.arange(start, start + length, dtype=torch.float32, device=device)[:, None]  # (T, 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)[:, : dim // 2]
    return pe


class EncoderLayer(nn.Module):
    """x + self_attn(norm(x)) over every real input token, then x + ffn(norm(x))."""

    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = GroupedQueryAttention(cfg.d_model, cfg.n_head, causal=False, dropout=cfg.dropout)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, key_mask):
        x = x + self.drop(self.attn(self.norm1(x), attn_mask=key_mask))
        return x + self.drop(self.ffn(self.norm2(x)))


class DecoderLayer(nn.Module):
    """x + causal self_attn(norm(x)), then x + cross_attn(norm(x), memory), then x + ffn(norm(x))."""

    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.self_attn = GroupedQueryAttention(cfg.d_model, cfg.n_head, causal=True, dropout=cfg.dropout)
        self.cross_attn = CrossAttention(cfg.d_model, cfg.n_head, dropout=cfg.dropout)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, memory, memory_mask, cache=None):
        self_cache, cross_cache = (None, None) if cache is None else cache
        x = x + self.drop(self.self_attn(self.norm1(x), cache=self_cache))
        x = x + self.drop(self.cross_attn(self.norm2(x), memory, memory_mask=memory_mask, cache=cross_cache))
        return x + self.drop(self.ffn(self.norm3(x)))


@dataclass
class DecodingState:
    """What :meth:`EncoderDecoder.step` carries between steps: the memory, its mask and every cache."""

    memory: torch.Tensor  # (B, Ts, C)
    memory_mask: torch.Tensor  # (B, Ts) True for real input tokens
    caches: list[tuple[KVCache, KVCache]]  # per decoder layer: (self-attention, cross-attention)


class EncoderDecoder(SaveLoadMixin, nn.Module):
    """Encoder over src (B, Ts), decoder over tgt (B, Tt); ``forward(src, tgt_in, targets)`` returns
    (logits (B, Tt, vocab), mean cross-entropy or None), targets of -1 ignored."""

    model_type = MODEL_TYPE
    config_class = EncDecConfig

    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.wte.weight, std=cfg.d_model ** -0.5)  # · sqrt(d_model) below: unit scale, as PE
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.n_encoder_layer)])
        self.decoder = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.n_decoder_layer)])
        self.norm_enc, self.norm_dec = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)

    @classmethod
    def from_config(cls, cfg: EncDecConfig | dict) -> "EncoderDecoder":
        return cls(cfg if isinstance(cfg, EncDecConfig) else EncDecConfig(**cfg))

    def _embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            shown = f"{ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise InputTypeError(f"token ids must be an integer tensor (batch, seq), got {shown}")
        pe = sinusoidal_positions(ids.size(1), self.config.d_model, start, ids.device)  # (T, C)
        return self.drop(self.wte(ids) * math.sqrt(self.config.d_model) + pe)  # (B, T, C)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory (B, Ts, C), memory_mask (B, Ts) True for real tokens); src ids equal to pad_id are padding."""
        memory_mask = src != self.config.pad_id  # (B, Ts)
        x = self._embed(src)
        for layer in self.encoder:
            x = layer(x, memory_mask[:, None, None, :])
        return self.norm_enc(x), memory_mask

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor, caches=None) -> torch.Tensor:
        """Logits (B, Tt, vocab) for the target ids tgt (B, Tt); with caches, tgt holds only the new tokens."""
        start = caches[0][0].length if caches is not None else 0
        x = self._embed(tgt, start)
        for i, layer in enumerate(self.decoder):
            x = layer(x, memory, memory_mask, None if caches is None else caches[i])
        return self.norm_dec(x) @ self.wte.weight.t()  # (B, Tt, vocab): the head is the embedding

    def forward(self, src, tgt_in, targets=None):
        memory, memory_mask = self.encode(src)
        logits = self.decode(tgt_in, memory, memory_mask)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def start(self, src: torch.Tensor, max_len: int) -> DecodingState:
        """Encode src once and prepare caches for up to ``max_len`` target tokens (for :meth:`step`)."""
        memory, memory_mask = self.encode(src)
        B, Ts = src.shape
        caches = [(layer.self_attn.new_cache(B, max_len), layer.cross_attn.new_cache(B, Ts)) for layer in self.decoder]
        return DecodingState(memory, memory_mask, caches)

    def step(self, state: DecodingState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the next target tokens (B, T_new) (usually one each); returns their logits (B, T_new, vocab)."""
        return self.decode(tokens, state.memory, state.memory_mask, state.caches)

    def cross_attention_modules(self) -> list[CrossAttention]:
        return [layer.cross_attn for layer in self.decoder]


register_model(MODEL_TYPE, EncoderDecoder)
