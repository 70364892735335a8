"""CIDEr-D's document frequencies over all of a group's references: counted per block, merged per hash
range, looked up per block.

1. `frequency_parts`: per block, each captioning group's document frequencies (pycocoevalcap's, over
   the block's items), one row per hash range (PARTS_SCHEMA);
2. `merge_parts`: the rows of one group and range added up into one: on the cluster a Ray Data groupby,
   so no process holds more than one range of one group, and the driver none;
3. `DocumentFrequencies`: the merged rows read in place, looked up range by range. On the cluster the
   merged rows stay in the object store, where the scorers of a node share them without a copy.

In one process, `CountedFrequencies` counts each block's n-grams into one Counter a group instead: no hashing, which is
most of the parts' cost, for several times their memory (the in-process path takes inputs whose
frequencies fit: sizing.py).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa

from jobs.metrics.captions import Ngram, document_frequency
from jobs.scoring.item_table import GROUP_KEYS, captioned
from jobs.scoring.ngrams import NgramCounts, hashes, range_of
from jobs.scoring.totals import split

RANGE_KEYS = [*GROUP_KEYS, "range"]
PARTS_SCHEMA = pa.schema(
    [pa.field(key, pa.string(), nullable=False) for key in GROUP_KEYS]
    + [
        pa.field("range", pa.int32(), nullable=False),  # the n-gram hashes' leading bits (ngrams.range_of)
        pa.field("hashes", pa.large_binary(), nullable=False),  # sorted 16-byte hashes, end to end
        pa.field("counts", pa.large_binary(), nullable=False),  # their counts, float64
    ]
)


def frequency_parts(items: pa.Table) -> pa.Table:
    """The document frequencies of the block's captioned items, by group and hash range."""
    rows = []
    for key, group in split(captioned(items), list(GROUP_KEYS)).items():
        counts = NgramCounts.of(document_frequency(dict(enumerate(group["caption_refs"].to_pylist()))))
        rows += [_row(key, number, part) for number, part in counts.ranges()]
    return pa.Table.from_pylist(rows, schema=PARTS_SCHEMA)


def merge_parts(parts: pa.Table) -> pa.Table:
    """Rows of one group and range, added up into one row."""
    key = tuple(parts[name][0].as_py() for name in GROUP_KEYS)
    merged = NgramCounts.merged(list(_tables(parts)))
    return pa.Table.from_pylist([_row(key, parts["range"][0].as_py(), merged)], schema=PARTS_SCHEMA)


class DocumentFrequencies:
    """Merged parts (one row per group and range), looked up in place."""

    def __init__(self, tables: Iterable[pa.Table]):
        self.ranges: dict[tuple[str, ...], dict[int, NgramCounts]] = defaultdict(dict)
        for table in tables:
            for key, number, counts in zip(_group_keys(table), table["range"].to_pylist(), _tables(table)):
                self.ranges[key][number] = counts

    def lookup(self, key: tuple[str, ...], ngrams: Iterable[Ngram]) -> Counter:
        """The counts of those of `ngrams` that occur in the group's references (the others count 0, as in
        pycocoevalcap)."""
        ngrams = list(set(ngrams))
        keys = hashes(ngrams)
        numbers = range_of(keys)
        found = {}
        for number in np.unique(numbers):
            chosen = np.flatnonzero(numbers == number)
            hit, counts = self.ranges[key].get(int(number), NgramCounts()).counts_of(keys[chosen])
            found.update(zip((ngrams[i] for i in chosen[hit]), counts.tolist()))
        return Counter(found)

    def __len__(self) -> int:
        return sum(len(part) for parts in self.ranges.values() for part in parts.values())


class CountedFrequencies:
    """Each captioning group's document frequencies as pycocoevalcap's dict (n-gram -> count), added up
    block by block in this process; looked up as DocumentFrequencies."""

    def __init__(self):
        self.groups: dict[tuple[str, ...], Counter] = defaultdict(Counter)

    def add(self, items: pa.Table) -> None:
        """Count the references of a block's captioned items."""
        for key, group in split(captioned(items), list(GROUP_KEYS)).items():
            document_frequency(dict(enumerate(group["caption_refs"].to_pylist())), self.groups[key])

    def lookup(self, key: tuple[str, ...], ngrams: Iterable[Ngram]) -> Counter:
        """All the group's counts, whichever `ngrams` are asked for: no copy a block."""
        return self.groups[key]


def _row(key: tuple[str, ...], number: int, counts: NgramCounts) -> dict:
    keys, values = counts.to_bytes()
    return {**dict(zip(GROUP_KEYS, key)), "range": number, "hashes": keys, "counts": values}


def _tables(parts: pa.Table) -> Iterator[NgramCounts]:
    """Each row's table, read in place."""
    for keys, counts in zip(_values(parts["hashes"]), _values(parts["counts"])):
        yield NgramCounts.from_bytes(keys, counts)


def _values(column: pa.ChunkedArray) -> Iterator[pa.Buffer]:
    """Each value of a large_binary column as a view of its bytes (a scalar's `as_buffer` copies them)."""
    for chunk in column.chunks:
        offsets = np.frombuffer(chunk.buffers()[1], np.int64)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = chunk.buffers()[2] or pa.py_buffer(b"")
        for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
            yield data.slice(start, end - start)


def _group_keys(table: pa.Table) -> list[tuple[str, ...]]:
    return list(zip(*(table[name].to_pylist() for name in GROUP_KEYS)))
