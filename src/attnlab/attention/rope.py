"""Rotary position embeddings (RoPE): rotate each pair of query/key features by an angle
proportional to the token's absolute position, so q·k depends only on relative position.

Two conventions pair the features differently; real weights are trained with one of them:
- rotate half (``interleaved=False``): feature i pairs with i + dim/2 (Llama, SmolLM2, HF);
- interleaved (``interleaved=True``): features 2i and 2i+1 form a pair (DeepSeek's reference code).
Pair i turns by ``position * theta ** (-2i / dim)`` in both. Long-context checkpoints stretch
those frequencies (``scaling``, HF's ``rope_parameters``): "linear" divides them all by a factor,
"llama3" (Llama 3.1) slows only the low frequencies and blends the middle band.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnlab import _checks
from attnlab.errors import ConfigError, InputTypeError

ROPE_SCALINGS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x (..., T, dim) by angles whose cos/sin are (..., T, dim // 2), one per feature pair.

    cos/sin broadcast against x without its last dimension; the result has x's dtype and the
    rotation itself is computed in cos's dtype (float32 from :class:`RotaryEmbedding`).
    """
    xf = x.to(cos.dtype)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]  # (..., T, dim/2) each: pairs (2i, 2i+1)
    else:
        x1, x2 = xf.chunk(2, dim=-1)  # pairs (i, i + dim/2)
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    if interleaved:
        out = torch.stack((r1, r2), dim=-1).flatten(-2)  # back to 2i, 2i+1 order
    else:
        out = torch.cat((r1, r2), dim=-1)
    return out.to(x.dtype)


def check_rope_scaling(scaling: dict | None) -> dict | None:
    """None (plain RoPE) or {"rope_type": "linear" | "llama3", and that type's numbers}, checked."""
    if scaling is None:
        return None
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALINGS:
        allowed = ", ".join(repr(k) for k in ROPE_SCALINGS)
        raise ConfigError(f"rope_scaling={scaling!r} is not allowed: expected None or a dict with rope_type {allowed} "
                          "(other RoPE scalings, such as 'yarn' or 'dynamic', are not implemented)")
    missing = [key for key in ROPE_SCALINGS[kind] if key not in scaling]
    if missing:
        raise ConfigError(f"rope_scaling={scaling!r} lacks {', '.join(missing)}: rope_type={kind!r} needs {ROPE_SCALINGS[kind]}")
    checked = {"rope_type": kind, **{key: _checks.positive(f"rope_scaling[{key!r}]", scaling[key])
                                     for key in ROPE_SCALINGS[kind]}}
    if "original_max_position_embeddings" in checked:  # a context length: kept an integer
        checked["original_max_position_embeddings"] = _checks.positive_int(
            "rope_scaling['original_max_position_embeddings']", scaling["original_max_position_embeddings"])
    if kind == "llama3" and not checked["high_freq_factor"] > checked["low_freq_factor"]:
        raise ConfigError(f"rope_scaling={scaling!r}: high_freq_factor must exceed low_freq_factor")
    return checked


def scale_frequencies(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    """RoPE's inverse frequencies (dim/2,) after a checkpoint's scaling (see :func:`check_rope_scaling`)."""
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":  # positions / factor: every pair turns factor times slower
        return inv_freq / factor
    # llama3: wavelengths longer than the original context / low_freq_factor are slowed by factor,
    # those shorter than context / high_freq_factor kept, the band between blended linearly.
    context = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    kept = torch.where(wavelength < context / high, inv_freq, blended)
    return torch.where(wavelength > context / low, inv_freq / factor, kept)


class RotaryEmbedding(nn.Module):
    """Rotary embedding for heads of size ``dim``. The float32 cos/sin tables are computed once
    (for ``max_positions``, or grown when a longer sequence comes) and sliced per call; a model
    computes them once per forward and hands them to every layer (``rotary=`` of the attention
    modules), as DeepSeek's reference code does with ``freqs_cis``. ``scaling``: a long-context
    checkpoint's frequency scaling (:func:`check_rope_scaling`)."""

    def __init__(self, dim: int, theta: float = 10000.0, interleaved: bool = False, max_positions: int = 0,
                 scaling: dict | None = None):
        super().__init__()
        _checks.positive_int("dim", dim)
        if dim % 2 != 0:
            raise ConfigError(f"RoPE dim={dim} is not allowed: rotary embedding needs an even dimension")
        _checks.real("rope_theta", theta, low=1, low_open=True)
        self.dim, self.theta, self.interleaved = dim, float(theta), bool(interleaved)
        self.scaling = check_rope_scaling(scaling)
        # Plain tensors, not buffers: model.to(bfloat16) must not round the angles.
        self._cos = torch.empty(0, dim // 2)
        self._sin = torch.empty(0, dim // 2)
        if max_positions:
            self._build(_checks.positive_int("max_positions", max_positions), torch.device("cpu"))

    def _build(self, size: int, device) -> None:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        inv_freq = scale_frequencies(1.0 / (self.theta ** exponents), self.scaling)  # (dim/2,)
        angles = torch.outer(torch.arange(size, device=device, dtype=torch.float32), inv_freq)  # (size, dim/2)
        self._cos, self._sin = angles.cos(), angles.sin()

    def cos_sin(self, positions: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin for integer positions (T,) → (T, dim/2) or (B, T) → (B, 1, T, dim/2), ready
        to broadcast over heads. ``length`` (1 + the largest position, when the caller knows it) keeps
        the call free of a device-to-host sync; without it the positions are read and checked."""
        if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.dim() not in (1, 2):
            shown = f"{positions.dtype} tensor of shape {tuple(positions.shape)}" if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise InputTypeError(f"positions must be an integer tensor of shape (T,) or (B, T), got {shown}")
        if length is None:
            if positions.numel() and int(positions.min()) < 0:
                raise ConfigError(f"positions must be >= 0, got min {int(positions.min())}")
            length = int(positions.max()) + 1 if positions.numel() else 0
        if length > self._cos.size(0):
            self._build(max(length, 2 * self._cos.size(0), 256), positions.device)
        if self._cos.device != positions.device:
            self._cos, self._sin = self._cos.to(positions.device), self._sin.to(positions.device)
        cos, sin = self._cos[positions], self._sin[positions]
        return (cos.unsqueeze(1), sin.unsqueeze(1)) if positions.dim() == 2 else (cos, sin)

    def rotate(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (B, H, T, dim) rotated by tables from :meth:`cos_sin`; same dtype as x."""
        return apply_rope(x, *rotary, self.interleaved)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Rotate x (B, H, T, dim) at absolute positions (T,) or (B, T); same dtype as x."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.size(-1) != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputTypeError(f"x must be a tensor of shape (B, H, T, dim={self.dim}), got {shape}")
        rotary = self.cos_sin(positions, length)
        if positions.size(-1) != x.size(2) or (positions.dim() == 2 and positions.size(0) not in (1, x.size(0))):
            raise ConfigError(
                f"positions of shape {tuple(positions.shape)} do not match x of shape {tuple(x.shape)}: "
                f"expected (T={x.size(2)},) or (B={x.size(0)}, T={x.size(2)})"
            )
        return self.rotate(x, rotary)

    def extra_repr(self) -> str:
        scaled = "" if self.scaling is None else f", scaling={self.scaling['rope_type']!r}"
        return f"dim={self.dim}, theta={self.theta:g}, interleaved={self.interleaved}{scaled}"


def interleaved_to_half(w, n_heads: int):
    """Q or K projection rows (weight or bias; a torch tensor or numpy array) whose heads pair RoPE
    features (2i, 2i+1), reordered per head so they pair (i, i + dim/2): rotate-half RoPE on these
    rows gives the same attention scores as interleaved RoPE on the originals (llama.cpp stores
    Llama's Q/K in the interleaved order)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pick_pairs(table: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Per-head columns of a cos or sin table from :meth:`RotaryEmbedding.cos_sin`: table (T, n) or
    (B, 1, T, n), pairs (H, P) of pair indices -> (H, T, P) or (B, H, T, P), so each head turns by its
    own subset of the table's frequencies (a model converted to partial RoPE keeps the original ones)."""
    if table.dim() == 4:
        table = table.squeeze(1)  # (B, T, n)
    return table[..., pairs].movedim(-2, -3)  # (..., T, H, P) -> (..., H, T, P)


def default_positions(start: int, length: int, device) -> tuple[torch.Tensor, int]:
    """(positions start..start+length-1, 1 + the last one): what a module attends at when not told."""
    return torch.arange(start, start + length, device=device), start + length
