"""The one timer of the benchmarks: median wall time after warm-up, synchronised on CUDA."""

from __future__ import annotations

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
