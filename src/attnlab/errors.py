"""Errors a user can cause. The CLI prints these in one line and exits 2; anything else is a bug."""


class UserError(Exception):
    """Marker for mistakes in configs, inputs, files or flags (not bugs in attnlab)."""


class ConfigError(UserError, ValueError):
    """A value is outside what is allowed; the message names the argument, its value and the rule."""


class InputTypeError(UserError, TypeError):
    """An input has the wrong type, rank or dtype."""
