"""Cross-attention (Vaswani et al. 2017's encoder–decoder attention): queries from the decoder, keys
and values from the encoder's output (the "memory"), no causal mask — every output position may
look at every input position — and a padding mask over the memory.

The memory is fixed while a sequence is decoded, so its keys and values are computed once per input
and kept in a :class:`~attnlab.attention.cache.KVCache`: later steps project only their own query.
"""

from __future__ import annotations

import torch
from torch import nn

from attnlab import _checks
from attnlab.attention.cache import KVCache
from attnlab.attention.record import RecordsAttention
from attnlab.errors import ConfigError


class CrossAttention(RecordsAttention, nn.Module):
    """Multi-head attention of x (B, Tq, d_model) over memory (B, Tk, memory_dim) -> (B, Tq, d_model).

    memory_mask (B, Tk) bool: True for real input tokens; padding gets weight 0.
    """

    def __init__(self, d_model: int, n_heads: int, *, memory_dim: int | None = None, head_dim: int | None = None,
                 bias: bool = False, dropout: float = 0.0):
        super().__init__()
        _checks.positive_int("d_model", d_model)
        _checks.positive_int("n_heads", n_heads)
        memory_dim = d_model if memory_dim is None else _checks.positive_int("memory_dim", memory_dim)
        if head_dim is None:
            _checks.divisible("d_model", d_model, "n_heads", n_heads)
            head_dim = d_model // n_heads
        _checks.positive_int("head_dim", head_dim)
        self.d_model, self.memory_dim, self.n_heads, self.head_dim = d_model, memory_dim, n_heads, head_dim
        self.dropout = _checks.dropout_prob(dropout)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(memory_dim, n_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(memory_dim, n_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)

    def new_cache(self, batch_size: int, memory_len: int, *, dtype=None, device=None) -> KVCache:
        """Room for the memory's keys and values: filled by the first forward, read by every later one."""
        weight = self.k_proj.weight
        return KVCache(batch_size, self.n_heads, memory_len, self.head_dim,
                       dtype=dtype or weight.dtype, device=device or weight.device)

    def memory_kv(self, memory: torch.Tensor | None, cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, nh, Tk, hs) of the memory: from the cache once filled, else projected
        (and stored in the cache when one is given)."""
        if cache is not None and cache.length > 0:
            return cache.k[:, :, :cache.length], cache.v[:, :, :cache.length]
        if memory is None:
            raise ConfigError("memory=None needs a cache already filled with the memory's keys and values")
        _checks.input_tensor(memory, self.memory_dim, name="memory")
        B, T, _ = memory.shape
        k = self.k_proj(memory).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, Tk, hs)
        v = self.v_proj(memory).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, Tk, hs)
        return cache.update(k, v) if cache is not None else (k, v)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, *, memory_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        _checks.input_tensor(x, self.d_model)
        B, T, _ = x.shape
        k, v = self.memory_kv(memory, cache)
        mask = None
        if memory_mask is not None:
            if memory_mask.dtype != torch.bool or memory_mask.shape != (B, k.size(2)):
                raise ConfigError(f"memory_mask has dtype {memory_mask.dtype} and shape {tuple(memory_mask.shape)}: "
                                  f"expected a bool tensor of shape ({B}, {k.size(2)}), True for real input tokens")
            mask = memory_mask[:, None, None, :]  # (B, 1, 1, Tk)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, Tq, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = self._attend(q, k, v, causal=False, mask=mask, dropout_p=dropout_p)  # (B, nh, Tq, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, memory_dim={self.memory_dim}, n_heads={self.n_heads}, head_dim={self.head_dim}"
