"""Pictures of attention: PNG heatmaps (matplotlib) and a self-contained interactive HTML page."""

from attnlab.viz.heatmap import attention_stack, plot_grid, plot_head, save_png
from attnlab.viz.html import AttentionView, head_view, model_view

__all__ = [
    "attention_stack",
    "plot_grid",
    "plot_head",
    "save_png",
    "AttentionView",
    "head_view",
    "model_view",
]
