"""Helpers every benchmark shares: median timing after warm-up, the machine's description, and
Markdown tables, so all results files read and are measured the same way."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import torch


def median_seconds(fn, *, warmup: int = 1, repeats: int = 5, device=None) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.
    On CUDA the device is synchronised around each call so the time covers the kernels."""
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (read from /proc/cpuinfo), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, cores this process may use, torch threads and version, GPU (if any), today's date."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": datetime.date.today().isoformat(),
    }


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: first column left-aligned, the others (numbers) right-aligned."""
    lines = ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in [headers, *rows]]
    lines.insert(1, "| " + " | ".join(["---"] + ["---:"] * (len(headers) - 1)) + " |")
    return "\n".join(lines)
