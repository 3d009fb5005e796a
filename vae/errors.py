"""Exceptions for user mistakes. Each message names the column, row, key or file at fault."""

from __future__ import annotations


class VAEError(Exception):
    """Base of every error the library raises for a user mistake."""


class ConfigError(VAEError, ValueError):
    """An option has an unknown name or an impossible value."""


class DataError(VAEError, ValueError):
    """A table does not fit the model or the library's assumptions."""


class ModelDirError(VAEError, OSError):
    """A model directory is missing, unfinished or unreadable."""


class TrainingDivergedError(VAEError, RuntimeError):
    """The loss or a gradient stayed non-finite after every rollback."""
