"""Rotary position embeddings (RoPE): rotate each pair of query/key features by an angle
proportional to the token's absolute position, so q·k depends only on relative position.

Two conventions pair the features differently; real weights are trained with one of them:
- rotate half (``interleaved=False``): feature i pairs with i + dim/2 (Llama, SmolLM2, HF);
- interleaved (``interleaved=True``): features 2i and 2i+1 form a pair (DeepSeek's reference code).
Pair i turns by ``position * theta ** (-2i / dim)`` in both.
"""

from __future__ import annotations

import torch
from torch import nn

from attnlab import _checks
from attnlab.errors import ConfigError, InputTypeError


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


class RotaryEmbedding(nn.Module):
    """Rotary embedding for heads of size ``dim``; cos/sin tables are float32, cached and grown
    on demand to the largest position seen."""

    def __init__(self, dim: int, theta: float = 10000.0, interleaved: bool = False):
        super().__init__()
        _checks.positive_int("dim", dim)
        if dim % 2 != 0:
            raise ConfigError(f"RoPE dim={dim} is not allowed: rotary embedding needs an even dimension")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 1.0:
            raise ConfigError(f"rope_theta={theta!r} is not allowed: expected a number > 1")
        self.dim, self.theta, self.interleaved = dim, float(theta), bool(interleaved)
        # Plain tensors, not buffers: model.to(bfloat16) must not round the angles.
        self._cos = torch.empty(0, dim // 2)
        self._sin = torch.empty(0, dim // 2)

    def _grow(self, needed: int, device) -> None:
        size = max(needed, 2 * self._cos.size(0), 256)
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        inv_freq = 1.0 / (self.theta ** exponents)  # (dim/2,)
        t = torch.arange(size, device=device, dtype=torch.float32)
        angles = torch.outer(t, inv_freq)  # (size, dim/2)
        self._cos, self._sin = angles.cos(), angles.sin()

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin for integer positions (T,) or (B, T): (T, dim/2) or (B, T, dim/2)."""
        if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.dim() not in (1, 2):
            shown = f"{positions.dtype} tensor of shape {tuple(positions.shape)}" if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise InputTypeError(f"positions must be an integer tensor of shape (T,) or (B, T), got {shown}")
        if positions.numel() and int(positions.min()) < 0:
            raise ConfigError(f"positions must be >= 0, got min {int(positions.min())}")
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self._cos.size(0) or self._cos.device != positions.device:
            self._grow(needed, positions.device)
        return self._cos[positions], self._sin[positions]

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, H, T, dim) at absolute positions (T,) or (B, T); same dtype as x."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.size(-1) != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputTypeError(f"x must be a tensor of shape (B, H, T, dim={self.dim}), got {shape}")
        cos, sin = self.cos_sin(positions)
        if positions.size(-1) != x.size(2) or (positions.dim() == 2 and positions.size(0) not in (1, x.size(0))):
            raise ConfigError(
                f"positions of shape {tuple(positions.shape)} do not match x of shape {tuple(x.shape)}: "
                f"expected (T={x.size(2)},) or (B={x.size(0)}, T={x.size(2)})"
            )
        if positions.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, dim/2): same for every head
        return apply_rope(x, cos, sin, self.interleaved)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta:g}, interleaved={self.interleaved}"
