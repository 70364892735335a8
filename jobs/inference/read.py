"""The read stage: a Ray Data read task per entry of the driver's read plan (plan.py), on the cluster.

A tar shard's task streams it front to back (one request per 64 MB) and decodes each item as its members pass;
an item-list task reads each item's audio with its own request. A tar shard's task skips the items an
interrupted run staged (the plan's kept rows; an item list's are in no task). Tasks yield blocks of `block_rows`
(whole model batches, their rows sorted by duration), and record each shard's item count (for the write stage,
through the context's `record_items`) before the shard's last rows leave the task. Ray Data joins the blocks a
task yields into one until they pass the context's target block size (dataset.py raises it so that no decoded block
is split): a read task, not a block, is the unit the model actors share (plan.py cuts them to the pool).
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
from jobs.inference.plan import ReadPlan
from nota_model.config import ModelConfig


@dataclass(frozen=True)
class ReadContext:
    manifest: Manifest
    config: ModelConfig  # the model the items are decoded for: its audio settings and input features
    block_rows: int  # a whole number of model batches: the rows sorted by duration together
    record_items: Callable[[int, int], None]  # (shard, its item count), before the shard's last rows leave
    dry_run: bool = False  # decode without the model's inputs (decode.decode_item)


def read_pieces(pieces: list[ReadPiece], context: ReadContext, kept: dict[int, frozenset[int]]) -> Iterator[pa.Table]:
    """One read task: decoded blocks of `block_rows` rows, without the `kept` items (indices per tar shard). Each
    shard's item count is recorded for the write stage before any of its last rows leave: an item-list shard's
    (known) first, a tar shard's when it has been read (a full block leaves only when the next row is there)."""
    for piece in pieces:
        if isinstance(piece, ListSlice):
            context.record_items(piece.shard.number, piece.shard.rows)
    block = []
    for piece in pieces:
        items = 0
        for item, data in walk(piece, context.manifest, WorkItemChecks(context.manifest)):
            items += 1
            if item["index"] in kept.get(item["shard"], ()):
                continue
            if len(block) == context.block_rows:
                yield decoded_block(block)
                block = []
            block.append(decode_item(item, data, context.config.audio, features_for=context.config, dry_run=context.dry_run,
                                     skip_silence=context.config.signals.skip_silence))
        if isinstance(piece, TarShard):
            context.record_items(piece.number, items)
    if block:
        yield decoded_block(block)


class CorpusDatasource(Datasource):
    """The plan's read tasks for `ray.data.read_datasource`, cut for a `pool` of model actors."""

    def __init__(self, plan: ReadPlan, context: ReadContext, pool: int):
        super().__init__()
        self.plan = plan
        self.tasks = plan.read_tasks(context.block_rows, pool)
        self.context = context

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        """One task per entry of the plan, whatever the parallelism asked for."""
        return [
            ReadTask(functools.partial(read_pieces, pieces, self.context, self.plan.kept_indices(pieces)),
                     BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=_sources(pieces, self.context.manifest)),
                     schema=DECODED_SCHEMA, per_task_row_limit=per_task_row_limit)
            for pieces in self.tasks
        ]


def _sources(pieces: list[ReadPiece], manifest: Manifest) -> tuple[str, ...]:
    return tuple(sorted({piece.url if isinstance(piece, TarShard) else manifest.items for piece in pieces}))
