"""Capturing per-head attention weights without changing what ``forward`` returns.

    with attnlab.record_attention(model) as rec:
        model(x)
    rec.weights[0]   # (batch, heads, q_len, k_len) of the first attention module

Recording switches the recorded modules to the explicit path (the fused kernel never forms
the weights); outside the ``with`` block they run fused again.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from attnlab.attention.kernel import attend, attend_scores


class RecordsAttention:
    """Mixin for attention modules: route attention through :func:`attend` and keep the weights
    of the last forward while a recording is active. ``fused`` picks the kernel path otherwise.
    """

    fused: bool = True
    _recording: bool = False
    last_attention: torch.Tensor | None = None

    def _attend(self, q, k, v, **kwargs) -> torch.Tensor:
        context, weights = attend(
            q, k, v, need_weights=self._recording, fused=self.fused, **kwargs
        )
        if self._recording:
            self.last_attention = weights.detach()
        return context

    def _attend_scores(self, scores, v, **kwargs) -> torch.Tensor:
        """Like ``_attend`` for scores computed by the module itself (:func:`attend_scores`)."""
        context, weights = attend_scores(scores, v, **kwargs)
        if self._recording:
            self.last_attention = weights.detach()
        return context


@dataclass
class Recording:
    """Weights captured per attention module, in the order the modules appear in the model."""

    names: list[str]
    modules: list[nn.Module]

    @property
    def weights(self) -> list[torch.Tensor]:
        missing = [n or "<model>" for n, m in zip(self.names, self.modules) if m.last_attention is None]
        if missing:
            raise RuntimeError(f"no attention recorded yet for {', '.join(missing)}: run a forward pass inside the block")
        return [m.last_attention for m in self.modules]

    @property
    def by_name(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.weights))

    def __len__(self) -> int:
        return len(self.modules)


@contextmanager
def record_attention(model: nn.Module):
    """Record per-head weights of every attention module in ``model`` (see module docstring).

    A module nested inside another recorded module (the wrapper's single heads) is reported
    through its parent, which stacks its children's heads.
    """
    recordable = [(n, m) for n, m in model.named_modules() if isinstance(m, RecordsAttention)]
    if not recordable:
        raise ValueError(f"{type(model).__name__} contains no attention module that can be recorded")
    outer = [
        (n, m) for n, m in recordable
        if not any(n != p and (p == "" or n.startswith(p + ".")) for p, _ in recordable)
    ]
    for _, m in recordable:
        m._recording = True
        m.last_attention = None
    try:
        yield Recording([n for n, _ in outer], [m for _, m in outer])
    finally:
        for _, m in recordable:
            m._recording = False
