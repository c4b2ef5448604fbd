"""What a benchmark returns and how it is written: tables, notes and an optional figure, saved as
``<mode>.md`` (+ ``<mode>.png``) headed by the command, the machine, the precision, the torch
version and the date. A leaf: every benchmark imports it, it imports no benchmark."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from attnlab.device import describe_machine


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: first column left-aligned, the others (numbers) right-aligned."""
    lines = ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in [headers, *rows]]
    lines.insert(1, "| " + " | ".join(["---"] + ["---:"] * (len(headers) - 1)) + " |")
    return "\n".join(lines)


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]


@dataclass
class BenchReport:
    """One benchmark mode's result: ``data`` keeps the raw numbers, ``tables`` the formatted ones."""

    mode: str  # file stem in the results folder
    title: str
    tables: list[Table]
    notes: list[str] = field(default_factory=list)  # Markdown lines (targets, conventions)
    figure: Callable[[Path], None] | None = None  # draws the PNG at the given path
    data: list[dict] = field(default_factory=list)


def fmt_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}×"


def to_markdown(report: BenchReport, *, command: str, machine: dict, figure_name: str | None) -> str:
    """The results file: provenance first (so anyone can rerun it), then tables, figure and notes."""
    parts = [
        f"# {report.title}",
        "",
        f"- command: `{command}`",
        f"- machine: {describe_machine(machine)}; {machine['date']}"
        + (f"; load average {', '.join(f'{v:.1f}' for v in os.getloadavg())} when written"
           if hasattr(os, "getloadavg") else ""),
        *([f"- precision: {machine['precision']['dtype']} ({machine['precision']['reason']})"]
          if machine.get("precision") else []),
        "- medians of repeated runs after warm-up; ratios measured side by side in the same process",
    ]
    for table in report.tables:
        parts += ["", f"## {table.title}", "", markdown_table(table.headers, table.rows)]
    if figure_name:
        parts += ["", f"![{report.title}]({figure_name})"]
    if report.notes:
        parts += ["", "## Notes", "", *report.notes]
    return "\n".join(parts) + "\n"


def write_report(report: BenchReport, out_dir, *, command: str, machine: dict) -> list[Path]:
    """Write ``<mode>.md`` and, when matplotlib is installed, ``<mode>.png``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    figure_name = None
    if report.figure is not None:
        try:
            import matplotlib  # noqa: F401  (optional: the viz/bench extras)
        except ImportError:
            report.notes.append("- no figure: matplotlib is not installed (pip install 'attnlab[bench]')")
        else:
            png = out / f"{report.mode}.png"
            report.figure(png)
            written.append(png)
            figure_name = png.name
    md = out / f"{report.mode}.md"
    md.write_text(to_markdown(report, command=command, machine=machine, figure_name=figure_name))
    written.insert(0, md)
    return written
