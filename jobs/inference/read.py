"""The read stage: a Ray Data read task per input shard, on the cluster; the driver plans them from shard URLs.

A tar shard is one task that streams it front to back (one request per 64 MB) and decodes each item as its
members pass; an item list is cut into shards of `items_per_shard` rows, and its pending rows into tasks of
whole blocks (up to about ITEMS_PER_LIST_TASK rows), each item's audio read with its own request. Tasks yield
blocks of whole model batches (their rows sorted by duration) and record each shard's item count for the
write stage before the shard's last rows leave the task.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from jobs.corpus.items import ItemListShard, WorkItemChecks, item_list_rows
from jobs.corpus.manifest import Manifest
from jobs.corpus.tars import shard_items
from jobs.inference.decode import DECODED_SCHEMA, decode_item, decoded_block, read_item_audio
from jobs.inference.write import ShardStaging
from nota_model.config import ModelConfig

# An item-list read task holds up to about this many rows (fewer on a small corpus, for parallelism).
ITEMS_PER_LIST_TASK = 1000
LIST_TASKS_WANTED = 16


@dataclass(frozen=True)
class TarShard:
    number: int
    url: str
    size: int


@dataclass(frozen=True)
class ListSlice:
    """Items [start, stop) of an item-list shard."""

    shard: ItemListShard
    start: int
    stop: int


InputShard = TarShard | ItemListShard
ReadPiece = TarShard | ListSlice


@dataclass(frozen=True)
class ReadPlan:
    """The input shards of a run still to do, and what the driver knows of the corpus: its shards, and its items
    when it is an item list (a tar shard's items are known once it is read)."""

    pending: list[InputShard]
    shards: int
    items: int | None
    pending_items: int | None

    @classmethod
    def of(cls, manifest: Manifest, done: set[int]) -> ReadPlan:
        if manifest.items is None:
            files = manifest.shard_files()
            pending = [TarShard(number, url, size) for number, (url, size) in enumerate(files) if number not in done]
            return cls(pending, len(files), None, None)
        shards = manifest.item_list_shards()
        pending = [shard for shard in shards if shard.number not in done]
        return cls(pending, len(shards), sum(s.rows for s in shards), sum(s.rows for s in pending))

    def describe(self) -> str:
        if self.items is None:
            return f"{len(self.pending)} of {self.shards} tar shards"
        return f"{self.pending_items} of {self.items} items"

    def read_tasks(self, block_rows: int) -> list[list[ReadPiece]]:
        """A task per tar shard; an item list's pending rows cut into tasks of whole blocks (a shard may be
        split between two), so that every block but the last is full."""
        if self.pending_items is None:
            return [[shard] for shard in self.pending]
        blocks_per_task = max(1, min(ITEMS_PER_LIST_TASK // block_rows, self.pending_items // (block_rows * LIST_TASKS_WANTED)))
        task_rows = block_rows * blocks_per_task
        tasks: list[list[ReadPiece]] = [[]]
        room = task_rows
        for shard in self.pending:
            start = 0
            while start < shard.rows:
                if room == 0:
                    tasks.append([])
                    room = task_rows
                stop = min(shard.rows, start + room)
                tasks[-1].append(ListSlice(shard, start, stop))
                room -= stop - start
                start = stop
        return [task for task in tasks if task]


def shard_work_items(piece: ReadPiece, manifest: Manifest, with_audio: bool = True) -> Iterator[tuple[dict[str, Any], bytes | None]]:
    """The work items of a tar shard or of a slice of an item-list shard (ids checked unique within it), and each
    one's audio bytes (None for an item with an error, or when not `with_audio`)."""
    checks = WorkItemChecks(manifest)
    if isinstance(piece, TarShard):
        for index, (item, data) in enumerate(shard_items(piece.url, piece.size, manifest.storage_options)):
            yield checks.work_item(item, piece.number, index, piece.url), data
        return
    rows = itertools.islice(item_list_rows(manifest, piece.shard), piece.start, piece.stop)
    for index, item in enumerate(rows, piece.start):
        item = checks.work_item(item, piece.shard.number, index, manifest.items)
        yield item, read_item_audio(item, manifest.storage_options) if with_audio else None


@dataclass(frozen=True)
class ReadContext:
    manifest: Manifest
    config: ModelConfig  # the model the items are decoded for: its audio settings and input features
    block_rows: int
    staging: ShardStaging


def read_pieces(pieces: list[ReadPiece], context: ReadContext) -> Iterator[pa.Table]:
    """One read task: decoded blocks of `block_rows` rows. Each shard's item count is recorded for the write
    stage before any of its last rows leave: an item-list shard's (known) first, a tar shard's when it has been
    read (a full block leaves only when the next row is there)."""
    for piece in pieces:
        if isinstance(piece, ListSlice):
            context.staging.expect(piece.shard.number, piece.shard.rows)
    block: list[dict[str, Any]] = []
    for piece in pieces:
        items = 0
        for item, data in shard_work_items(piece, context.manifest):
            if len(block) == context.block_rows:
                yield decoded_block(block)
                block = []
            block.append(decode_item(item, data, context.config.audio, features_for=context.config))
            items += 1
        if isinstance(piece, TarShard):
            context.staging.expect(piece.number, items)
    if block:
        yield decoded_block(block)


class CorpusDatasource(Datasource):
    """The plan's read tasks for `ray.data.read_datasource`."""

    def __init__(self, tasks: list[list[ReadPiece]], context: ReadContext):
        super().__init__()
        self.tasks = tasks
        self.context = context

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        """One task per entry of the plan, whatever the parallelism asked for."""
        return [
            ReadTask(functools.partial(read_pieces, pieces, self.context),
                     BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=_sources(pieces, self.context.manifest)),
                     schema=DECODED_SCHEMA, per_task_row_limit=per_task_row_limit)
            for pieces in self.tasks
        ]


def _sources(pieces: list[ReadPiece], manifest: Manifest) -> tuple[str, ...]:
    return tuple(sorted({piece.url if isinstance(piece, TarShard) else manifest.items for piece in pieces}))
