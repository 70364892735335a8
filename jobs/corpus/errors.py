"""What the corpus code raises for a bad manifest, item list, shard glob or tool argument."""

from __future__ import annotations

from pydantic import ValidationError

from nota_model.errors import NotaError


class ManifestError(NotaError):
    """A manifest, an item list, a shard glob or a tool argument is invalid or unreadable."""


def explain(err: ValidationError) -> str:
    """A validation error as one line of `field: problem`, never echoing the input values."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in err.errors())
