"""CIDEr-D's document frequencies in a compact, mergeable form.

Each n-gram is kept as a stable 128-bit hash (blake2b of its words; a PTB token holds no space), the
hashes sorted, with their counts: 24 bytes an n-gram, where a dict of word tuples takes some 200, and
the same hash in every process (Python's own `hash` of a string is not). A block's scorer looks up
only the n-grams its items hold and hands pycocoevalcap those counts, as a dict like its own. Two
n-grams would share a count only if their hashes collided: about 1e-24 for 10^8 n-grams.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

HASH = np.dtype("S16")  # a fixed 16-byte string: ordered, so np.unique and np.searchsorted apply

Ngram = tuple[str, ...]


def hashes(ngrams: Iterable[Ngram]) -> np.ndarray:
    return np.array([hashlib.blake2b(" ".join(ngram).encode(), digest_size=16).digest() for ngram in ngrams], HASH)


@dataclass
class NgramCounts:
    """Distinct n-gram hashes, sorted, and each one's count."""

    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, HASH))
    counts: np.ndarray = field(default_factory=lambda: np.empty(0))

    @classmethod
    def of(cls, frequencies: dict[Ngram, float]) -> NgramCounts:
        keys, counts = hashes(frequencies), np.fromiter(frequencies.values(), float, len(frequencies))
        order = np.argsort(keys)
        return cls(keys[order], counts[order])

    def merge(self, other: NgramCounts) -> NgramCounts:
        distinct, where = np.unique(np.concatenate([self.hashes, other.hashes]), return_inverse=True)
        counts = np.bincount(where, weights=np.concatenate([self.counts, other.counts]), minlength=len(distinct))
        return NgramCounts(distinct, counts)

    def lookup(self, ngrams: Iterable[Ngram]) -> dict[Ngram, float]:
        """The counts of those of `ngrams` that occur (the others count 0, as in pycocoevalcap)."""
        ngrams = list(ngrams)
        wanted = hashes(ngrams)
        where = np.minimum(np.searchsorted(self.hashes, wanted), max(len(self.hashes) - 1, 0))
        found = self.hashes[where] == wanted if len(self.hashes) else np.zeros(len(ngrams), bool)
        return {ngram: float(self.counts[i]) for ngram, i, hit in zip(ngrams, where, found) if hit}

    def __len__(self) -> int:
        return len(self.hashes)
