"""What the corpus code raises for a bad manifest, item list, shard glob or tool argument."""

from __future__ import annotations

from pydantic import ValidationError

from nota_model.errors import NotaError, validation_problems


class ManifestError(NotaError):
    """A manifest, an item list, a shard glob or a tool argument is invalid or unreadable."""


def explain(err: ValidationError) -> str:
    """A validation error as one line of `field: problem`, never echoing the input values."""
    return validation_problems(err.errors(), whole="manifest")
