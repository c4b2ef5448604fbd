"""The lecture's attention path, one new idea per class (LLMs-from-scratch, chapter 3).

Names, signatures and parameter-creation order are the lecture's, so its seeded examples
(``torch.manual_seed(123)`` and the six tokens "Your journey starts with one step") print the
lecture's numbers. All of them compute attention through :mod:`attnlab.attention.kernel`.
They default to the explicit path, as the lecture writes it; pass ``fused=True`` (or set
``module.fused = True``) to run ``F.scaled_dot_product_attention`` instead.
"""

from __future__ import annotations

import torch
from torch import nn

from attnlab import _checks
from attnlab.attention.kernel import attend
from attnlab.attention.record import RecordsAttention


def simple_self_attention(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with no trainable weights: scores are plain dot products of the inputs.

    inputs: (seq, d) or (batch, seq, d). Returns (context, weights): context has the input's
    shape, weights are (seq, seq) (or (batch, seq, seq)) with rows summing to 1.
    """
    _checks.input_tensor(inputs, None, ranks=(2, 3), name="inputs")
    x = inputs if inputs.dim() == 3 else inputs.unsqueeze(0)
    q = x.unsqueeze(1)  # (B, 1, T, d): one head, the inputs are queries, keys and values
    context, weights = attend(q, q, q, scale=1.0, need_weights=True)
    context, weights = context.squeeze(1), weights.squeeze(1)
    if inputs.dim() == 2:
        return context[0], weights[0]
    return context, weights


class SelfAttentionV1(RecordsAttention, nn.Module):
    """Trainable Q/K/V as raw parameter matrices (``torch.rand``), scaled dot-product attention."""

    fused = False

    def __init__(self, d_in: int, d_out: int, *, fused: bool = False):
        super().__init__()
        _checks.positive_int("d_in", d_in)
        _checks.positive_int("d_out", d_out)
        self.d_in, self.d_out = d_in, d_out
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.input_tensor(x, self.d_in, ranks=(2, 3))
        queries = x @ self.W_query  # (..., T, d_out)
        keys = x @ self.W_key
        values = x @ self.W_value
        return _single_head(self, queries, keys, values)


class SelfAttentionV2(RecordsAttention, nn.Module):
    """As V1, with ``nn.Linear`` projections (better initialisation, optional bias)."""

    fused = False

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False, *, fused: bool = False):
        super().__init__()
        _checks.positive_int("d_in", d_in)
        _checks.positive_int("d_out", d_out)
        self.d_in, self.d_out = d_in, d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.input_tensor(x, self.d_in, ranks=(2, 3))
        return _single_head(self, self.W_query(x), self.W_key(x), self.W_value(x))


def _single_head(module: RecordsAttention, queries, keys, values, **kwargs) -> torch.Tensor:
    """Run one head over (T, d) or (B, T, d) projections; returns the same rank."""
    unbatched = queries.dim() == 2
    q, k, v = (t.unsqueeze(0) if unbatched else t for t in (queries, keys, values))
    context = module._attend(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), **kwargs).squeeze(1)
    return context[0] if unbatched else context


class CausalAttention(RecordsAttention, nn.Module):
    """One causal head: future positions are masked before the softmax, dropout on the weights."""

    fused = False

    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False, *, fused: bool = False):
        super().__init__()
        for name, value in (("d_in", d_in), ("d_out", d_out), ("context_length", context_length)):
            _checks.positive_int(name, value)
        _checks.dropout_prob(dropout)
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # 1 above the diagonal: the positions a token must not see.
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.input_tensor(x, self.d_in, ranks=(3,))
        num_tokens = x.shape[1]
        _checks.sequence_fits(num_tokens, self.context_length)
        allowed = self.mask[:num_tokens, :num_tokens] == 0
        p = self.dropout.p if self.training else 0.0
        return _single_head(self, self.W_query(x), self.W_key(x), self.W_value(x), mask=allowed, dropout_p=p)


class MultiHeadAttentionWrapper(RecordsAttention, nn.Module):
    """Multi-head attention as a stack of independent single heads; outputs are concatenated,
    so the result has ``num_heads * d_out`` columns."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, *, fused: bool = False):
        super().__init__()
        _checks.positive_int("num_heads", num_heads)
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias, fused=fused) for _ in range(num_heads)]
        )
        self.d_in, self.d_out, self.num_heads = d_in, d_out, num_heads

    @property
    def fused(self) -> bool:  # the heads do the attention; the wrapper mirrors them
        return all(head.fused for head in self.heads)

    @fused.setter
    def fused(self, value: bool) -> None:
        for head in self.heads:
            head.fused = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([head(x) for head in self.heads], dim=-1)  # (B, T, num_heads * d_out)
        if self._recording:
            self.last_attention = torch.cat([head.last_attention for head in self.heads], dim=1)
        return out


class MultiHeadAttention(RecordsAttention, nn.Module):
    """Multi-head attention with weight splits: one projection per Q/K/V whose columns are cut
    into ``num_heads`` blocks of ``head_dim = d_out // num_heads``, then an output projection."""

    fused = False

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, *, fused: bool = False):
        super().__init__()
        for name, value in (("d_in", d_in), ("d_out", d_out), ("context_length", context_length), ("num_heads", num_heads)):
            _checks.positive_int(name, value)
        _checks.divisible("d_out", d_out, "num_heads", num_heads)
        _checks.dropout_prob(dropout)
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)  # combines the heads' outputs
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))
        self.fused = fused

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, d_out) -> (B, num_heads, T, head_dim)."""
        b, num_tokens, _ = t.shape
        return t.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.input_tensor(x, self.d_in, ranks=(3,))
        b, num_tokens, _ = x.shape
        _checks.sequence_fits(num_tokens, self.context_length)
        queries = self.split_heads(self.W_query(x))  # (B, nh, T, hd)
        keys = self.split_heads(self.W_key(x))
        values = self.split_heads(self.W_value(x))
        allowed = self.mask[:num_tokens, :num_tokens] == 0
        p = self.dropout.p if self.training else 0.0
        context = self._attend(queries, keys, values, mask=allowed, dropout_p=p)  # (B, nh, T, hd)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)  # merge heads
        return self.out_proj(context)
