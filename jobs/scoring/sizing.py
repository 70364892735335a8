"""Whether an input is worth Ray Data: about how long one core would take to score it, from a sample of
its part files' Parquet footers (row counts and the `task` column's statistics), scaled to all its bytes.

Ray Data costs a fixed start-up (Ray itself, then a few seconds a Dataset execution) and about twice one
process's CPU a row (blocks through the object store, accumulators pickled); it wins where the work
spread over the cluster saves more than that. The per-row costs below come from benchmarks.scoring
(its figures are in benchmarks/README.md, beside the command).
"""

from __future__ import annotations

from typing import Any

import fsspec
import pyarrow.parquet as pq

ASR_ROW_S = 60e-6  # one core's seconds a row: the normalizer and the alignment
CAPTION_ROW_S = 2.5e-3  # PTB tokenizer, CIDEr-D, METEOR; also the cost of a row whose task the footer does not tell
IN_PROCESS_S = 30.0  # inputs one core scores in about this long are scored in the driver process
SAMPLED_FILES = 16


def single_process_seconds(fs: fsspec.AbstractFileSystem, files: dict[str, dict[str, Any]]) -> float:
    """About how long one core would take to score `files` (part file -> its listing with `size`)."""
    paths = sorted(files)
    sample = paths[:: max(1, len(paths) // SAMPLED_FILES)][:SAMPLED_FILES]
    seconds = sum(_footer_seconds(fs, path) for path in sample)
    sampled_bytes = sum(files[path].get("size") or 0 for path in sample)
    total_bytes = sum(info.get("size") or 0 for info in files.values())
    return seconds * (total_bytes / sampled_bytes if sampled_bytes else len(paths) / len(sample))


def _footer_seconds(fs: fsspec.AbstractFileSystem, path: str) -> float:
    with fs.open(path, "rb") as file:
        metadata = pq.ParquetFile(file).metadata
    return sum(group.num_rows * _row_seconds(group) for group in map(metadata.row_group, range(metadata.num_row_groups)))


def _row_seconds(group: pq.RowGroupMetaData) -> float:
    """ASR's cost where the row group holds only tasks other than captioning ("aac"), else captioning's."""
    for column in map(group.column, range(group.num_columns)):
        if column.path_in_schema == "task":
            stats = column.statistics
            if stats is not None and stats.has_min_max and not stats.min <= "aac" <= stats.max:
                return ASR_ROW_S
    return CAPTION_ROW_S
