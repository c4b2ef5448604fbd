"""DeepSeek's multi-head latent attention (MLA, DeepSeek-V2 §2.1; DeepSeek-V3 §2.1.1).

Keys and values are rebuilt from one small latent per token, ``c_kv = RMSNorm(W_DKV x)`` of size
``kv_lora_rank``; positions enter through a separate RoPE part (``qk_rope_head_dim``) whose key
``k_pe`` is shared by all heads (``rope_heads`` > 1 gives each group of query heads its own, as a
model converted from GQA needs; ``rope_pairs`` turns those dims by chosen frequencies of a wider
rotary table, the source model's). Two modes give the same outputs:

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
from attnlab.attention.rope import RotaryEmbedding, apply_rope, default_positions, pick_pairs
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
    the cache that fits the current mode. ``rope_heads``: RoPE keys per token (1: DeepSeek's shared
    k_pe; n_heads must be a multiple). ``rope_pairs``: for each RoPE key head, the frequency pairs of
    a ``rope_table_dim``-wide rotary table its qk_rope_head_dim / 2 pairs turn by (None: pairs
    0.. of a qk_rope_head_dim-wide table). ``kv_norm=False`` drops the latent's RMSNorm, which a
    converted model needs to reproduce its source exactly.
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
        rope_heads: int = 1,
        rope_pairs: list[list[int]] | None = None,
        rope_table_dim: int | None = None,
        kv_norm: bool = True,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("kv_lora_rank", kv_lora_rank),
                            ("qk_rope_head_dim", qk_rope_head_dim), ("v_head_dim", v_head_dim),
                            ("rope_heads", rope_heads)):
            _checks.positive_int(name, value)
        _checks.non_negative_int("q_lora_rank", q_lora_rank)
        _checks.non_negative_int("qk_nope_head_dim", qk_nope_head_dim)  # 0: every query/key dim is rotated
        _checks.divisible("n_heads", n_heads, "rope_heads", rope_heads)
        if qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim={qk_rope_head_dim} is odd: RoPE rotates pairs of dimensions "
                              f"(qk_nope_head_dim={qk_nope_head_dim} can be anything)")
        _checks.positive("norm_eps", norm_eps)
        self.d_model, self.n_heads, self.q_lora_rank, self.kv_lora_rank = d_model, n_heads, q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.rope_heads = rope_heads
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
        # One down-projection gives the latent c_kv and the RoPE key(s) k_pe together.
        self.wkv_a = nn.Linear(d_model, kv_lora_rank + rope_heads * qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, eps=norm_eps) if kv_norm else nn.Identity()
        # Up-projection of the latent into per-head [k_nope | v]: rows are head-major.
        self.wkv_b = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(n_heads * v_head_dim, d_model, bias=False)
        table_dim = qk_rope_head_dim if rope_pairs is None else _checks.positive_int("rope_table_dim", rope_table_dim)
        self.rope = RotaryEmbedding(table_dim, theta=rope_theta, interleaved=self.rope_interleave)
        self.rope_pairs = None if rope_pairs is None else check_rope_pairs(rope_pairs, rope_heads, qk_rope_head_dim,
                                                                           table_dim)
        if self.rope_pairs is not None:  # not saved: rebuilt from the config
            k_pairs = torch.tensor(self.rope_pairs, dtype=torch.long)  # (rope_heads, dr / 2)
            self.register_buffer("_k_pairs", k_pairs, persistent=False)
            self.register_buffer("_q_pairs", k_pairs.repeat_interleave(n_heads // rope_heads, dim=0), persistent=False)
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
        return latent_elements_per_token(self.kv_lora_rank, self.rope_heads * self.qk_rope_head_dim)

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
        return LatentKVCache(  # rope_heads keys side by side in k_pe
            batch_size, max_len, self.kv_lora_rank, self.rope_heads * self.qk_rope_head_dim, dtype=dtype, device=device
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
        q_pe = self._rotate(q_pe, rotary, "_q_pairs")  # (B, H, T, dr)
        c_kv, k_pe = self.wkv_a(x).split([r, self.rope_heads * dr], dim=-1)  # (B, T, r), (B, T, Hr * dr)
        c_kv = self.kv_norm(c_kv)
        k_pe = k_pe.view(B, T, self.rope_heads, dr).transpose(1, 2)  # (B, Hr, T, dr)
        k_pe = self._rotate(k_pe, rotary, "_k_pairs")  # one RoPE key per group of H / Hr heads

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

    def _rotate(self, x: torch.Tensor, rotary, pairs: str) -> torch.Tensor:
        """RoPE on x (B, Hx, T, dr): the table's first dr / 2 pairs, or each head's chosen pairs."""
        if self.rope_pairs is None:
            return self.rope.rotate(x, rotary)
        index = getattr(self, pairs)  # (Hx, dr / 2)
        return apply_rope(x, pick_pairs(rotary[0], index), pick_pairs(rotary[1], index), self.rope_interleave)

    def _naive(self, q_nope, q_pe, c_kv, k_pe, cache, kw) -> torch.Tensor:
        """Up-project the latent into per-head keys and values; plain MHA over them."""
        B, T, _ = c_kv.shape
        H, dn = self.n_heads, self.qk_nope_head_dim
        kv = self.wkv_b(c_kv).view(B, T, H, dn + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([dn, self.v_head_dim], dim=-1)  # (B, H, T, dn), (B, H, T, dv)
        k_pe = k_pe.expand(-1, H, -1, -1) if self.rope_heads == 1 else k_pe.repeat_interleave(H // self.rope_heads, 1)
        k = torch.cat([k_nope, k_pe], dim=-1)  # (B, H, T, dn + dr)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, H, T, dn + dr)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, H, T_total, ·)
        return self._attend(q, k, v, **kw)  # (B, H, T, dv)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, cache, kw) -> torch.Tensor:
        """Attend over the latent: q_nope·W_UK scores against c_kv, then W_UV maps back per head.

        This is MQA with one key head [c_kv | k_pe] (dim r + dr) and one value head c_kv (dim r);
        with rope_heads > 1 it is GQA whose Hr key heads share c_kv and differ in k_pe.
        """
        dn = self.qk_nope_head_dim
        w = self.wkv_b.weight.view(self.n_heads, dn + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, :dn], w[:, dn:]  # (H, dn, r), (H, dv, r)
        q_latent = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # (B, H, T, r)
        B, Hr, T, dr = k_pe.shape
        k_pe = k_pe.transpose(1, 2).reshape(B, T, Hr * dr)  # (B, T, Hr * dr): the cached layout
        if cache is not None:
            c_kv, k_pe = cache.update(c_kv, k_pe)  # (B, T_total, r), (B, T_total, Hr * dr)
        k_pe = k_pe.view(B, -1, Hr, dr).transpose(1, 2)  # (B, Hr, T_total, dr)
        latent = c_kv.unsqueeze(1).expand(-1, Hr, -1, -1)  # (B, Hr, T_total, r), no copy
        q = torch.cat([q_latent, q_pe], dim=-1)  # (B, H, T, r + dr)
        k = torch.cat([latent, k_pe], dim=-1)  # (B, Hr, T_total, r + dr)
        context = self._attend(q, k, latent, **kw)  # (B, H, T, r)
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
            f"qk_rope_head_dim={self.qk_rope_head_dim}, v_head_dim={self.v_head_dim}, rope_heads={self.rope_heads}, "
            f"mode={self.mode!r}"
        )


def check_rope_pairs(rope_pairs, rope_heads: int, qk_rope_head_dim: int, table_dim: int) -> list[list[int]]:
    """rope_pairs as lists of ints: one per RoPE key head, each qk_rope_head_dim / 2 distinct pair
    indices of a table_dim-wide rotary table (0 .. table_dim / 2 - 1)."""
    n_pairs, size = qk_rope_head_dim // 2, table_dim // 2
    shape_ok = isinstance(rope_pairs, (list, tuple)) and len(rope_pairs) == rope_heads and all(
        isinstance(h, (list, tuple)) and len(h) == n_pairs for h in rope_pairs)
    if not shape_ok:
        raise ConfigError(f"rope_pairs={rope_pairs!r} is not allowed: expected rope_heads={rope_heads} lists of "
                          f"qk_rope_head_dim / 2 = {n_pairs} pair indices")
    pairs = [[int(i) for i in head] for head in rope_pairs]
    for head, given in zip(pairs, rope_pairs):
        if any(isinstance(i, bool) or int(i) != i for i in given) or len(set(head)) != len(head) or not all(
                0 <= i < size for i in head):
            raise ConfigError(f"rope_pairs has {list(given)!r}: expected {n_pairs} distinct integers in 0..{size - 1} "
                              f"(pairs of a rotary table {table_dim} wide)")
    return pairs
