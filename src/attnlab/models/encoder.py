"""A BERT-style encoder built from attnlab's own bidirectional attention (MiniLM, BERT).

Post-norm, as BERT: embeddings (word + position + token type) -> LayerNorm; then per layer
x = LN(x + Attn(x)), x = LN(x + FFN(x)) with GELU. Attention is ``GroupedQueryAttention`` with
``causal=False`` and a padding mask, so every token sees every real token of its sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnlab import _checks
from attnlab.attention.gqa import GroupedQueryAttention
from attnlab.attention.head_mask import HeadMaskMixin
from attnlab.errors import ConfigError, InputTypeError
from attnlab.models.base import SaveLoadMixin, register_model

MODEL_TYPE = "encoder"


@dataclass
class EncoderConfig:
    """Sizes of a BERT-style encoder; the defaults are all-MiniLM-L6-v2's."""

    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    d_model: int = 384
    n_layer: int = 6
    n_head: int = 12
    ffn_hidden: int = 1536
    norm_eps: float = 1e-12
    dropout: float = 0.0
    pad_token_id: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "max_position_embeddings", "type_vocab_size", "d_model", "n_layer", "n_head", "ffn_hidden"):
            _checks.positive_int(name, getattr(self, name))
        _checks.divisible("d_model", self.d_model, "n_head", self.n_head)
        _checks.dropout_prob(self.dropout)
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"pad_token_id={self.pad_token_id!r} is not allowed: expected 0..{self.vocab_size - 1}")


class EncoderLayer(nn.Module):
    """Bidirectional attention and a GELU FFN, each added to the residual then LayerNorm'ed (post-norm)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attn = GroupedQueryAttention(
            cfg.d_model, cfg.n_head, causal=False, qkv_bias=True, out_bias=True, dropout=cfg.dropout
        )
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.fc = nn.Linear(cfg.d_model, cfg.ffn_hidden)
        self.proj = nn.Linear(cfg.ffn_hidden, cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x, attn_mask=attn_mask)))  # (B, T, C)
        return self.norm2(x + self.drop(self.proj(F.gelu(self.fc(x)))))


class Encoder(SaveLoadMixin, HeadMaskMixin, nn.Module):
    """BERT-style encoder: ``forward`` gives every layer's hidden states, ``sentence_embedding``
    the mean over real tokens (what sentence-transformers' MiniLM returns); ``set_head_mask`` /
    ``masked_heads`` scale every layer's heads (``HeadMaskMixin``)."""

    model_type = MODEL_TYPE
    config_class = EncoderConfig

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.d_model)
        self.wtt = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.norm_emb = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.n_layer)])

    @classmethod
    def from_config(cls, config: EncoderConfig | dict) -> "Encoder":
        return cls(config if isinstance(config, EncoderConfig) else EncoderConfig(**config))

    def _check_ids(self, input_ids, name: str = "input_ids") -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            shown = (f"{input_ids.dtype} tensor of shape {tuple(input_ids.shape)}"
                     if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__)
            raise InputTypeError(f"{name} must be an integer tensor (batch, seq), got {shown}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """input_ids (B, T) -> hidden states [embeddings, layer 1, ..., layer n], each (B, T, C).

        attention_mask (B, T): 1 for real tokens, 0 for padding (no token attends to padding).
        """
        self._check_ids(input_ids)
        B, T = input_ids.shape
        _checks.sequence_fits(T, self.config.max_position_embeddings, name="input_ids")
        mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                shown = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
                raise InputTypeError(f"attention_mask must be a tensor of input_ids' shape {(B, T)}, got {shown}")
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys a query may attend to
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions) + self.wtt(token_type_ids)  # (B, T, C)
        hidden = [self.drop(self.norm_emb(x))]
        for layer in self.layers:
            hidden.append(layer(hidden[-1], mask))
        return hidden

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[word-piece embedding, layer 1's output, ..., layer n's output], each (B, T, C).

        Entry 0 is the word-piece lookup alone, before position and token-type embeddings and the
        embedding LayerNorm (``forward``'s entry 0 has them), so a piece's entry 0 is the same in
        every context; the rest are ``forward``'s."""
        layers = self(input_ids, attention_mask)[1:]  # checks the ids first
        return [self.wte(input_ids), *layers]

    def sentence_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           *, normalize: bool = True) -> torch.Tensor:
        """(B, C): the last layer averaged over real tokens, L2-normalised by default (as
        sentence-transformers' all-MiniLM-L6-v2)."""
        last = self(input_ids, attention_mask)[-1]  # (B, T, C)
        weights = torch.ones_like(input_ids, dtype=last.dtype) if attention_mask is None else attention_mask.to(last.dtype)
        pooled = (last * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if normalize else pooled


register_model(MODEL_TYPE, Encoder)
