"""Reports as a list of blocks, rendered twice: Markdown (report.md) and one self-contained HTML page
(inline CSS, images as base64 data: URIs, no scripts, no links), plus the matplotlib helpers of
their plots. ``attnlab compare`` and ``attnlab seq2seq`` write their reports with it.

A block is a tuple: ("h1" | "h2" | "h3", text), ("p", text), ("table", headers, rows),
("img", file name in the report's folder, alt text), ("pre", text) or ("list", items). Prose may
use **bold** and `code`, the only Markdown rendered in HTML.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from attnlab.bench.results import markdown_table


def new_figure(width: float, height: float):
    """A matplotlib Figure (no pyplot, so nothing global changes) with constrained layout."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, path: Path) -> None:
    """PNG at 110 dpi, without the matplotlib version in its metadata (reruns give the same bytes)."""
    fig.savefig(path, dpi=110, metadata={"Software": None})


def _inline_html(text: str) -> str:
    """Escape, then render **bold** and `code` (the only Markdown the report's prose uses)."""
    parts = html.escape(text).split("**")
    text = "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_markdown(blocks: list[tuple]) -> str:
    """The blocks as Markdown; images are links to the PNG files next to the report."""
    lines = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines.append("#" * int(kind[1]) + " " + block[1])
        elif kind == "p":
            lines.append(block[1])
        elif kind == "table":
            lines.append(markdown_table(block[1], block[2]))
        elif kind == "img":
            lines.append(f"![{block[2]}]({block[1]})")
        elif kind == "pre":
            lines.append("```text\n" + block[1].rstrip("\n") + "\n```")
        elif kind == "list":
            lines.append("\n".join(f"- {item}" for item in block[1]))
        lines.append("")
    return "\n".join(lines)


_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330; background: #fafbfc;
       max-width: 1400px; margin: 2em auto; padding: 0 1.2em; }
h1 { font-size: 1.7em; margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #dde2ea; }
h3 { margin: 1.1em 0 .3em; font-size: 1em; }
table { border-collapse: collapse; font-size: 13px; background: white; margin: .6em 0; }
th, td { border: 1px solid #dde2ea; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #eef1f6; } td:first-child, th:first-child { text-align: left; } td:nth-child(2) { white-space: normal; }
tr:nth-child(even) td { background: #f6f8fb; }
.scroll { overflow-x: auto; }
img { max-width: 100%; border: 1px solid #dde2ea; background: white; }
pre { background: #f0f2f6; padding: .7em 1em; white-space: pre-wrap; font-size: 13px; border-radius: 4px; }
code { background: #eef1f6; padding: 0 .25em; border-radius: 3px; }
li { margin: .25em 0; }
"""


def render_html(blocks: list[tuple], folder: Path, title: str) -> str:
    """One self-contained page: inline CSS, images as data: URIs, no scripts and no links."""
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>')
        elif kind == "img":
            data = base64.b64encode((folder / block[1]).read_bytes()).decode("ascii")
            body.append(f'<p><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}"></p>')
        elif kind == "pre":
            body.append(f"<pre>{html.escape(block[1])}</pre>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in block[1]) + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
