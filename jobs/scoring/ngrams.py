"""CIDEr-D's document frequencies in a compact, mergeable form, cut into hash ranges.

Each n-gram is kept as a stable 128-bit hash (blake2b of its words; a PTB token holds no space), the
hashes sorted, with their counts: 24 bytes an n-gram, where a dict of word tuples takes some 200, and
the same hash in every process (Python's own `hash` of a string is not). Two n-grams would share a
count only if their hashes collided: about 1e-24 for 10^8 n-grams.

The hash's leading bits name its range (`RANGES` of them). Sorted hashes fall into their ranges in
order, so a table cuts into ranges without a sort, ranges merge independently, and a lookup searches
only the range of each hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from jobs.metrics.captions import Ngram

HASH = np.dtype("S16")  # a fixed 16-byte string: ordered, so np.unique and np.searchsorted apply
COUNT = np.dtype(np.float64)  # pycocoevalcap counts in floats
RANGE_BITS = 6
RANGES = 1 << RANGE_BITS


def hashes(ngrams: Iterable[Ngram]) -> np.ndarray:
    return np.array([hashlib.blake2b(" ".join(ngram).encode(), digest_size=16).digest() for ngram in ngrams], HASH)


def range_of(keys: np.ndarray) -> np.ndarray:
    """Each hash's range: its leading RANGE_BITS bits."""
    return keys.view(np.uint8).reshape(-1, HASH.itemsize)[:, 0] >> (8 - RANGE_BITS)


@dataclass
class NgramCounts:
    """Distinct n-gram hashes, sorted, and each one's count."""

    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, HASH))
    counts: np.ndarray = field(default_factory=lambda: np.empty(0, COUNT))

    @classmethod
    def of(cls, frequencies: dict[Ngram, float]) -> NgramCounts:
        keys, counts = hashes(frequencies), np.fromiter(frequencies.values(), COUNT, len(frequencies))
        order = np.argsort(keys)
        return cls(keys[order], counts[order])

    @classmethod
    def from_bytes(cls, keys: pa.Buffer | bytes, counts: pa.Buffer | bytes) -> NgramCounts:
        """The table `to_bytes` gave, read in place (no copy)."""
        return cls(np.frombuffer(keys, HASH), np.frombuffer(counts, COUNT))

    def to_bytes(self) -> tuple[bytes, bytes]:
        return self.hashes.tobytes(), self.counts.tobytes()

    @staticmethod
    def merged(tables: Sequence[NgramCounts]) -> NgramCounts:
        """The tables' counts added up, n-gram by n-gram."""
        distinct, where = np.unique(np.concatenate([t.hashes for t in tables] or [np.empty(0, HASH)]), return_inverse=True)
        counts = np.bincount(where, weights=np.concatenate([t.counts for t in tables] or [np.empty(0, COUNT)]),
                             minlength=len(distinct))
        return NgramCounts(distinct, counts.astype(COUNT))

    def ranges(self) -> Iterator[tuple[int, NgramCounts]]:
        """The table's non-empty hash ranges, each as a table of its own (views, no copy)."""
        edges = np.searchsorted(range_of(self.hashes), np.arange(RANGES + 1))
        for number, (start, end) in enumerate(zip(edges[:-1], edges[1:])):
            if end > start:
                yield number, NgramCounts(self.hashes[start:end], self.counts[start:end])

    def counts_of(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which of `keys` occur, and the counts of those that do."""
        if not len(self.hashes):
            return np.zeros(len(keys), bool), np.empty(0, COUNT)
        where = np.minimum(np.searchsorted(self.hashes, keys), len(self.hashes) - 1)
        found = self.hashes[where] == keys
        return found, self.counts[where[found]]

    def __len__(self) -> int:
        return len(self.hashes)
