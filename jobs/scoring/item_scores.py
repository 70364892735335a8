"""Per-item scores: `items.parquet`, a folder of Parquet files (items_schema) beside metrics.parquet,
one row an item, written where the items are scored: by the Ray Data workers on the cluster, block by
block in-process. Speech recognition items and items no caption metric scores are written by stage 1
(item_table.py), captioned items by stage 4 (caption_totals.py) with their caption scores, so every item is in
exactly one file. A file is named by a digest of its items' ids, so a retried task overwrites its own
file instead of adding a second.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.metrics.registry import Metric, Source
from jobs.metrics.wer import EDIT_COLUMNS
from jobs.predictions import parquet_bytes
from nota_model.storage import write_bytes_atomically

ITEMS_FOLDER = "items.parquet"
BASE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("corpus", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("audio_seconds", pa.float64()),  # the item's duration (0 where its audio was not read)
    pa.field("error", pa.string()),  # the item's error code; null: the model answered
    pa.field("error_message", pa.string()),
    pa.field("flags", pa.list_(pa.string())),  # the answer's flags and mean token log-probability, as the row has them
    pa.field("mean_logprob", pa.float64()),
    # as scored: the Whisper English normalizer's output (ASR, one reference), the PTB tokenizer's
    # (captioning, every reference); null where the item was not scored
    pa.field("reference", pa.list_(pa.string())),
    pa.field("hypothesis", pa.string()),
    *(pa.field(name, pa.int64()) for name in EDIT_COLUMNS),  # ASR: jiwer's counts; null elsewhere
]


def items_schema(metrics: Sequence[Metric]) -> pa.Schema:
    """items.parquet's schema: the item, its scored texts and edit counts, then a float64 column per
    metric of `metrics` with per-item values (null where it does not score the item)."""
    return pa.schema([*BASE_FIELDS, *(pa.field(metric.name, pa.float64()) for metric in metrics if metric.per_item)])


@dataclass(frozen=True)
class ItemsOut:
    """Where the per-item files go: a folder URL and its fsspec options (picklable, for Ray workers)."""

    url: str
    storage_options: dict[str, Any]

    def write(self, table: pa.Table) -> None:
        """One file of items_schema rows; nothing for no rows."""
        if not table.num_rows:
            return
        digest = hashlib.sha256("\n".join(table["id"].to_pylist()).encode()).hexdigest()[:20]
        fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        write_bytes_atomically(fs, f"{root}/part-{digest}.parquet", parquet_bytes(table))


def asr_item_scores(items: pa.Table, metrics: Sequence[Metric]) -> pa.Table:
    """items_schema rows of stage 1's items (item_table.item_table) the caption metrics do not score: edit
    counts and error rates of the scored ASR items, nulls where an item was not scored."""
    items = items.filter(pc.invert(pc.is_valid(items["caption_hyp"])))
    scored = pc.is_valid(items["scored_reference"])
    counts = {name: pc.if_else(scored, items[name], pa.scalar(None, pa.int64())) for name in EDIT_COLUMNS}
    rates = {name: pa.array(values, pa.float64(), mask=~scored.to_numpy(zero_copy_only=False))
             for name, values in item_error_rates({name: items[name].to_numpy() for name in EDIT_COLUMNS}).items()}
    reference = pc.if_else(scored, _one_element_lists(items["scored_reference"]), pa.scalar(None, pa.list_(pa.string())))
    return _table(items, reference, items["scored_hypothesis"], {**counts, **rates}, metrics)


def caption_item_scores(items: pa.Table, scores: dict[str, list[float | None]], metrics: Sequence[Metric]) -> pa.Table:
    """items_schema rows of captioned items (tokenized captions) with their per-item caption scores
    (metric name -> a list in the items' order; a metric missing: nulls)."""
    columns = {name: pa.array(values, pa.float64()) for name, values in scores.items()}
    return _table(items, items["caption_refs"], items["caption_hyp"], columns, metrics)


def _table(items: pa.Table, reference: pa.Array, hypothesis: pa.Array, scores: dict[str, pa.Array],
           metrics: Sequence[Metric]) -> pa.Table:
    """The items as items_schema rows: `scores` by column, and the ITEM_MEAN metrics' values from stage 1."""
    item_means = {metric.name: items[metric.name] for metric in metrics if metric.source is Source.ITEM_MEAN}
    columns = {"id": items["id"], "corpus": items["corpus"], "task": items["task"], "model": items["model"],
               "audio_seconds": items["modelled_audio_seconds"], "error": items["error"],
               "error_message": items["error_message"], "flags": items["flags"], "mean_logprob": items["mean_logprob"],
               "reference": reference, "hypothesis": hypothesis,
               **scores, **item_means}
    schema = items_schema(metrics)
    return pa.table({field.name: _column(columns, field, items.num_rows) for field in schema}, schema=schema)


def _column(columns: dict[str, Any], field: pa.Field, rows: int) -> pa.Array | pa.ChunkedArray:
    return columns[field.name].cast(field.type) if field.name in columns else pa.nulls(rows, field.type)


def _one_element_lists(texts: pa.ChunkedArray) -> pa.Array:
    texts = texts.combine_chunks()
    return pa.ListArray.from_arrays(pa.array(np.arange(len(texts) + 1, dtype=np.int32)), texts)


def item_error_rates(counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each item's `wer` and `cer` as jobs.metrics.wer.word_errors gives a corpus's: edits over reference
    words (at least one), character edits over reference characters (the insertions where there are none)."""
    words = counts["word_hits"] + counts["word_substitutions"] + counts["word_deletions"]
    chars = counts["char_hits"] + counts["char_substitutions"] + counts["char_deletions"]
    word_edits = counts["word_substitutions"] + counts["word_deletions"] + counts["word_insertions"]
    char_edits = counts["char_substitutions"] + counts["char_deletions"] + counts["char_insertions"]
    wer = word_edits / np.maximum(words, 1)
    cer = np.where(chars > 0, char_edits / np.maximum(chars, 1), counts["char_insertions"]).astype(np.float64)
    return {"wer": wer, "cer": cer}
