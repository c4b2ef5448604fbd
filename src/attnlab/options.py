"""Config fields that describe themselves: ``option(default, help, choices=...)`` is a dataclass
field whose metadata carries its meaning and allowed values, so the config checks them and the
CLI builds its flags and help from the same place."""

from __future__ import annotations

import dataclasses

from attnlab import _checks
from attnlab.errors import ConfigError


def option(default, help: str, *, choices=None, flag: bool = True):
    """A dataclass field with a one-line ``help``, optional fixed ``choices`` and whether the CLI offers it."""
    metadata = {"help": help, "choices": None if choices is None else tuple(choices), "flag": flag}
    if isinstance(default, (list, dict, set)):
        raise TypeError("option() defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata=metadata)


def check_choices(config) -> None:
    """Refuse any field whose value is not among its declared choices (a ConfigError naming both)."""
    for f in dataclasses.fields(config):
        allowed = f.metadata.get("choices")
        if allowed is not None:
            _checks.one_of(f.name, getattr(config, f.name), allowed)


def merge(cls, base: dict, overrides: dict | None):
    """``cls(**base, **overrides)``; an override naming no field of ``cls`` is a ConfigError."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}: allowed are {sorted(fields)}")
    return cls(**{**base, **(overrides or {})})
