"""Pictures of attention: PNG heatmaps (matplotlib) and a self-contained interactive HTML page."""

from __future__ import annotations

from pathlib import Path

from attnlab.errors import ConfigError
from attnlab.viz.heatmap import attention_stack, plot_grid, plot_head, save_png
from attnlab.viz.html import AttentionView, head_view, model_view

GRID_NAME = "attention_grid.png"
HTML_NAME = "attention.html"


def save_views(tokens, weights, out_dir, *, title: str = "attention", layer: int | None = None,
               head: int | None = None, overwrite: bool = False, prompt_length: int | None = None) -> list[Path]:
    """Write the layer × head PNG grid, the interactive HTML page (growing token by token after
    ``prompt_length`` tokens for a generated text) and, when ``layer`` and ``head`` are given,
    that head's own PNG into ``out_dir``. Checks every target before writing any, so
    an existing file (without ``overwrite``) leaves the folder untouched. Returns the paths."""
    if (layer is None) != (head is None):
        raise ConfigError(f"layer={layer!r}, head={head!r}: give both (one head's PNG) or neither")
    stack = attention_stack(tokens, weights)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir={str(out_dir)!r} is a file: expected a folder for the pictures")
    view = AttentionView(tokens, weights, title=title, layer=layer or 0, heads=None if head is None else [head],
                         prompt_length=prompt_length)
    single = plot_head(tokens, weights, layer, head, title=f"{title} · layer {layer} · head {head}") if layer is not None else None
    targets = [out_dir / GRID_NAME, out_dir / HTML_NAME]
    if single is not None:
        targets.append(out_dir / f"layer{layer}_head{head}.png")
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{', '.join(existing)} already exist(s): pass overwrite=True (CLI: --overwrite) to replace")
    n_layers, n_heads = stack.shape[:2]
    grid = plot_grid(tokens, weights, title=f"{title}: {n_layers} layers × {n_heads} heads, rows attend (from) → columns (to)")
    written = [save_png(grid, targets[0], overwrite=True), view.save(targets[1], overwrite=True)]
    if single is not None:
        written.append(save_png(single, targets[2], overwrite=True))
    return written


__all__ = [
    "attention_stack",
    "plot_grid",
    "plot_head",
    "save_png",
    "save_views",
    "AttentionView",
    "head_view",
    "model_view",
]
