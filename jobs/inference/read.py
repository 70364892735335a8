"""The read stage: a Ray Data read task per entry of the driver's read plan (plan.py), on the cluster.

A tar shard's task streams it front to back (one request per 64 MB) and decodes each item as its members pass;
an item-list task reads each item's audio with its own request. Tasks yield blocks of whole model batches
(their rows sorted by duration) and record each shard's item count (for the write stage, through the
context's `record_items`) before the shard's last rows leave the task.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from jobs.corpus.items import WorkItemChecks
from jobs.corpus.manifest_schema import Manifest
from jobs.corpus.walk import ListSlice, ReadPiece, TarShard, walk
from jobs.inference.decode import DECODED_SCHEMA, decode_item, decoded_block
from nota_model.config import ModelConfig


@dataclass(frozen=True)
class ReadContext:
    manifest: Manifest
    config: ModelConfig  # the model the items are decoded for: its audio settings and input features
    block_rows: int
    record_items: Callable[[int, int], None]  # (shard, its item count), before the shard's last rows leave
    dry_run: bool = False  # decode without the model's inputs (decode.decode_item)


def read_pieces(pieces: list[ReadPiece], context: ReadContext) -> Iterator[pa.Table]:
    """One read task: decoded blocks of `block_rows` rows. Each shard's item count is recorded for the write
    stage before any of its last rows leave: an item-list shard's (known) first, a tar shard's when it has been
    read (a full block leaves only when the next row is there)."""
    for piece in pieces:
        if isinstance(piece, ListSlice):
            context.record_items(piece.shard.number, piece.shard.rows)
    block: list[dict[str, Any]] = []
    for piece in pieces:
        items = 0
        for item, data in walk(piece, context.manifest, WorkItemChecks(context.manifest)):
            if len(block) == context.block_rows:
                yield decoded_block(block)
                block = []
            block.append(decode_item(item, data, context.config.audio, features_for=context.config, dry_run=context.dry_run))
            items += 1
        if isinstance(piece, TarShard):
            context.record_items(piece.number, items)
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
