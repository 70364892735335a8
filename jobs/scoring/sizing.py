"""Whether to score an input on Ray Data or in this process, from its work: its rows and tasks, read from a
sample of its part files' Parquet footers (row counts and the `task` column's statistics) and scaled to all
its bytes.

Ray Data costs a fixed start-up (Ray itself, a few seconds a Dataset execution, for captions the document
frequencies' shuffle and a METEOR JVM a caption actor) and more CPU a row than one process (blocks through
the object store, accumulators pickled); spread over the cluster's CPUs, it wins where that saves more
than its start-up. On a cluster of few CPUs it never does. The in-process path keeps each captioned
item and its document frequencies until the end, so Ray Data also takes an input whose captions would
not fit in the memory this process may use; speech recognition rows it does not keep. The per-row
figures come from benchmarks.scoring (measured in benchmarks/README.md, beside the command).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.parquet as pq

# one core's seconds a row, in one process and on Ray Data
ASR_ROW_S = 60e-6  # the normalizer and the alignment
CAPTION_ROW_S = 2.5e-3  # PTB tokenizer, CIDEr-D, METEOR; also the cost of a row whose task the footer does not tell
ASR_RAY_DATA_ROW_S = 150e-6
CAPTION_RAY_DATA_ROW_S = 5e-3
RAY_DATA_START_S = 30.0  # Ray's start-up and the stages every input runs
CAPTION_STAGES_START_S = 45.0  # the document frequencies' shuffle, the caption actors and their METEOR JVMs
CAPTION_ROW_BYTES = 12_000  # what the in-process path holds a captioning row until the end
SAMPLED_FILES = 16


@dataclass(frozen=True)
class Work:
    """An input's rows by the cost of scoring them."""

    asr_rows: float = 0.0
    caption_rows: float = 0.0  # captioning rows, and rows whose task the footers do not tell

    def __add__(self, other: Work) -> Work:
        return Work(self.asr_rows + other.asr_rows, self.caption_rows + other.caption_rows)

    def scaled(self, factor: float) -> Work:
        return Work(self.asr_rows * factor, self.caption_rows * factor)

    def in_process_s(self) -> float:
        """About how long one core takes to score the rows in this process."""
        return self.asr_rows * ASR_ROW_S + self.caption_rows * CAPTION_ROW_S

    def ray_data_s(self, cpus: float) -> float:
        """About how long Ray Data takes on `cpus` CPUs: its start-up, then its CPU time spread over them."""
        start = RAY_DATA_START_S + (CAPTION_STAGES_START_S if self.caption_rows else 0.0)
        return start + (self.asr_rows * ASR_RAY_DATA_ROW_S + self.caption_rows * CAPTION_RAY_DATA_ROW_S) / cpus

    def in_process_bytes(self) -> float:
        """About what the in-process path holds until the end."""
        return self.caption_rows * CAPTION_ROW_BYTES


def on_ray_data(work: Work, cpus: float, memory_bytes: float) -> bool:
    """Whether Ray Data on `cpus` CPUs would score `work` sooner than this process, or this process would
    hold more than `memory_bytes` doing it."""
    return work.in_process_bytes() > memory_bytes or work.ray_data_s(cpus) < work.in_process_s()


def estimated_work(fs: fsspec.AbstractFileSystem, files: dict[str, dict[str, Any]]) -> Work:
    """The work of `files` (part file -> its listing with `size`), from a sample of their footers."""
    paths = sorted(files)
    sample = paths[:: max(1, len(paths) // SAMPLED_FILES)][:SAMPLED_FILES]
    work = sum((_footer_work(fs, path) for path in sample), Work())
    sampled_bytes = sum(files[path].get("size") or 0 for path in sample)
    total_bytes = sum(info.get("size") or 0 for info in files.values())
    return work.scaled(total_bytes / sampled_bytes if sampled_bytes else len(paths) / len(sample))


def _footer_work(fs: fsspec.AbstractFileSystem, path: str) -> Work:
    with fs.open(path, "rb") as file:
        metadata = pq.ParquetFile(file).metadata
    return sum((_row_group_work(metadata.row_group(i)) for i in range(metadata.num_row_groups)), Work())


def _row_group_work(group: pq.RowGroupMetaData) -> Work:
    """ASR rows where the row group holds only tasks other than captioning ("aac"), else captioning rows."""
    for column in map(group.column, range(group.num_columns)):
        if column.path_in_schema == "task":
            stats = column.statistics
            if stats is not None and stats.has_min_max and not stats.min <= "aac" <= stats.max:
                return Work(asr_rows=group.num_rows)
    return Work(caption_rows=group.num_rows)
