"""What a benchmark returns and how it is written: tables, notes and an optional figure, saved as
``<mode>.md`` (+ ``<mode>.png``) headed by the command, the machine, the torch version and the date."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from attnlab.bench.common import machine_info, markdown_table


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
        f"- machine: {machine['cpu']}, {machine['cores']} cores ({machine['threads']} torch threads)"
        + (f", {machine['gpu']}" if machine.get("gpu") else "") + f"; torch {machine['torch']}; {machine['date']}"
        + (f"; load average {', '.join(f'{v:.1f}' for v in os.getloadavg())} when written"
           if hasattr(os, "getloadavg") else ""),
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


MODES = ("peak", "attention", "decode", "moe", "train")
# Sizes small enough for the test suite (seconds), same code paths as the full runs.
QUICK = {
    "peak": dict(size=128, repeats=2),
    "attention": dict(batch=1, seqs=(16,), d_model=32, n_heads=4, repeats=1, warmup=1),
    "decode": dict(contexts=(8, 16), d_model=32, n_heads=4, n_layer=1, vocab_size=16, new_tokens=2,
                   recompute_tokens=1),
    "moe": dict(d_model=32, n_routed_experts=8, n_activated_experts=2, n_shared_experts=1, expert_hidden=16,
                tokens=64, repeats=1),
    "train": dict(overrides=dict(n_layer=1, n_head=2, d_model=32, block_size=16, kv_lora_rank=16,
                                 qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_dense_layers=0),
                  batch_size=2, steps=1, warmup=1),
}
FULL = {
    "peak": dict(size=2048, repeats=5),
    "attention": dict(batch=4, seqs=(512, 2048), d_model=768, n_heads=12, repeats=3, warmup=1),
    "decode": dict(contexts=(256, 1024, 4096), d_model=768, n_heads=12, n_layer=4, vocab_size=256, new_tokens=16,
                   recompute_tokens=3),
    "moe": dict(d_model=512, n_routed_experts=64, n_activated_experts=6, n_shared_experts=2, expert_hidden=256,
                tokens=4096, repeats=5),
    "train": dict(steps=5, warmup=2),
}
COMPILED_PRESETS = ("nanogpt-cpu",)  # torch.compile takes minutes per model on 2 CPU cores


def run_benchmarks(modes, *, out_dir, command: str, quick: bool = False, repeats: int | None = None,
                   device: str = "auto", compile_presets=None, threads: int | None = None,
                   progress=None) -> list[tuple[BenchReport, list[Path]]]:
    """Run the given modes (the peak is always measured first) and write each one's results.

    compile_presets: train presets also timed under torch.compile ("all" for every preset; default
    COMPILED_PRESETS, none with ``quick``). threads: torch CPU threads for the whole run.
    Returns (report, written paths) per mode, in the order run.
    """
    import torch

    from attnlab import _checks
    from attnlab.bench import attention, decode, moe, peak, train

    for mode in modes:
        _checks.one_of("mode", mode, MODES)
    _checks.one_of("device", device, ("auto", "cpu", "cuda"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = {mode: dict(kwargs) for mode, kwargs in (QUICK if quick else FULL).items()}
    if repeats is not None:
        for mode in ("peak", "attention", "moe"):
            sizes[mode]["repeats"] = _checks.positive_int("repeats", repeats)
        sizes["train"]["steps"] = repeats
    if compile_presets is None:
        compile_presets = () if quick else COMPILED_PRESETS
    compiled = tuple(train.PRESETS) if compile_presets == "all" else tuple(compile_presets)
    for name in compiled:
        _checks.one_of("compile preset", name, tuple(train.PRESETS))
    if threads is not None:
        torch.set_num_threads(_checks.positive_int("threads", threads))
    machine = machine_info()
    done = []

    def write(report: BenchReport) -> None:
        done.append((report, write_report(report, out_dir, command=command, machine=machine)))

    if progress:
        progress("peak: matmul GFLOP/s, fp32 and bf16")
    measured = peak.measure_peak(device=device, **sizes["peak"])
    if "peak" in modes:
        write(peak.peak_report(measured, size=sizes["peak"]["size"]))
    if "attention" in modes:
        kw = sizes["attention"]
        rows = attention.run_attention(peak=measured, device=device, progress=progress, **kw)
        checks = attention.fused_mha_op_check() if device == "cpu" else []
        checks += attention.sdpa_bf16_speedup(batch=kw["batch"], seqs=kw["seqs"], d_model=kw["d_model"],
                                              n_heads=kw["n_heads"], device=device)
        write(attention.attention_report(rows, batch=kw["batch"], d_model=kw["d_model"], n_heads=kw["n_heads"],
                                         peak=measured, extra_notes=checks))
    if "decode" in modes:
        kw = sizes["decode"]
        rows = decode.run_decode(device=device, progress=progress, **kw)
        write(decode.decode_report(rows, d_model=kw["d_model"], n_heads=kw["n_heads"], n_layer=kw["n_layer"],
                                   vocab_size=kw["vocab_size"]))
    if "moe" in modes:
        write(moe.moe_report(moe.run_moe(device=device, progress=progress, **sizes["moe"])))
    if "train" in modes:
        kw = sizes["train"]
        rows = train.run_train(peak=measured, device=device, progress=progress, compile_presets=compiled, **kw)
        write(train.train_report(rows, peak=measured))
    return done
