"""Run the scoring stages over stored predictions: on the Ray cluster with Ray Data (the Parquet read
where the data is, only accumulators merged), or in this process for a small input, with the same code."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial, reduce
from itertools import chain
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs
import ray

from jobs.metrics.registry import Metric, registered
from jobs.predictions import OUTPUT_SCHEMA, prediction_files, require_one_run_per_group
from jobs.ray_session import join_ray
from jobs.scoring.caption_totals import CaptionScorer, CaptionsByGroup, merged_captions
from jobs.scoring.frequencies import RANGE_KEYS, CountedFrequencies, frequency_parts, merge_parts
from jobs.scoring.item_scores import ItemsOut, asr_item_scores
from jobs.scoring.coco_tools import start_meteor
from jobs.scoring.item_table import READ_COLUMNS, captioned, has_captions, item_table
from jobs.scoring.merged import Merged
from jobs.scoring.references import read_references
from jobs.scoring.sizing import estimated_work, on_ray_data
from jobs.scoring.totals import Summary, Totals
from nota_model.errors import NotaError

ITEMS_PER_BATCH = 10_000  # a block: under a second of ASR work on one core, a single PTB tokenizer run for its captions
IN_PROCESS_MEMORY_SHARE = 0.25  # of this machine's memory, the most the in-process path may hold (a METEOR JVM and others share it)


def score_predictions(
    url: str,
    storage_options: dict[str, Any] | None = None,
    references: str | None = None,
    spice_lib: str | None = None,
    distributed: bool | None = None,
    items_out: ItemsOut | None = None,
) -> Summary:
    """The groups and latency statistics of every prediction under `url`; `distributed` None decides
    by the input's work (sizing.on_ray_data: Ray Data where it would finish first on the cluster's CPUs, or
    where the in-process path would hold more than IN_PROCESS_MEMORY_SHARE of this machine's memory). `references`: a URL whose references replace the rows' (references.read_references),
    read in this process, or on the cluster by a Ray task whose table the map tasks share. `items_out`:
    where each item's scores go (item_scores.py), written where the items are scored. The metrics are
    those registered when it starts (jobs.metrics.registry), handed to every stage, on the cluster too."""
    metrics = registered()
    options = storage_options or {}
    fs, root = fsspec.core.url_to_fs(url, **options)
    files = prediction_files(fs, root)
    if not files:
        raise NotaError(f"{url} holds no prediction files (part-NNNNN.parquet): check the --predictions URL")
    require_one_run_per_group(fs, files)
    if distributed is None:
        distributed = on_ray_data(estimated_work(fs, files), _ray_data_cpus(), IN_PROCESS_MEMORY_SHARE * _memory_bytes())
    if not distributed:
        found = read_references(references, options) if references else None
        return score_blocks(_blocks(fs, sorted(files)), found, spice_lib, items_out, metrics)
    join_ray()
    found = _read_references_on_cluster(references, options) if references else None
    # a read task per part file: by default Ray Data reads small inputs (200 000 rows here) as one block,
    # so one task would score them all
    dataset = ray.data.read_parquet(sorted(files), filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)),
                                    columns=READ_COLUMNS, override_num_blocks=len(files))
    items = dataset.map_batches(_shared_item_table, batch_format="pyarrow", batch_size=ITEMS_PER_BATCH,
                                fn_kwargs={"references": found, "items_out": items_out, "metrics": metrics}).materialize()
    summary = _aggregate(items, partial(Totals.of, metrics=metrics), Totals.summary)
    if not summary.captioned_items:
        return summary
    frequencies = items.map_batches(frequency_parts, batch_format="pyarrow", batch_size=ITEMS_PER_BATCH).groupby(
        RANGE_KEYS).map_groups(merge_parts, batch_format="pyarrow").materialize()
    # blocks of ITEMS_PER_BATCH (the item map's output blocks hold up to 128 MB, some 125 000 captioned
    # items), scored by a fixed pool of one actor a CPU up to one a block (an autoscaling pool stayed at
    # one actor), materialized before the aggregate, which would otherwise hold a CPU while the actors run
    blocks = items.map_batches(captioned, batch_format="pyarrow", batch_size=None).repartition(
        target_num_rows_per_block=ITEMS_PER_BATCH).materialize()
    actors = max(1, min(_cluster_cpus(), blocks.num_blocks()))
    scored = blocks.map_batches(
        CaptionScorer, batch_format="pyarrow", batch_size=ITEMS_PER_BATCH, concurrency=actors,
        fn_constructor_kwargs={"frequencies": frequencies.to_arrow_refs(), "corpus_items": summary.captions,
                               "spice_lib": spice_lib, "metrics": metrics, "items_out": items_out}).materialize()
    return _with_captions(summary, _aggregate(scored, merged_captions, CaptionsByGroup.quality))


def score_blocks(blocks: Iterable[pa.Table], references: pa.Table | None = None, spice_lib: str | None = None,
                 items_out: ItemsOut | None = None, metrics: Sequence[Metric] | None = None) -> Summary:
    """The stages in this process, a block at a time, as on the cluster: only the totals, the document
    frequencies (frequencies.CountedFrequencies) and the captioned items are kept between blocks. `metrics`: those registered, unless given."""
    metrics = registered() if metrics is None else metrics
    totals, frequencies, captioned_blocks = Totals(), CountedFrequencies(), []
    for block in blocks:
        if has_captions(block):
            start_meteor()  # its JVM loads its paraphrase table (seconds) while the blocks are scored
        items = _written_item_table(block, references, items_out, metrics)
        totals = totals.merge(Totals.of(items, metrics))
        frequencies.add(items)
        captioned_blocks.append(captioned(items))
    summary = totals.summary()
    if not summary.captioned_items:
        return summary
    captions = (CaptionsByGroup.of(items, frequencies, summary.captions, spice_lib, metrics, items_out)
                for items in captioned_blocks)
    return _with_captions(summary, reduce(CaptionsByGroup.merge, captions, CaptionsByGroup()).quality())


def _blocks(fs: fsspec.AbstractFileSystem, paths: list[str]) -> Iterator[pa.Table]:
    """The part files' rows in blocks of about ITEMS_PER_BATCH, read as they are needed: a file at a time
    (a dataset of all of them reads ahead through every file, the more the larger the input)."""
    pending: list[pa.RecordBatch] = []
    for batch in chain.from_iterable(map(partial(_batches, fs), paths)):
        pending.append(batch)
        if sum(len(b) for b in pending) >= ITEMS_PER_BATCH:
            yield pa.Table.from_batches(pending)
            pending = []
    if pending:
        yield pa.Table.from_batches(pending)


def _batches(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[pa.RecordBatch]:
    return ds.dataset(path, schema=OUTPUT_SCHEMA, format="parquet", filesystem=fs).to_batches(
        columns=READ_COLUMNS, batch_size=ITEMS_PER_BATCH)


def _read_references_on_cluster(url: str, options: dict[str, Any]) -> ray.ObjectRef:
    """The references table, read by a Ray task and left in the object store; waits for the read, so
    that a bad file fails here with its own error."""
    count, table = ray.remote(num_returns=2)(_counted_references).remote(url, options)
    try:
        ray.get(count)
    except ray.exceptions.RayTaskError as err:
        raise err.cause from None
    return table


def _counted_references(url: str, options: dict[str, Any]) -> tuple[int, pa.Table]:
    table = read_references(url, options)
    return len(table), table


def _shared_item_table(block: pa.Table, references: ray.ObjectRef | None, items_out: ItemsOut | None,
                       metrics: Sequence[Metric]) -> pa.Table:
    """item_table with the references from the object store (zero-copy: Arrow buffers are not unpickled)."""
    return _written_item_table(block, None if references is None else ray.get(references), items_out, metrics)


def _written_item_table(block: pa.Table, references: pa.Table | None, items_out: ItemsOut | None,
                        metrics: Sequence[Metric]) -> pa.Table:
    """item_table, whose items the caption metrics do not score written to `items_out` on the way."""
    items = item_table(block, references, metrics)
    if items_out is not None:
        items_out.write(asr_item_scores(items, metrics))
    return items


def _cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _ray_data_cpus() -> int:
    """The CPUs Ray Data would score on: the cluster's where this process has joined one or RAY_ADDRESS
    names one, else this machine's (a local Ray takes them all)."""
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS") not in (None, "", "local"):
        join_ray()
        return _cluster_cpus()
    return os.cpu_count() or 1


def _memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _with_captions(summary: Summary, qualities: dict[tuple[str, ...], tuple[dict, dict, list]]) -> Summary:
    for group in summary.groups:
        if (key := (group["corpus"], group["task"], group["model"])) in qualities:
            quality, unavailable, worst = qualities[key]
            group["quality"], group["scored_items"] = quality | group["quality"], quality["items"]
            group["unavailable"].update(unavailable)
            summary.analysis[key]["worst_items"] = worst
    return summary


def _aggregate(dataset: ray.data.Dataset, start: Callable[[pa.Table], Any], finish: Callable[[Any], Any]) -> Any:
    result = dataset.aggregate(Merged(start, finish))["merged"]
    return pickle.loads(result)
