"""Grouped-query attention: one class for MHA, GQA and MQA.

Queries keep ``n_heads`` heads; keys and values have only ``n_kv_heads``, each shared by a group
of ``n_heads // n_kv_heads`` query heads. n_kv_heads == n_heads is classic multi-head attention,
n_kv_heads == 1 is multi-query attention. Fewer K/V heads shrink the KV cache by the group size.
The kernel attends grouped heads without materialising repeated K/V.
"""

from __future__ import annotations

import torch
from torch import nn

from attnlab import _checks
from attnlab.attention.cache import KVCache
from attnlab.attention.fuse import concat_linears, joint_linear
from attnlab.attention.head_mask import MasksHeads
from attnlab.attention.record import RecordsAttention
from attnlab.attention.rope import RotaryEmbedding, default_positions
from attnlab.errors import InputTypeError


class GroupedQueryAttention(RecordsAttention, MasksHeads, nn.Module):
    """Causal (by default) attention with ``n_kv_heads`` K/V heads, optional RoPE and a KV cache.

    ``dropout`` drops attention weights in training. ``scale`` defaults to 1/sqrt(head_dim).
    ``head_mask`` (:mod:`attnlab.attention.head_mask`) scales each head's output before o_proj.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *, head_dim: int | None = None,
                 qkv_bias: bool = False, out_bias: bool = False, dropout: float = 0.0, causal: bool = True,
                 rope: bool = False, rope_theta: float = 10000.0, rope_interleave: bool = False,
                 scale: float | None = None):
        super().__init__()
        _checks.positive_int("d_model", d_model)
        _checks.positive_int("n_heads", n_heads)
        n_kv_heads = n_heads if n_kv_heads is None else _checks.positive_int("n_kv_heads", n_kv_heads)
        _checks.divisible("n_heads", n_heads, "n_kv_heads", n_kv_heads)
        if head_dim is None:
            _checks.divisible("d_model", d_model, "n_heads", n_heads)
            head_dim = d_model // n_heads
        _checks.positive_int("head_dim", head_dim)
        self.dropout = _checks.dropout_prob(dropout)
        if scale is not None:
            _checks.positive("scale", scale)
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.causal, self.scale = bool(causal), scale
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=out_bias)
        self.rope = RotaryEmbedding(head_dim, rope_theta, rope_interleave) if rope else None
        self.qkv_proj = None  # set by fuse_projections()

    def fuse_projections(self) -> None:
        """Replace q_proj, k_proj and v_proj by one Linear ``qkv_proj`` whose output rows are theirs
        stacked: the same numbers in one matmul that reads the input once (decoding at batch 1 pays per
        call; :func:`attnlab.quantize.quantize_int4` fuses before it quantizes). Irreversible."""
        if self.qkv_proj is None:
            self.qkv_proj = concat_linears([self.q_proj, self.k_proj, self.v_proj])
            del self.q_proj, self.k_proj, self.v_proj

    def new_cache(self, batch_size: int, max_len: int, *, dtype=None, device=None) -> KVCache:
        """A KV cache for this layer: n_kv_heads heads of head_dim, the module's dtype/device by default
        (given both, the projections are not read: an int8 projection has no float weight to ask)."""
        if dtype is None or device is None:
            weight = (self.k_proj if self.qkv_proj is None else self.qkv_proj).weight
            dtype, device = dtype or weight.dtype, device or weight.device
        return KVCache(batch_size, self.n_kv_heads, max_len, self.head_dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, *, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, rotary=None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). With a cache, x holds only the new tokens and
        attends to every cached one; positions default to cache.length + arange(T). ``rotary``:
        RoPE cos/sin tables for these positions, made once by the model for all its layers."""
        _checks.input_tensor(x, self.d_model)
        B, T, _ = x.shape
        nh, nkv, hs = self.n_heads, self.n_kv_heads, self.head_dim
        qk = None  # queries and keys side by side (B, nh + nkv, T, hs) when the projections are fused
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
        elif self.training:  # one matmul over the three weights (parameters stay separate)
            qkv = joint_linear(x, (self.q_proj, self.k_proj, self.v_proj))
        else:
            qkv = None
        if qkv is None:
            q = self.q_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
            k = self.k_proj(x).view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
            v = self.v_proj(x).view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        else:
            qkv = qkv.view(B, T, nh + 2 * nkv, hs).transpose(1, 2)  # (B, nh + 2·nkv, T, hs)
            if self.rope is None:
                q, k, v = qkv.split([nh, nkv, nkv], dim=1)
            else:  # queries and keys stay side by side for one rotation
                qk, v = qkv.split([nh + nkv, nkv], dim=1)
        if self.rope is not None:
            if rotary is None:
                length = None
                if positions is None:
                    positions, length = default_positions(cache.length if cache is not None else 0, T, x.device)
                rotary = self.rope.cos_sin(positions, length)
            if qk is None:
                q, k = self.rope.rotate(q, rotary), self.rope.rotate(k, rotary)
            else:  # one rotation for both: every head turns by the same angles
                qk = self.rope.rotate(qk, rotary)
        if qk is not None:
            q, k = qk.split([nh, nkv], dim=1)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nkv, T_total, hs): past tokens, then these
        if attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool):
            shown = attn_mask.dtype if isinstance(attn_mask, torch.Tensor) else type(attn_mask).__name__
            raise InputTypeError(f"attn_mask must be a bool tensor (True = may attend), got {shown}")
        dropout_p = self.dropout if self.training else 0.0
        y = self._attend(q, k, v, causal=self.causal, mask=attn_mask, dropout_p=dropout_p, scale=self.scale)
        y = self._mask_heads(y)  # (B, nh, T, hs), unchanged without a head mask
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # re-assemble all heads side by side
        return self.o_proj(y)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}")
