"""The write stage: result rows staged per input shard by the cluster, each shard committed whole once complete.

A shard's rows reach several blocks and actors. Each block's rows are staged under the shard's staging
folder, in a file named by the digest of their indices (a redone block overwrites its first copy; a block
cut differently overlaps it, and the merge keeps one row per index). The read task leaves a marker of the
shard's item count there before the shard's last rows leave it. The writer that finds the shard complete
merges its staged rows into `part-NNNNN.parquet` (one atomic write) and removes the staging: the part file
appears whole or not at all, and a second writer that merges too writes the same items. A staged file is
written atomically too, so the rows an interrupted run staged are whole and the next run keeps them
(`ShardStaging.kept_rows`): it reads only the items not staged yet, and the shard commits once the staged
and the new rows cover it.

    OUTPUT/NAME/_staging/part-NNNNN/items-N                     the shard has N items (from its read task)
    OUTPUT/NAME/_staging/part-NNNNN/rows-<digest>-<count>.parquet  one block's rows of the shard

The driver gets one small row per shard a block touched (`WRITE_RESULT_SCHEMA`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.inference.settings import JobSettings
from jobs.predictions import OUTPUT_SCHEMA, OutputStore, parquet_bytes
from nota_model.storage import write_bytes_atomically

WRITE_RESULT_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("staged_rows", pa.int64(), nullable=False),
        pa.field("staged_errors", pa.int64(), nullable=False),  # of the staged rows, those with an error
        pa.field("staged_audio_seconds", pa.float64(), nullable=False),
        pa.field("first_answered_s", pa.float64()),  # the staged rows' first and last `created_at` (Unix seconds)
        pa.field("last_answered_s", pa.float64()),
        pa.field("committed_rows", pa.int64()),  # set by the writer that committed the shard
        pa.field("committed_audio_seconds", pa.float64()),
    ]
)
_ITEMS = re.compile(r"items-(\d+)$")
_ROWS = re.compile(r"rows-[0-9a-f]+-(\d+)\.parquet$")
_KEPT_COLUMNS = ["index", "error", "audio_seconds"]


@dataclass(frozen=True)
class Commit:
    rows: int
    audio_seconds: float


@dataclass(frozen=True)
class KeptRows:
    """The rows a shard has staged, each index once: an interrupted run's answers, which the next run keeps."""

    indices: frozenset[int]
    errors: int
    audio_seconds: float


class ShardStaging:
    """The staging folders of one output's shards, on any fsspec filesystem."""

    def __init__(self, store: OutputStore):
        self.store = store
        self.root = f"{store.dir}/_staging"

    def folder(self, shard: int) -> str:
        return f"{self.root}/part-{shard:05d}"

    def expect(self, shard: int, items: int) -> None:
        """Record the shard's item count (its read task knows it once the shard is read)."""
        self.store.fs.makedirs(self.folder(shard), exist_ok=True)  # local folders; nothing on object stores
        self.store.fs.pipe_file(f"{self.folder(shard)}/items-{items}", b"")

    def stage(self, shard: int, rows: pa.Table) -> None:
        digest = hashlib.sha256(np.sort(rows["index"].to_numpy()).tobytes()).hexdigest()[:16]
        path = f"{self.folder(shard)}/rows-{digest}-{rows.num_rows}.parquet"
        write_bytes_atomically(self.store.fs, path, parquet_bytes(rows))

    def commit_if_complete(self, shard: int) -> Commit | None:
        """Merge the shard's staged rows into its part file if every item is there; None if not (or if another
        writer committed it meanwhile)."""
        names = self._names(shard)
        expected = [int(match[1]) for name in names if (match := _ITEMS.fullmatch(name))]
        staged = [name for name in names if _ROWS.fullmatch(name)]
        if not expected or sum(int(_ROWS.fullmatch(name)[1]) for name in staged) < expected[0]:
            return None
        try:
            rows = self._merged(shard, staged)
        except FileNotFoundError:
            return None
        return self.commit(shard, rows) if rows.num_rows >= expected[0] else None

    def commit(self, shard: int, rows: pa.Table) -> Commit:
        """Write the shard's part file (rows in index order) and remove its staging."""
        self.store.write_shard(shard, rows)
        self.remove(shard)
        return Commit(rows.num_rows, pc.sum(rows["audio_seconds"]).as_py() or 0.0)

    def staged_rows(self, shard: int) -> pa.Table:
        """The shard's staged rows, one per index."""
        return self._merged(shard, [name for name in self._names(shard) if _ROWS.fullmatch(name)])

    def kept_rows(self, done: set[int]) -> dict[int, KeptRows]:
        """The rows an interrupted run staged, per shard not in `done` (the committed shards). A staged file is
        whole (written atomically: the temporary file a killed worker was writing does not match a rows file's
        name, and goes with its folder). The staging of a shard committed meanwhile (a copy staged late, or a
        commit whose clean-up was cut short) is removed, and so is a staged file that cannot be read (its rows
        are answered again)."""
        kept = {}
        for shard in self.staged_shards():
            if shard in done:
                self.remove(shard)
                continue
            tables = [OUTPUT_SCHEMA.empty_table().select(_KEPT_COLUMNS)]
            for name in self._names(shard):
                if _ROWS.fullmatch(name):
                    try:
                        tables.append(self._read(shard, name, _KEPT_COLUMNS))
                    except pa.ArrowInvalid:  # not a whole Parquet file, e.g. after a crash of the machine
                        self.store.fs.rm(f"{self.folder(shard)}/{name}")
                    except FileNotFoundError:  # committed meanwhile by a write task a killed driver had started
                        continue
            rows = _one_per_index(pa.concat_tables(tables))
            if rows.num_rows:
                kept[shard] = KeptRows(frozenset(rows["index"].to_pylist()), rows.num_rows - rows["error"].null_count,
                                       pc.sum(rows["audio_seconds"]).as_py() or 0.0)
        return kept

    def staged_shards(self) -> list[int]:
        """Shards with a staging folder left."""
        names = self._listing(self.root)
        return sorted(int(match[1]) for name in names if (match := re.fullmatch(r"part-(\d{5,})", name)))

    def remove(self, shard: int | None = None) -> None:
        """Remove one shard's staging, or all of it."""
        try:
            self.store.fs.rm(self.root if shard is None else self.folder(shard), recursive=True)
        except FileNotFoundError:
            pass

    def _names(self, shard: int) -> list[str]:
        return self._listing(self.folder(shard))

    def _listing(self, folder: str) -> list[str]:
        self.store.fs.invalidate_cache(folder)  # s3fs keeps listings: other writers have changed it since
        try:
            return [path.rstrip("/").rsplit("/", 1)[-1] for path in self.store.fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return []

    def _merged(self, shard: int, names: Iterable[str]) -> pa.Table:
        return _one_per_index(pa.concat_tables([OUTPUT_SCHEMA.empty_table(), *(self._read(shard, name) for name in names)]))

    def _read(self, shard: int, name: str, columns: list[str] | None = None) -> pa.Table:
        with self.store.fs.open(f"{self.folder(shard)}/{name}", "rb") as file:
            return pq.read_table(file, schema=OUTPUT_SCHEMA, columns=columns)


def _one_per_index(rows: pa.Table) -> pa.Table:
    """The rows' first copy of each index (a redone block stages its rows again)."""
    _, first = np.unique(rows["index"].to_numpy(), return_index=True)
    return rows.take(pa.array(first, pa.int64()))


def write_rows(batch: pa.Table, staging: ShardStaging) -> pa.Table:
    """Stage a block's rows per shard and commit the shards they complete; one result row per shard."""
    results = []
    for shard in pc.unique(batch["shard"]).to_pylist():
        rows = batch.filter(pc.equal(batch["shard"], shard))
        staging.stage(shard, rows)
        commit = staging.commit_if_complete(shard)
        results.append({"shard": shard, "staged_rows": rows.num_rows, "staged_errors": rows.num_rows - rows["error"].null_count,
                        "staged_audio_seconds": pc.sum(rows["audio_seconds"]).as_py() or 0.0, **_answered(rows),
                        "committed_rows": commit and commit.rows,
                        "committed_audio_seconds": commit and commit.audio_seconds})
    return pa.Table.from_pylist(results, schema=WRITE_RESULT_SCHEMA)


def _answered(rows: pa.Table) -> dict[str, float | None]:
    times = pc.min_max(pc.divide(pc.cast(pc.cast(rows["created_at"], pa.timestamp("us", tz="UTC")), pa.int64()), 1e6))
    return {"first_answered_s": times["min"].as_py(), "last_answered_s": times["max"].as_py()}


def finish_shard(staging: ShardStaging, shard: int, work_items: Iterable[dict[str, Any]], settings: JobSettings) -> Commit | None:
    """After the run, a shard with staging left: committed already (a late copy was staged: removed), or
    incomplete: its items the pipeline never returned get a `lost` row, and it is committed."""
    if staging.store.fs.exists(staging.store.part_path(shard)):
        staging.remove(shard)
        return None
    rows = staging.staged_rows(shard)
    returned = set(rows["index"].to_pylist())
    lost = [lost_row(item, settings) for item in work_items if item["index"] not in returned]
    return staging.commit(shard, pa.concat_tables([rows, pa.Table.from_pylist(lost, schema=OUTPUT_SCHEMA)]))


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
