"""Preallocated per-layer caches for decoding: keys/values of past tokens are written once and
read back at every later step, so a new token costs one projection instead of a full recompute.

- :class:`KVCache`: per-head K and V, (B, Hkv, max_len, dim) — MHA, GQA, MQA and naive MLA;
- :class:`LatentKVCache`: MLA's absorbed layout, per token only the normalised latent c_kv
  (kv_lora_rank) and the RoPE key k_pe shared by all heads (qk_rope_head_dim).

``bytes_per_token()`` is the memory one token of one sequence takes in one layer (DeepSeek-V2
Table 1, from :func:`kv_elements_per_token` / :func:`latent_elements_per_token`, the one place
those counts are written); ``bytes()`` is measured on the cache's own tensors: what their filled
part holds.
"""

from __future__ import annotations

import torch

from attnlab import _checks
from attnlab.errors import ConfigError, InputTypeError


def kv_elements_per_token(n_kv_heads: int, k_dim: int, v_dim: int | None = None) -> int:
    """Numbers a per-head K/V cache holds per token and layer: 2·n_h·d_h (MHA), 2·n_g·d_h (GQA),
    2·d_h (MQA), n_h·(d_h + d_h^R + d_v) (naive MLA, whose keys carry the RoPE part)."""
    return n_kv_heads * (k_dim + (k_dim if v_dim is None else v_dim))


def latent_elements_per_token(kv_lora_rank: int, qk_rope_head_dim: int) -> int:
    """Numbers MLA's absorbed cache holds per token and layer: d_c + d_h^R (576 at DeepSeek-V3's dims)."""
    return kv_lora_rank + qk_rope_head_dim


class _Cache:
    """Bookkeeping shared by both layouts: capacity, length, byte counts and input checks."""

    def __init__(self, batch_size: int, max_len: int, dtype, device):
        _checks.positive_int("batch_size", batch_size)
        _checks.positive_int("max_len", max_len)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise InputTypeError(f"dtype={dtype!r} is not allowed: expected a floating torch.dtype")
        self.batch_size, self.max_len = batch_size, max_len
        self.dtype = dtype
        self.device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as tensors report it
        self.length = 0

    def reset(self) -> None:
        """Forget every cached token (the memory stays allocated for the next sequence)."""
        self.length = 0

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` cached tokens and forget the newer ones (speculative decoding
        drops the keys and values of draft tokens the model did not accept)."""
        _checks.non_negative_int("length", length)
        if length > self.length:
            raise ConfigError(f"truncate(length={length}) is not allowed: the cache holds {self.length} tokens")
        self.length = length

    def bytes(self) -> int:
        """Bytes the filled positions of every sequence hold, measured on the cache's tensors."""
        return sum(t.nbytes for t in self.filled())

    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence takes (elements_per_token() of the subclass * element size)."""
        return self.elements_per_token() * self.dtype.itemsize

    def _check(self, name: str, t, shape: tuple[int | None, ...], names: tuple[str, ...]) -> int:
        """Check one incoming tensor against the cache; returns its number of new tokens."""
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            expected = "(" + ", ".join(n if s is None else f"{n}={s}" for n, s in zip(names, shape)) + ")"
            raise ConfigError(
                f"{name} has shape {tuple(t.shape)} but this {type(self).__name__} holds {expected}: "
                f"build a cache for this batch size and attention shape"
            )
        if t.dtype != self.dtype:
            raise InputTypeError(f"{name} has dtype {t.dtype} but this {type(self).__name__} holds {self.dtype}")
        if t.device != self.device:
            raise InputTypeError(f"{name} is on device {t.device} but this {type(self).__name__} is on {self.device}")
        return t.size(-2)

    def _advance(self, t_new: int) -> tuple[int, int]:
        start, end = self.length, self.length + t_new
        if end > self.max_len:
            raise ConfigError(
                f"{type(self).__name__} overflow: length={self.length} + T_new={t_new} > max_len={self.max_len}: "
                f"build the cache with a larger max_len or reset() it"
            )
        self.length = end
        return start, end


class KVCache(_Cache):
    """Per-head keys (B, Hkv, max_len, k_dim) and values (B, Hkv, max_len, v_dim) of one layer."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, k_dim: int, v_dim: int | None = None,
                 *, dtype=torch.float32, device="cpu"):
        super().__init__(batch_size, max_len, dtype, device)
        _checks.positive_int("n_kv_heads", n_kv_heads)
        _checks.positive_int("k_dim", k_dim)
        v_dim = k_dim if v_dim is None else _checks.positive_int("v_dim", v_dim)
        self.n_kv_heads, self.k_dim, self.v_dim = n_kv_heads, k_dim, v_dim
        self.k = torch.zeros(batch_size, n_kv_heads, max_len, k_dim, dtype=dtype, device=self.device)
        self.v = torch.zeros(batch_size, n_kv_heads, max_len, v_dim, dtype=dtype, device=self.device)

    def elements_per_token(self) -> int:
        """K and V numbers per token (:func:`kv_elements_per_token`)."""
        return kv_elements_per_token(self.n_kv_heads, self.k_dim, self.v_dim)

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values so far, (B, Hkv, length, dim) each."""
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k (B, Hkv, T_new, k_dim) and v (B, Hkv, T_new, v_dim); return all cached
        keys and values as views (B, Hkv, length, dim)."""
        names = ("B", "Hkv", "T_new")
        t_k = self._check("k", k, (self.batch_size, self.n_kv_heads, None, self.k_dim), names + ("k_dim",))
        t_v = self._check("v", v, (self.batch_size, self.n_kv_heads, None, self.v_dim), names + ("v_dim",))
        if t_k != t_v:
            raise ConfigError(f"k has T_new={t_k} tokens but v has {t_v}: pass the same tokens to both")
        start, end = self._advance(t_k)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def __repr__(self) -> str:
        return (f"KVCache(batch_size={self.batch_size}, n_kv_heads={self.n_kv_heads}, length={self.length}, "
                f"max_len={self.max_len}, k_dim={self.k_dim}, v_dim={self.v_dim}, dtype={self.dtype})")


class LatentKVCache(_Cache):
    """MLA's absorbed-mode cache of one layer: c_kv (B, max_len, kv_lora_rank) and the shared
    RoPE key k_pe (B, max_len, qk_rope_head_dim) — no per-head tensors at all."""

    def __init__(self, batch_size: int, max_len: int, kv_lora_rank: int, qk_rope_head_dim: int,
                 *, dtype=torch.float32, device="cpu"):
        super().__init__(batch_size, max_len, dtype, device)
        _checks.positive_int("kv_lora_rank", kv_lora_rank)
        _checks.positive_int("qk_rope_head_dim", qk_rope_head_dim)
        self.kv_lora_rank, self.qk_rope_head_dim = kv_lora_rank, qk_rope_head_dim
        self.c_kv = torch.zeros(batch_size, max_len, kv_lora_rank, dtype=dtype, device=self.device)
        self.k_pe = torch.zeros(batch_size, max_len, qk_rope_head_dim, dtype=dtype, device=self.device)

    def elements_per_token(self) -> int:
        """d_c + d_h^R numbers per token (:func:`latent_elements_per_token`)."""
        return latent_elements_per_token(self.kv_lora_rank, self.qk_rope_head_dim)

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached latents and RoPE keys so far, (B, length, dim) each."""
        return self.c_kv[:, :self.length], self.k_pe[:, :self.length]

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append c_kv (B, T_new, kv_lora_rank) and k_pe (B, T_new, qk_rope_head_dim); return all
        cached entries as views (B, length, dim)."""
        t_c = self._check("c_kv", c_kv, (self.batch_size, None, self.kv_lora_rank), ("B", "T_new", "kv_lora_rank"))
        t_pe = self._check("k_pe", k_pe, (self.batch_size, None, self.qk_rope_head_dim),
                           ("B", "T_new", "qk_rope_head_dim"))
        if t_c != t_pe:
            raise ConfigError(f"c_kv has T_new={t_c} tokens but k_pe has {t_pe}: pass the same tokens to both")
        start, end = self._advance(t_c)
        self.c_kv[:, start:end] = c_kv
        self.k_pe[:, start:end] = k_pe
        return self.c_kv[:, :end], self.k_pe[:, :end]

    def __repr__(self) -> str:
        return (f"LatentKVCache(batch_size={self.batch_size}, length={self.length}, max_len={self.max_len}, "
                f"kv_lora_rank={self.kv_lora_rank}, qk_rope_head_dim={self.qk_rope_head_dim}, dtype={self.dtype})")
