"""DeepSeek's multi-head latent attention (MLA, DeepSeek-V2 §2.1; DeepSeek-V3 §2.1.1).

Keys and values are rebuilt from one small latent per token, ``c_kv = RMSNorm(W_DKV x)`` of size
``kv_lora_rank``; positions enter through a separate RoPE part (``qk_rope_head_dim``) whose key
``k_pe`` is shared by all heads. Two modes give the same outputs:

- naive: up-project c_kv into per-head K and V (``wkv_b``), cache those, attend as MHA;
- absorbed: fold W_UK into the query and W_UV into the output, so attention runs over the
  latent itself and the cache holds only c_kv + k_pe (576 numbers per token at DeepSeek-V3's dims).

Parameter names follow DeepSeek-V3's reference ``inference/model.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from attnlab import _checks
from attnlab.attention.cache import KVCache, LatentKVCache, kv_elements_per_token, latent_elements_per_token
from attnlab.attention.head_mask import MasksHeads
from attnlab.attention.record import RecordsAttention
from attnlab.attention.rope import RotaryEmbedding, default_positions
from attnlab.errors import ConfigError, InputTypeError
from attnlab.norm import RMSNorm

MODES = ("naive", "absorbed")


def mla_dims(head_dim: int, *, kv_lora_rank: int | None = None) -> dict:
    """MLA head dims at DeepSeek-V3's ratios for a model whose heads are ``head_dim`` wide: no-RoPE
    query/key and value parts of head_dim, a RoPE part of head_dim / 2 (64 of 128 in V3) and a
    latent of 4 · head_dim (512) unless ``kv_lora_rank`` is given."""
    return dict(kv_lora_rank=kv_lora_rank or 4 * head_dim, qk_nope_head_dim=head_dim,
                qk_rope_head_dim=max(2, head_dim // 2 - head_dim // 2 % 2),  # even: RoPE turns pairs
                v_head_dim=head_dim)


class MultiHeadLatentAttention(RecordsAttention, MasksHeads, nn.Module):
    """MLA with optional query compression (q_lora_rank > 0) and decoupled RoPE.

    ``module.mode`` ("naive" or "absorbed") can be switched at run time; ``new_cache`` returns
    the cache that fits the current mode.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        q_lora_rank: int = 0,
        kv_lora_rank: int = 512,
        qk_nope_head_dim: int = 128,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        rope_theta: float = 10000.0,
        rope_interleave: bool = True,
        mode: str = "naive",
        dropout: float = 0.0,
        causal: bool = True,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("kv_lora_rank", kv_lora_rank),
                            ("qk_nope_head_dim", qk_nope_head_dim), ("qk_rope_head_dim", qk_rope_head_dim),
                            ("v_head_dim", v_head_dim)):
            _checks.positive_int(name, value)
        _checks.non_negative_int("q_lora_rank", q_lora_rank)
        if qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim={qk_rope_head_dim} is odd: RoPE rotates pairs of dimensions "
                              f"(qk_nope_head_dim={qk_nope_head_dim} can be anything)")
        _checks.positive("norm_eps", norm_eps)
        self.d_model, self.n_heads, self.q_lora_rank, self.kv_lora_rank = d_model, n_heads, q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.dropout = _checks.dropout_prob(dropout)
        self.causal = bool(causal)
        self.rope_interleave = bool(rope_interleave)
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        # Scores are over the full (nope + rope) query/key dim in both modes (paper, eq. 17).
        self.softmax_scale = self.qk_head_dim ** -0.5

        if self.q_lora_rank == 0:
            self.wq = nn.Linear(d_model, n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(d_model, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, eps=norm_eps)
            self.wq_b = nn.Linear(q_lora_rank, n_heads * self.qk_head_dim, bias=False)
        # One down-projection gives the latent c_kv and the shared RoPE key k_pe together.
        self.wkv_a = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, eps=norm_eps)
        # Up-projection of the latent into per-head [k_nope | v]: rows are head-major.
        self.wkv_b = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(n_heads * v_head_dim, d_model, bias=False)
        self.rope = RotaryEmbedding(qk_rope_head_dim, theta=rope_theta, interleaved=self.rope_interleave)
        self.mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        _checks.one_of("mode", value, MODES)
        self._mode = value

    def kv_elements_per_token(self) -> int:
        """Numbers cached per token in this layer for the current mode (DeepSeek-V2, Table 1)."""
        if self.mode == "naive":
            return kv_elements_per_token(self.n_heads, self.qk_head_dim, self.v_head_dim)
        return latent_elements_per_token(self.kv_lora_rank, self.qk_rope_head_dim)

    def new_cache(self, batch_size: int, max_len: int, *, dtype=None, device=None):
        """An empty cache of the kind the current mode reads: per-head K/V (naive) or latent (absorbed)."""
        weight = self.wkv_a.weight
        dtype = weight.dtype if dtype is None else dtype
        device = weight.device if device is None else device
        if self.mode == "naive":
            return KVCache(
                batch_size, self.n_heads, max_len, self.qk_head_dim, self.v_head_dim,
                dtype=dtype, device=device,
            )
        return LatentKVCache(
            batch_size, max_len, self.kv_lora_rank, self.qk_rope_head_dim, dtype=dtype, device=device
        )

    def forward(self, x: torch.Tensor, *, cache=None, positions=None, attn_mask=None, rotary=None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). With a cache, x holds only the new tokens;
        positions (T,) or (B, T) default to cache.length + arange(T). ``rotary``: RoPE cos/sin
        tables for these positions, made once by the model for all its layers."""
        _checks.input_tensor(x, self.d_model)
        self._check_cache(cache)
        if attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool):
            raise InputTypeError(
                f"attn_mask must be a bool tensor (True = may attend), got "
                f"{getattr(attn_mask, 'dtype', type(attn_mask).__name__)}"
            )
        B, T, _ = x.shape
        H, dn, dr, r = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        if rotary is None:
            length = None
            if positions is None:
                positions, length = default_positions(cache.length if cache is not None else 0, T, x.device)
            rotary = self.rope.cos_sin(positions, length)

        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, H, self.qk_head_dim).transpose(1, 2)  # (B, H, T, dn + dr)
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        q_pe = self.rope.rotate(q_pe, rotary)  # (B, H, T, dr)
        c_kv, k_pe = self.wkv_a(x).split([r, dr], dim=-1)  # (B, T, r), (B, T, dr)
        c_kv = self.kv_norm(c_kv)
        k_pe = self.rope.rotate(k_pe.unsqueeze(1), rotary)  # (B, 1, T, dr): one RoPE key for all heads

        kw = dict(
            causal=self.causal, mask=attn_mask, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
        )
        if self.mode == "naive":
            y = self._naive(q_nope, q_pe, c_kv, k_pe, cache, kw)
        else:
            y = self._absorbed(q_nope, q_pe, c_kv, k_pe, cache, kw)
        y = self._mask_heads(y)  # (B, H, T, dv): both modes mask the same per-head outputs
        y = y.transpose(1, 2).reshape(B, T, H * self.v_head_dim)  # (B, T, H * dv)
        return self.wo(y)

    def _naive(self, q_nope, q_pe, c_kv, k_pe, cache, kw) -> torch.Tensor:
        """Up-project the latent into per-head keys and values; plain MHA over them."""
        B, T, _ = c_kv.shape
        H, dn = self.n_heads, self.qk_nope_head_dim
        kv = self.wkv_b(c_kv).view(B, T, H, dn + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([dn, self.v_head_dim], dim=-1)  # (B, H, T, dn), (B, H, T, dv)
        k = torch.cat([k_nope, k_pe.expand(-1, H, -1, -1)], dim=-1)  # (B, H, T, dn + dr)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, H, T, dn + dr)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, H, T_total, ·)
        return self._attend(q, k, v, **kw)  # (B, H, T, dv)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, cache, kw) -> torch.Tensor:
        """Attend over the latent: q_nope·W_UK scores against c_kv, then W_UV maps back per head.

        This is MQA with one key head [c_kv | k_pe] (dim r + dr) and one value head c_kv (dim r).
        """
        dn = self.qk_nope_head_dim
        w = self.wkv_b.weight.view(self.n_heads, dn + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, :dn], w[:, dn:]  # (H, dn, r), (H, dv, r)
        q_latent = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # (B, H, T, r)
        k_pe = k_pe.squeeze(1)  # (B, T, dr)
        if cache is not None:
            c_kv, k_pe = cache.update(c_kv, k_pe)  # (B, T_total, r), (B, T_total, dr)
        q = torch.cat([q_latent, q_pe], dim=-1)  # (B, H, T, r + dr)
        k = torch.cat([c_kv, k_pe], dim=-1).unsqueeze(1)  # (B, 1, T_total, r + dr)
        context = self._attend(q, k, c_kv.unsqueeze(1), **kw)  # (B, H, T, r)
        return torch.einsum("bhtc,hdc->bhtd", context, w_uv)  # (B, H, T, dv)

    def _check_cache(self, cache) -> None:
        if cache is None:
            return
        expected = KVCache if self.mode == "naive" else LatentKVCache
        if not isinstance(cache, expected):
            raise InputTypeError(
                f"cache is a {type(cache).__name__}, but mode={self.mode!r} reads a {expected.__name__}: "
                f"build it with module.new_cache(...) after choosing the mode"
            )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, q_lora_rank={self.q_lora_rank}, "
            f"kv_lora_rank={self.kv_lora_rank}, qk_nope_head_dim={self.qk_nope_head_dim}, "
            f"qk_rope_head_dim={self.qk_rope_head_dim}, v_head_dim={self.v_head_dim}, mode={self.mode!r}"
        )
