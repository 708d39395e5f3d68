"""The errors logix raises on purpose; every one is a `LogixError` and names the fix.

Each also derives from the built-in error it replaced (ValueError or RuntimeError), so code that
caught those keeps working.
"""

from __future__ import annotations


class LogixError(Exception):
    """Base of every error logix raises on purpose."""


class ConfigError(LogixError, ValueError):
    """A configuration key or value is not valid."""


class StoreError(LogixError, RuntimeError):
    """A store is missing, damaged, or does not match what it is used with."""


class CaptureError(LogixError, RuntimeError):
    """The training step is not one logix can read per example (it names the fix)."""


class ChoiceError(LogixError, ValueError):
    """An argument is not one of the names logix knows (it lists them)."""
