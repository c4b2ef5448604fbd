"""The one stopwatch: a call timed with the device synchronised around it, and the best or the
median of several such calls after warm-up. Every measurement in attnlab goes through it."""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device) -> None:
    """Wait for queued CUDA work (a no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device=None) -> float:
    """Wall seconds of one ``fn()``, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_seconds(fn, *, warmup: int = 1, repeats: int = 5, device=None) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_call(fn, device) for _ in range(repeats))


def best_seconds(fn, *, repeats: int = 5, warmup: int = 1, device=None, give_up_after: float = float("inf")) -> float:
    """Fastest of ``repeats`` calls after ``warmup`` untimed ones (a ceiling: load only ever slows a
    call down); stops early once a call took longer than ``give_up_after`` seconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        best = min(best, time_call(fn, device))
        if best > give_up_after:
            break
    return best


def best_seconds_alternating(fns: dict, *, rounds: int = 3, repeats: int = 3, warmup: int = 1, device=None,
                             give_up_after: float = float("inf")) -> dict:
    """The fastest call of each of ``fns`` (name -> callable), timed in alternating rounds: a burst of
    load from another process slows one round of each, not every call of one, so it cannot decide a
    ratio between them alone."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], best_seconds(fn, repeats=repeats, warmup=warmup, device=device,
                                                      give_up_after=give_up_after))
    return best
