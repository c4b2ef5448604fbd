"""Argument and input checks shared by every module, so each error reads the same way."""

from __future__ import annotations

import math

import torch

from attnlab.errors import ConfigError, InputTypeError


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} is not allowed: expected a positive integer")
    return value


def non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name}={value!r} is not allowed: expected an integer >= 0")
    return value


def real(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
         high_open: bool = False) -> float:
    """A finite number (never NaN or inf) within [low, high]; ``*_open`` excludes that end."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        raise ConfigError(f"{name}={value!r} is not allowed: expected a finite number{_range(low, high, low_open, high_open)}")
    return float(value)


def _range(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def positive(name: str, value) -> float:
    """A finite number > 0."""
    return real(name, value, low=0, low_open=True)


def non_negative(name: str, value) -> float:
    """A finite number >= 0."""
    return real(name, value, low=0)


def dropout_prob(value, name: str = "dropout") -> float:
    return real(name, value, low=0, high=1, high_open=True)


def index(name: str, value, size: int) -> int:
    """An integer position in 0..size-1 (a layer, a head, a token id)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise ConfigError(f"{name}={value!r} is not allowed: expected an integer in 0..{size - 1}")
    return value


def divisible(name: str, value: int, by_name: str, by_value: int) -> None:
    if value % by_value != 0:
        raise ConfigError(
            f"{name}={value} is not divisible by {by_name}={by_value}: "
            f"{name} must be a multiple of {by_name}"
        )


def one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{name}={value!r} is not allowed: expected one of {shown}")


def input_tensor(x, d_in: int | None, ranks: tuple[int, ...] = (3,), name: str = "x") -> None:
    """Check that x is a floating tensor of an allowed rank whose last dimension is d_in."""
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ranks:
        shapes = " or ".join(
            {2: "(seq, d_in)", 3: "(batch, seq, d_in)"}.get(r, f"rank {r}") for r in ranks
        )
        raise InputTypeError(
            f"{name} has rank {x.dim()} (shape {tuple(x.shape)}): expected {shapes}"
        )
    if not x.is_floating_point():
        raise InputTypeError(
            f"{name} has dtype {x.dtype}: expected a floating dtype (float32, bfloat16, float16, float64)"
        )
    if d_in is not None and x.shape[-1] != d_in:
        raise ConfigError(
            f"{name} has last dimension {x.shape[-1]} (shape {tuple(x.shape)}): expected d_in={d_in}"
        )


def sequence_fits(seq_len: int, context_length: int, name: str = "x") -> None:
    if seq_len > context_length:
        raise ConfigError(
            f"{name} has {seq_len} tokens, more than context_length={context_length}: "
            f"pass at most {context_length} tokens or build the module with a longer context_length"
        )
