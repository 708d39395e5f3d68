"""The version of logix, at the base so that every stage can record it."""

__version__ = "0.1.0"
