"""Per-head masks on attention outputs: Michel et al.'s ξ_h ("Are Sixteen Heads Really Better than One?", 2019).

An attention module that mixes in :class:`MasksHeads` multiplies head h's output — its context
vectors, before the output projection mixes the heads — by ``head_mask[h]``: 1 keeps the head,
0 removes it, and because ξ_h is a plain multiplier the loss can be differentiated with respect to
it (gradient head importance). With ``head_mean`` set, a removed head is replaced by its mean
output instead of by zeros (mean-ablation): y_h' = ξ_h · y_h + (1 − ξ_h) · mean_h.

Without a mask the forward pass is untouched (no extra operation, the fused kernel as before).
Models set masks for all their layers at once through :class:`HeadMaskMixin`::

    with model.masked_heads(mask):     # mask (n_layer, n_head), or (batch, n_layer, n_head)
        logits, loss = model(idx, targets)

Masks are plain attributes, not buffers: they never enter a state dict or a saved folder.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from attnlab.errors import ConfigError, InputTypeError


class MasksHeads:
    """Mixin for attention modules with ``n_heads`` heads whose outputs are stacked as (B, H, T, D)
    before the output projection; the module calls :meth:`_mask_heads` on them."""

    head_mask: torch.Tensor | None = None  # (H,) or (B, H): ξ_h per head, or per sequence and head
    head_mean: torch.Tensor | None = None  # (H, D): what a removed head outputs instead of zeros
    _head_sums: list | None = None  # while collecting means: [sum over positions (H, D) float64, count]

    def _mask_heads(self, y: torch.Tensor) -> torch.Tensor:
        """y (B, H, T, D) -> the same with every head scaled by its ξ (mean-ablated if means are set)."""
        if self._head_sums is not None:
            self._head_sums[0] = self._head_sums[0] + y.detach().double().sum(dim=(0, 2)).cpu()
            self._head_sums[1] += y.size(0) * y.size(2)
        mask = self.head_mask
        if mask is None:
            return y
        if mask.dim() == 2 and mask.size(0) not in (1, y.size(0)):
            raise ConfigError(f"head mask has {mask.size(0)} rows but the batch has {y.size(0)} sequences: "
                              "give one mask row per sequence, or one mask for all (n_layer, n_head)")
        m = mask.reshape(-1, y.size(1), 1, 1).to(device=y.device, dtype=y.dtype)  # (B or 1, H, 1, 1)
        if self.head_mean is None:
            return y * m
        return y * m + (1 - m) * self.head_mean.to(device=y.device, dtype=y.dtype)[None, :, None, :]


def head_modules(model: nn.Module) -> list[MasksHeads]:
    """The maskable attention modules of ``model`` in forward order (one per layer)."""
    found = [m for m in model.modules() if isinstance(m, MasksHeads)]
    if not found:
        raise ConfigError(f"{type(model).__name__} has no attention module that takes a head mask "
                          "(GroupedQueryAttention and MultiHeadLatentAttention do; the lecture's wrapper does not)")
    return found


def head_grid(model: nn.Module) -> tuple[int, int]:
    """(layers, heads per layer) of ``model``'s maskable attention; every layer must have as many heads."""
    modules = head_modules(model)
    heads = {m.n_heads for m in modules}
    if len(heads) != 1:
        raise ConfigError(f"layers have different head counts {sorted(heads)}: a (layers, heads) mask needs one count")
    return len(modules), heads.pop()


def _check_mask(mask, layers: int, heads: int) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
        shown = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputTypeError(f"head mask must be a floating-point tensor, got {shown}")
    if mask.shape[-2:] != (layers, heads) or mask.dim() not in (2, 3):
        raise ConfigError(f"head mask has shape {tuple(mask.shape)}: expected ({layers}, {heads}) "
                          f"(layers, heads) or (batch, {layers}, {heads})")
    if not bool(torch.isfinite(mask.detach()).all()):
        raise ConfigError("head mask holds nan or inf: expected finite multipliers (1 keeps a head, 0 removes it)")
    return mask


def _check_means(means, modules: list[MasksHeads]) -> list[torch.Tensor | None]:
    if means is None:
        return [None] * len(modules)
    if len(means) != len(modules):
        raise ConfigError(f"head means cover {len(means)} layers: expected one (heads, head_dim) tensor per layer, "
                          f"{len(modules)}")
    for i, (mean, module) in enumerate(zip(means, modules)):
        width = getattr(module, "v_head_dim", None) or module.head_dim  # what each head outputs (MLA: v_head_dim)
        if not isinstance(mean, torch.Tensor) or tuple(mean.shape) != (module.n_heads, width):
            shown = tuple(mean.shape) if isinstance(mean, torch.Tensor) else type(mean).__name__
            raise ConfigError(f"head means[{i}] is {shown}: expected ({module.n_heads}, {width}) (heads, head output dims)")
    return list(means)


def set_head_mask(model: nn.Module, mask: torch.Tensor | None, means=None) -> None:
    """Mask every layer's heads: ``mask`` (layers, heads) or (batch, layers, heads); None removes
    every mask (``means`` are then ignored). ``means``: per layer a (heads, head_dim) tensor (:func:`collect_head_means`) that a
    masked head outputs instead of zeros. Views of ``mask`` are kept, so gradients reach it."""
    modules = head_modules(model)
    if mask is None:
        for module in modules:
            module.head_mask, module.head_mean = None, None
        return
    layers, heads = head_grid(model)
    mask = _check_mask(mask, layers, heads)
    per_layer = mask.unbind(-2)  # layers × ((heads,) or (batch, heads))
    for module, layer_mask, mean in zip(modules, per_layer, _check_means(means, modules)):
        module.head_mask = layer_mask
        module.head_mean = mean


@dataclass
class HeadMeans:
    """Each layer's mean head outputs over the positions seen while collecting (:func:`collect_head_means`).
    ``sums`` are the modules' running [sum (heads, head_dim), count] lists, filled in place."""

    sums: list[list]

    @property
    def means(self) -> list[torch.Tensor]:
        """Per layer (heads, head_dim), float32."""
        if any(count == 0 for _, count in self.sums):
            raise RuntimeError("no head outputs collected: run a forward pass inside the block")
        return [(total / count).float() for total, count in self.sums]


@contextmanager
def collect_head_means(model: nn.Module):
    """Average every head's output over all sequences and positions of the forward passes run
    inside the block: ``with collect_head_means(model) as rec: model(x)``, then ``rec.means``."""
    modules = head_modules(model)
    collected = HeadMeans([[torch.zeros((), dtype=torch.float64), 0] for _ in modules])
    for module, sums in zip(modules, collected.sums):
        module._head_sums = sums
    try:
        yield collected
    finally:
        for module in modules:
            module._head_sums = None


class HeadMaskMixin:
    """For models: set one (layers, heads) mask on every attention layer at once."""

    def head_grid(self) -> tuple[int, int]:
        """(layers, heads per layer) a head mask must have."""
        return head_grid(self)

    def set_head_mask(self, mask: torch.Tensor | None, means=None) -> None:
        """See :func:`set_head_mask`; None removes every mask."""
        set_head_mask(self, mask, means)

    @contextmanager
    def masked_heads(self, mask: torch.Tensor, means=None):
        """The model with ``mask`` (and mean-ablation ``means``) set inside the block, unmasked after."""
        set_head_mask(self, mask, means)
        try:
            yield self
        finally:
            set_head_mask(self, None)
