"""The errors a user's input can cause, importable without torch (the CLI loads them first)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is out of range or of the wrong type."""


class DataError(RuntimeError):
    """The requested data cannot be found, read or downloaded."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match its architecture."""
