"""Recurrent language models, the first rows of the lecture's history table: Elman's RNN (1990, tanh),
the LSTM (Hochreiter & Schmidhuber 1997) and the GRU (Cho et al. 2014).

embedding → ``n_layer`` recurrent layers (``torch.nn.RNN`` / ``LSTM`` / ``GRU``) → linear head. Every
token's prediction depends on the whole past only through one hidden state per layer: the fixed-size
bottleneck that attention removes. That state is the model's "cache" for decoding
(:class:`RecurrentState`); unlike a KV cache its size does not grow with the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnlab import _checks
from attnlab.errors import ConfigError, InputTypeError
from attnlab.models.base import SaveLoadMixin, register_model
from attnlab.options import check_choices, option

CELLS = ("rnn", "lstm", "gru")
MODEL_TYPE = "rnn"
_MODULES = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


@dataclass
class RNNConfig:
    """Everything needed to rebuild a recurrent LM; saved as config.json next to the weights."""

    vocab_size: int = option(65, "token ids the embedding and head cover", flag=False)
    cell: str = option("lstm", "the recurrent layer: rnn (Elman, tanh), lstm or gru", choices=CELLS)
    n_layer: int = option(2, "stacked recurrent layers")
    d_model: int = option(128, "width of the embedding and of every hidden state")
    block_size: int = option(256, "tokens per training window; generation reads at most this many, as a GPT does")
    dropout: float = option(0.0, "between recurrent layers and before the head, while training")

    def __post_init__(self):
        check_choices(self)
        for name in ("vocab_size", "n_layer", "d_model", "block_size"):
            _checks.positive_int(name, getattr(self, name))
        _checks.dropout_prob(self.dropout)


class RecurrentState:
    """The decoding state of a recurrent LM: h (n_layer, B, hidden), and the LSTM's cell c, after the
    ``length`` tokens seen so far. ``bytes()`` is the same after one token or a million (a KV cache
    grows by ``bytes_per_token()`` with every token; this state by 0)."""

    def __init__(self, batch_size: int, n_layer: int, hidden: int, max_len: int, *, lstm: bool,
                 dtype=torch.float32, device="cpu"):
        for name, value in (("batch_size", batch_size), ("n_layer", n_layer), ("hidden", hidden), ("max_len", max_len)):
            _checks.positive_int(name, value)
        self.batch_size, self.n_layer, self.hidden, self.max_len = batch_size, n_layer, hidden, max_len
        self.dtype, self.length = dtype, 0
        self.h = torch.zeros(n_layer, batch_size, hidden, dtype=dtype, device=device)
        self.c = torch.zeros_like(self.h) if lstm else None

    @property
    def device(self) -> torch.device:
        return self.h.device

    def tensors(self):
        """What ``nn.RNN``/``nn.GRU`` (h) or ``nn.LSTM`` ((h, c)) take as their initial state."""
        return self.h if self.c is None else (self.h, self.c)

    def update(self, final, t_new: int) -> None:
        """Keep the recurrent layers' final state after ``t_new`` more tokens."""
        if self.length + t_new > self.max_len:
            raise ConfigError(f"RecurrentState overflow: length={self.length} + T_new={t_new} > max_len={self.max_len}: "
                              "build the state with a larger max_len or reset() it")
        h, c = (final, None) if self.c is None else final
        self.h = h.detach().to(self.dtype)
        self.c = None if c is None else c.detach().to(self.dtype)
        self.length += t_new

    def reset(self) -> None:
        """Back to the zero state before any token."""
        self.h = torch.zeros_like(self.h)
        self.c = None if self.c is None else torch.zeros_like(self.c)
        self.length = 0

    def elements(self) -> int:
        """Numbers held per sequence: n_layer · hidden, twice that for an LSTM (h and c)."""
        return self.n_layer * self.hidden * (1 if self.c is None else 2)

    def bytes(self) -> int:
        """Bytes of the whole batch's state: the same at every context length."""
        return self.batch_size * self.elements() * self.dtype.itemsize

    def bytes_per_token(self) -> int:
        """0: no token is kept, only the fixed-size state (compare KVCache.bytes_per_token)."""
        return 0

    def __repr__(self) -> str:
        return (f"RecurrentState(batch_size={self.batch_size}, n_layer={self.n_layer}, hidden={self.hidden}, "
                f"lstm={self.c is not None}, length={self.length}, dtype={self.dtype})")


class RNNLM(SaveLoadMixin, nn.Module):
    """Token embedding, ``n_layer`` recurrent layers of ``cfg.cell``, linear head over the vocabulary.
    Saved and loaded as a folder (config.json + model.safetensors) by ``SaveLoadMixin``."""

    model_type = MODEL_TYPE
    config_class = RNNConfig

    def __init__(self, cfg: RNNConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        recurrent = _MODULES[cfg.cell]
        self.rnn = recurrent(cfg.d_model, cfg.d_model, num_layers=cfg.n_layer, batch_first=True,
                             dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size)

    @classmethod
    def from_config(cls, cfg: RNNConfig | dict) -> "RNNLM":
        return cls(cfg if isinstance(cfg, RNNConfig) else RNNConfig(**cfg))

    def forward(self, idx, targets=None, *, caches=None):
        """idx (B, T) token ids -> (logits (B, T, vocab), mean cross-entropy or None; targets -1 ignored).

        caches: ``new_caches(...)`` — the state after the tokens fed so far, continued and updated here.
        """
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            shown = f"{idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise InputTypeError(f"idx must be an integer tensor (batch, seq), got {shown}")
        state = self._state(caches, idx.size(0))
        x = self.drop(self.wte(idx))  # (B, T, C)
        out, final = self.rnn(x, None if state is None else state.tensors())  # (B, T, C)
        if state is not None:
            state.update(final, idx.size(1))
        logits = self.lm_head(self.drop(out))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _state(self, caches, batch_size: int) -> RecurrentState | None:
        if caches is None:
            return None
        if len(caches) != 1 or not isinstance(caches[0], RecurrentState):
            raise ConfigError("caches must be the one-item list model.new_caches(...) returns: [RecurrentState]")
        if caches[0].batch_size != batch_size:
            raise ConfigError(f"caches hold batch_size={caches[0].batch_size} but idx has {batch_size} sequences")
        return caches[0]

    def new_caches(self, batch_size: int, max_len: int, *, dtype=None, device=None) -> list[RecurrentState]:
        """[the zero state] for ``batch_size`` sequences of up to ``max_len`` tokens (its size does not depend on it)."""
        weight = self.lm_head.weight
        return [RecurrentState(batch_size, self.config.n_layer, self.config.d_model, max_len,
                               lstm=self.config.cell == "lstm", dtype=dtype or weight.dtype,
                               device=device or weight.device)]

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        try:
            super().load_state_tensors(tensors)
        except RuntimeError as err:  # shapes differ: weights of another size or cell
            raise ConfigError(f"weights do not match the config (another cell or size?): {' '.join(str(err).split())[:300]}") from None


register_model(MODEL_TYPE, RNNLM)
