"""The neural n-gram (Bengio et al. 2003): embed the previous ``context`` tokens, concatenate,
one tanh hidden layer, logits over the vocabulary. It predicts every position of a (B, T) batch
at once, so it trains on the same (x, y) batches as GPT."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnlab._checks import dropout_prob, positive_int
from attnlab.errors import ConfigError, InputTypeError
from attnlab.models.base import SaveLoadMixin, register_model


@dataclass
class MLPConfig:
    vocab_size: int
    context: int = 3  # n - 1 tokens seen per prediction
    d_embed: int = 32
    hidden: int = 256
    dropout: float = 0.0

    @property
    def block_size(self) -> int:
        """Longest useful input: a longer prefix does not change the last prediction (for generators that crop)."""
        return self.context


class MLPLM(SaveLoadMixin, nn.Module):
    """Logits at position t depend on tokens t-context+1..t only; positions before the text start
    read a learned padding token (id vocab_size in the embedding table)."""

    model_type = "mlp"
    config_class = MLPConfig

    def __init__(self, vocab_size: int, context: int = 3, d_embed: int = 32, hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("context", context), ("d_embed", d_embed), ("hidden", hidden)):
            positive_int(name, value)
        self.config = MLPConfig(vocab_size, context, d_embed, hidden, dropout_prob(dropout))
        self.wte = nn.Embedding(vocab_size + 1, d_embed)  # the last row is the padding token
        self.fc = nn.Linear(context * d_embed, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab_size)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) int64 -> (logits (B, T, V), mean cross-entropy over positions or None)."""
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.int64:
            got = f"{idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise InputTypeError(f"idx must be an int64 tensor (batch, seq) of token ids, got {got}")
        V, c = self.config.vocab_size, self.config.context
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= V):
            raise ConfigError(f"idx holds ids in [{int(idx.min())}, {int(idx.max())}]: expected ids in [0, {V})")
        B, T = idx.shape
        padded = F.pad(idx, (c - 1, 0), value=V)  # (B, T + c - 1)
        windows = padded.unfold(1, c, 1)  # (B, T, c): tokens t-c+1..t
        x = self.wte(windows).view(B, T, c * self.config.d_embed)  # (B, T, c*d_embed)
        x = self.drop(torch.tanh(self.fc(x)))  # (B, T, hidden)
        logits = self.head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, V), targets.reshape(-1), ignore_index=-1)
        return logits, loss


register_model(MLPLM.model_type, MLPLM)
