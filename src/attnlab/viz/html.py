"""One self-contained interactive HTML page of attention: a head view and a model view.

The page inlines its CSS, JavaScript and data (no CDN, no network), so it works from file://
and inside a Jupyter output cell. Tokens travel as JSON in a ``<script type="application/json">``
block and are drawn with ``textContent``: a token like ``<script>`` is shown, never run.
"""

from __future__ import annotations

import html
import json
import re
from importlib import resources
from pathlib import Path

from attnlab import _checks
from attnlab.errors import ConfigError
from attnlab.viz.heatmap import attention_stack

_VIEWS = ("head", "model")


def _asset(name: str) -> str:
    return resources.files("attnlab.viz").joinpath("assets", name).read_text(encoding="utf-8")


def _script_json(payload) -> str:
    """JSON that cannot end its <script> block early: <, > and & become \\u escapes (valid JSON)."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class AttentionView:
    """Interactive attention views of one sequence; displays inline in Jupyter, saves as HTML.

    tokens: list of str; weights: one tensor per layer, (1, heads, T, T) or (heads, T, T).
    view: which view opens first ("head" or "model"); layer/heads: what the head view shows first.
    prompt_length: for a generated text, how many tokens were the prompt; the page then grows the
    head view one generated token at a time (a step slider and a play button).
    """

    def __init__(self, tokens, weights, *, title: str = "attention", subtitle: str | None = None,
                 view: str = "head", layer: int = 0, heads=None, prompt_length: int | None = None):
        stack = attention_stack(tokens, weights)
        n_layers, n_heads, seq, _ = stack.shape
        if view not in _VIEWS:
            raise ConfigError(f"view={view!r} is not allowed: expected one of {', '.join(map(repr, _VIEWS))}")
        _checks.index("layer", layer, n_layers)
        heads = list(range(n_heads)) if heads is None else list(heads)
        for head in heads:
            _checks.index("heads", head, n_heads)
        if prompt_length is not None and (isinstance(prompt_length, bool) or not isinstance(prompt_length, int)
                                          or not 1 <= prompt_length <= seq):
            raise ConfigError(f"prompt_length={prompt_length!r} is not allowed: expected an integer in 1..{seq}")
        self.prompt_length = prompt_length
        self.tokens = list(tokens)
        self.weights = stack  # (layers, heads, T, T)
        self.title = title
        generated = "" if prompt_length is None else f" ({prompt_length} prompt + {seq - prompt_length} generated)"
        self.subtitle = subtitle or f"{seq} tokens{generated} · {n_layers} layers × {n_heads} heads"
        self.view, self.layer, self.heads = view, layer, heads

    def to_html(self) -> str:
        """The full page as one string."""
        payload = {
            "title": self.title,
            "subtitle": self.subtitle,
            "tokens": self.tokens,
            "weights": self.weights.round(5).tolist(),
            "view": self.view,
            "layer": self.layer,
            "heads": self.heads,
            "prompt_length": self.prompt_length,
        }
        parts = {
            "TITLE": html.escape(self.title),
            "CSS": _asset("viz.css"),
            "JS": _asset("viz.js"),
            "DATA": _script_json(payload),
        }
        # One pass, so text inserted for one placeholder is never searched for another.
        return re.sub(r"\{\{(TITLE|CSS|JS|DATA)\}\}", lambda m: parts[m.group(1)], _asset("page.html"))

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write the page to ``path`` (refusing to replace a file unless ``overwrite``)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} already exists: pass overwrite=True (CLI: --overwrite) to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        # An iframe keeps the page's ids, styles and script apart from the notebook's own.
        height = max(460, 230 + 24 * len(self.tokens))
        return (
            f'<iframe srcdoc="{html.escape(self.to_html(), quote=True)}" '
            f'style="width:100%;height:{height}px;border:1px solid #e5e7eb;border-radius:6px"></iframe>'
        )


def head_view(tokens, weights, *, layer: int = 0, heads=None, title: str = "attention") -> AttentionView:
    """The page opened on the head view: lines from each token to the tokens it attends to."""
    return AttentionView(tokens, weights, title=title, view="head", layer=layer, heads=heads)


def model_view(tokens, weights, *, title: str = "attention") -> AttentionView:
    """The page opened on the model view: every layer × head as a thumbnail heatmap."""
    return AttentionView(tokens, weights, title=title, view="model")
