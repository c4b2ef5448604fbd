"""Bahdanau et al. (2014)'s additive attention, the first attention of neural translation.

A decoder state s (the query) scores every encoder state h_j (the keys) with a one-hidden-layer
network instead of a dot product,

    e_j = v_aᵀ tanh(W_a s + U_a h_j),    α = softmax(e),    c = Σ_j α_j h_j,

with the paper's names W_a, U_a, v_a. U_a h_j does not depend on the query, so a decoder computes it
once per input (:meth:`AdditiveAttention.project_keys`) and reuses it at every output step.
"""

from __future__ import annotations

import torch
from torch import nn

from attnlab import _checks
from attnlab.attention.record import RecordsAttention
from attnlab.errors import ConfigError


class AdditiveAttention(RecordsAttention, nn.Module):
    """Additive (Bahdanau) attention of queries (B, Tq, query_dim) over keys (B, Tk, key_dim).

    The weights (B, 1, Tq, Tk) go through the one kernel's softmax and weighted sum
    (:func:`~attnlab.attention.kernel.attend_scores`), so ``record_attention`` captures them.
    """

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int):
        super().__init__()
        for name, value in (("query_dim", query_dim), ("key_dim", key_dim), ("attn_dim", attn_dim)):
            _checks.positive_int(name, value)
        self.d_model, self.key_dim, self.attn_dim = query_dim, key_dim, attn_dim  # d_model: query width
        self.W_a = nn.Linear(query_dim, attn_dim, bias=False)
        self.U_a = nn.Linear(key_dim, attn_dim, bias=False)
        self.v_a = nn.Linear(attn_dim, 1, bias=False)

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """U_a h_j for every key (B, Tk, key_dim) -> (B, Tk, attn_dim): once per input sequence."""
        _checks.input_tensor(keys, self.key_dim, name="keys")
        return self.U_a(keys)

    def scores(self, query: torch.Tensor, projected_keys: torch.Tensor) -> torch.Tensor:
        """e = v_aᵀ tanh(W_a s + U_a h): query (B, Tq, query_dim), U_a h (B, Tk, attn_dim) -> (B, Tq, Tk)."""
        _checks.input_tensor(query, self.d_model, name="query")
        hidden = torch.tanh(self.W_a(query).unsqueeze(2) + projected_keys.unsqueeze(1))  # (B, Tq, Tk, A)
        return self.v_a(hidden).squeeze(-1)  # (B, Tq, Tk)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor | None = None, *,
                key_mask: torch.Tensor | None = None, projected_keys: torch.Tensor | None = None) -> torch.Tensor:
        """Context vectors (B, Tq, value_dim): the α-weighted sum of ``values`` (default: the keys).

        key_mask (B, Tk) bool, True for real inputs (padding gets weight 0); projected_keys: the
        output of :meth:`project_keys` for these keys, to skip recomputing it at every step.
        """
        values = keys if values is None else values
        if projected_keys is None:
            projected_keys = self.project_keys(keys)
        if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != keys.shape[:2]):
            raise ConfigError(f"key_mask has dtype {key_mask.dtype} and shape {tuple(key_mask.shape)}: expected a bool "
                              f"tensor of shape {tuple(keys.shape[:2])} (batch, keys), True for real inputs")
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Tk)
        e = self.scores(query, projected_keys).unsqueeze(1)  # (B, 1, Tq, Tk): one "head"
        context = self._attend_scores(e, values.unsqueeze(1), mask=mask)  # (B, 1, Tq, Dv)
        return context.squeeze(1)

    def extra_repr(self) -> str:
        return f"query_dim={self.d_model}, key_dim={self.key_dim}, attn_dim={self.attn_dim}"
