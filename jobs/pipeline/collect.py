"""The collect stage: result rows gathered per input shard, each shard's Parquet file written once complete."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from jobs.outputs import OUTPUT_SCHEMA, OutputStore
from jobs.pipeline.settings import JobSettings


class ShardCollector:
    """Gathers result rows per shard; writes a shard's file once all its items are in."""

    def __init__(self, store: OutputStore, expected: dict[int, int]):
        self.store = store
        self.expected = expected
        self.rows: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
        self.written: set[int] = set()

    def add(self, row: dict[str, Any]) -> None:
        shard = row["shard"]
        if shard in self.written:  # a late copy from a redone batch: the shard is complete already
            return
        self.rows[shard][row["index"]] = row  # a redone batch replaces, never duplicates
        if len(self.rows[shard]) == self.expected[shard]:
            self._write(shard)

    def finish(self, pending: pa.Table, settings: JobSettings) -> None:
        """Items the pipeline never returned (it should not happen) still get a row: an error."""
        for item in pending.to_pylist():
            if item["shard"] not in self.written and item["index"] not in self.rows[item["shard"]]:
                self.rows[item["shard"]][item["index"]] = lost_row(item, settings)
        for shard in sorted(set(self.rows) - set(self.written)):
            self._write(shard)

    def _write(self, shard: int) -> None:
        self.store.write_shard(shard, list(self.rows.pop(shard).values()))
        self.written.add(shard)


def lost_row(item: dict[str, Any], settings: JobSettings) -> dict[str, Any]:
    return {
        **{name: None for name in OUTPUT_SCHEMA.names},
        **{k: item[k] for k in ("id", "shard", "index", "source", "audio", "task", "prompt", "reference")},
        "corpus": settings.corpus,
        "error": "lost",
        "error_message": "the pipeline returned no result for this item",
        "model": settings.model_identity,
        "decoding": settings.decoding,
        "job_id": settings.job_id,
        "created_at": datetime.now(UTC),
    }
