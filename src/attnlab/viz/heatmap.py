"""Attention heatmaps as PNG: every layer × head in one grid, or one head large with its numbers.

Rows are queries (the token attending, "from"), columns are keys ("to"); each row sums to 1.
Figures are built with ``matplotlib.figure.Figure`` (no pyplot), so nothing global changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from attnlab import _checks
from attnlab.errors import ConfigError, InputTypeError


def attention_stack(tokens, weights) -> np.ndarray:
    """Check tokens + per-layer weights and return one float array (layers, heads, T, T).

    weights: a list with one tensor per layer, each (1, heads, T, T) or (heads, T, T), as
    ``record_attention(...).weights`` gives for a single sequence.
    """
    if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) for t in tokens):
        raise InputTypeError(f"tokens must be a list of str, got {type(tokens).__name__}")
    if len(tokens) == 0:
        raise ConfigError("tokens=[] is not allowed: expected at least one token")
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)) or not weights:
        raise InputTypeError(
            f"weights must be a non-empty list of per-layer tensors (1, heads, T, T), got {type(weights).__name__}"
        )
    layers = []
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise InputTypeError(f"weights[{i}] must be a torch.Tensor, got {type(w).__name__}")
        shape = tuple(w.shape)
        if w.dim() == 4 and w.size(0) == 1:
            w = w[0]
        if w.dim() != 3 or w.shape[-2:] != (len(tokens), len(tokens)):
            raise ConfigError(
                f"weights[{i}] has shape {shape}: expected (1, heads, {len(tokens)}, {len(tokens)}) "
                f"for {len(tokens)} tokens"
            )
        if layers and w.size(0) != layers[0].shape[0]:
            raise ConfigError(
                f"weights[{i}] has {w.size(0)} heads but weights[0] has {layers[0].shape[0]}: "
                "every layer must have the same number of heads"
            )
        layers.append(w.detach().float().cpu().numpy())
    return np.stack(layers)


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ConfigError(
            "PNG output needs matplotlib, which is not installed: run `pip install 'attnlab[viz]'`"
        ) from err
    return Figure


def _short(token: str, width: int = 12) -> str:
    token = token.replace("\n", "\\n")
    return token if len(token) <= width else token[: width - 1] + "…"


def plot_grid(tokens, weights, *, title: str | None = None, first_layer: int = 0):
    """Every layer (rows) × head (columns) as small heatmaps, token labels on the outer edges.
    ``first_layer`` numbers the rows when ``weights`` starts at a later layer (e.g. one layer only).

    All maps are tiles of one image on one Axes (with white gaps), which draws in a fraction of
    the time of one Axes per head.
    """
    stack = attention_stack(tokens, weights)
    n_layers, n_heads, seq, _ = stack.shape
    gap = max(1, round(seq / 6))
    step = seq + gap
    mosaic = np.full((n_layers * step - gap, n_heads * step - gap), np.nan)
    for layer in range(n_layers):
        for head in range(n_heads):
            mosaic[layer * step: layer * step + seq, head * step: head * step + seq] = stack[layer, head]
    cell = min(max(1.0, 0.13 * seq), 4.0)  # inches per map: about 9 pt per token row when it fits
    fontsize = min(7.0, 0.8 * 72 * cell / seq)
    label_room = fontsize / 72 * 0.62 * max(len(_short(t)) for t in tokens) + 0.3
    width, height = cell * mosaic.shape[1] / seq, cell * mosaic.shape[0] / seq
    Figure = _figure_class()
    fig = Figure(figsize=(width + label_room + 1.5, height + label_room + 0.8), layout="constrained")
    ax = fig.subplots()
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(mosaic, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    labels = [_short(t) for t in tokens]
    ax.set_yticks([layer * step + i for layer in range(n_layers) for i in range(seq)], labels * n_layers)
    ax.set_xticks([head * step + j for head in range(n_heads) for j in range(seq)], labels * n_heads, rotation=90)
    ax.tick_params(length=0, labelsize=fontsize, labeltop=False)
    for side in ax.spines.values():
        side.set_visible(False)
    for head in range(n_heads):
        ax.text(head * step + (seq - 1) / 2, -1.0, f"head {head}", ha="center", va="bottom", fontsize=9)
    for layer in range(n_layers):
        ax.text(n_heads * step - gap - 0.2, layer * step + (seq - 1) / 2, f"layer {first_layer + layer}",
                ha="left", va="center", rotation=270, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=min(0.8, 3.0 / n_layers + 0.2), pad=0.03, label="attention weight")
    fig.suptitle(title or "attention: rows attend (from) → columns (to)", fontsize=14)
    return fig


def plot_head(tokens, weights, layer: int, head: int, *, title: str | None = None):
    """One head, large: token labels on both axes, the weights written in the cells when they fit."""
    stack = attention_stack(tokens, weights)
    n_layers, n_heads, seq, _ = stack.shape
    _checks.index("layer", layer, n_layers)
    _checks.index("head", head, n_heads)
    w = stack[layer, head]
    side = max(4.0, 0.42 * seq + 2.0)
    Figure = _figure_class()
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    labels = [_short(t, 16) for t in tokens]
    ax.set_xticks(range(seq), labels, rotation=90)
    ax.set_yticks(range(seq), labels)
    ax.tick_params(length=0, labelsize=9)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending from)")
    if seq <= 24:
        for i in range(seq):
            for j in range(seq):
                ax.text(j, i, f"{w[i, j]:.2f}".lstrip("0"), ha="center", va="center", fontsize=7,
                        color="black" if w[i, j] > 0.6 else "white")
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention weight")
    ax.set_title(title or f"layer {layer} · head {head}")
    return fig


def save_png(fig, path, *, overwrite: bool = False, dpi: int = 110) -> Path:
    """Write a figure to ``path`` (refusing to replace a file unless ``overwrite``)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists: pass overwrite=True (CLI: --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
