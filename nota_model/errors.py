"""Exceptions raised by nota_model. Each says what went wrong and what to do about it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class NotaError(Exception):
    """Base class of every error nota_model raises on purpose."""


class ConfigError(NotaError):
    """A model config is invalid or names something that cannot be built."""


class WeightsNotFoundError(NotaError):
    """A weights path or URL does not exist or cannot be read."""


class CheckpointError(NotaError):
    """A checkpoint does not fit the model (missing, unexpected or mis-shaped keys) or is unreadable."""


class AudioError(NotaError):
    """An audio input cannot be used. `code` is stable and goes into output rows."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConversionError(NotaError):
    """A weights file cannot be converted: truncated, of another format, or inconsistent after conversion."""


def validation_problems(errors: Iterable[dict[str, Any]], whole: str = "config") -> str:
    """A pydantic ValidationError's `errors()` as one line of `field: problem` (`whole` where the problem is
    the whole document's), never echoing the input values, which may hold credentials."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or whole}: {e['msg']}" for e in errors)
