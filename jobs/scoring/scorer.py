"""The scorer's public API: `score()` scores stored predictions and writes metrics.parquet (long format,
METRICS_SCHEMA), items.parquet (one row an item: item_scores.items_schema), metrics.json (with each group's
error analysis), report.md and its charts, and the seed's submission CSVs when asked (`python -m jobs.score`
is the command line over it; its help says what is measured)."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Sequence
from functools import partial
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from jobs.predictions import PART_NAME, parquet_bytes, prediction_files, read_predictions, require_bucket
from jobs.scoring import report
from jobs.scoring.item_scores import ITEMS_FOLDER, ItemsOut
from jobs.scoring.item_table import GROUP_KEYS
from jobs.scoring.pipeline import score_predictions
from nota_model.storage import write_atomically, write_bytes_atomically

SUBMISSION_COLUMNS = ["id", "corpus", "shard", "index", "text", "error"]
METRICS_SCHEMA = pa.schema(
    [
        pa.field("corpus", pa.string(), nullable=False),
        pa.field("task", pa.string()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("worker", pa.string()),  # null: the whole group
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64()),  # null: unavailable, `note` says why
        pa.field("note", pa.string()),
    ]
)


def long_rows(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups as METRICS_SCHEMA rows: one a metric (and worker)."""
    rows = []
    for group in groups:
        key = {k: group[k] for k in GROUP_KEYS}
        metric = lambda name, value, worker=None, note=None: rows.append(
            {**key, "worker": worker, "metric": name, "value": value, "note": note}
        )
        for name in ("items", "errors", "scored_items", "segmented_items", "signalled_items", "flagged_items", "audio_seconds"):
            metric(name, float(group[name]))
        for code, count in group["error_codes"].items():
            metric(f"errors.{code}", float(count))
        for flag, count in group["flags"].items():
            metric(f"flags.{flag}", float(count))
        for name, value in group["quality"].items():
            metric(name, float(value))
        for name, reason in group["unavailable"].items():
            metric(name, None, note=reason)
        for worker, speed in [(None, group["speed"]), *group["workers"].items()]:
            for name, value in _flat_speed(speed or {}).items():
                metric(name, value, worker)
    return rows


def _flat_speed(speed: dict[str, Any]) -> dict[str, float]:
    flat = {}
    for name, value in speed.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{stat}": v for stat, v in value.items()})
        elif value is not None:
            flat[name] = float(value)
    return flat


def _write_submission_rows(file: io.TextIOBase, rows: Sequence[dict[str, Any]], header: bool = False) -> None:
    """The seed's submission format: `testset_id,text`; an item with an error has empty text."""
    writer = csv.writer(file, lineterminator="\n")
    if header:
        writer.writerow(["testset_id", "text"])
    writer.writerows([row["id"], row["text"] if row["error"] is None else ""] for row in rows)


def score(
    predictions: str,
    output: str,
    references: str | None = None,
    spice_lib: str | None = None,
    submission: str | None = None,
    storage_options: dict[str, Any] | None = None,
    distributed: bool | None = None,
) -> list[dict[str, Any]]:
    """Score, write metrics, JSON, report (and submission CSVs); return the groups. `distributed`: on
    Ray Data (True), in this process (False), or by the input's size (None)."""
    options = storage_options or {}
    for url in filter(None, (output, submission)):
        require_bucket(url, options)
    fs, root = fsspec.core.url_to_fs(output, **options)
    fs.makedirs(root, exist_ok=True)
    if fs.exists(f"{root}/{ITEMS_FOLDER}"):  # an earlier run's files, whose items may differ
        fs.rm(f"{root}/{ITEMS_FOLDER}", recursive=True)
    items_out = ItemsOut(fs.unstrip_protocol(f"{root}/{ITEMS_FOLDER}"), options)
    summary = score_predictions(predictions, options, references, spice_lib, distributed, items_out)
    groups = summary.groups
    table = pa.Table.from_pylist(long_rows(groups), schema=METRICS_SCHEMA)
    write_bytes_atomically(fs, f"{root}/metrics.parquet", parquet_bytes(table))
    analysis = [{**dict(zip(GROUP_KEYS, key)), **found} for key, found in sorted(summary.analysis.items())]
    write_bytes_atomically(fs, f"{root}/metrics.json", json.dumps(
        {"predictions": predictions, "groups": groups, "analysis": analysis}, indent=2).encode())
    charts = report.charts(groups, summary.latency, summary.analysis)
    for name, png in charts.items():
        write_bytes_atomically(fs, f"{root}/{name}", png)
    write_bytes_atomically(fs, f"{root}/report.md",
                           report.markdown(groups, predictions, list(charts), summary.analysis).encode())
    if submission:
        _write_submissions(predictions, submission, options)
    return groups


def _write_submissions(predictions: str, url: str, options: dict[str, Any]) -> None:
    """Each corpus's submission CSV, streamed one part file at a time: a part file is one shard, so
    part files in shard order, each in index order, are the corpus order."""
    fs, root = fsspec.core.url_to_fs(predictions, **options)
    by_corpus: dict[str, list[str]] = defaultdict(list)
    for path in sorted(prediction_files(fs, root), key=_shard_order):
        for corpus in pc.unique(_read_part(fs, path, ["corpus"])["corpus"]).to_pylist():
            by_corpus[corpus].append(path)
    out_fs, out_root = fsspec.core.url_to_fs(url, **options)
    out_fs.makedirs(out_root, exist_ok=True)
    for corpus, paths in by_corpus.items():
        write_atomically(out_fs, f"{out_root}/{corpus}.csv", partial(_write_corpus_submission, fs, paths, corpus))


def _write_corpus_submission(fs: fsspec.AbstractFileSystem, paths: list[str], corpus: str, file: IO[bytes]) -> None:
    text = io.TextIOWrapper(file, encoding="utf-8", newline="")
    _write_submission_rows(text, [], header=True)
    for path in paths:
        rows = _read_part(fs, path, SUBMISSION_COLUMNS)
        rows = rows.filter(pc.equal(rows["corpus"], corpus)).sort_by([("shard", "ascending"), ("index", "ascending")])
        _write_submission_rows(text, rows.to_pylist())
    text.detach()  # the caller closes the file


def _read_part(fs: fsspec.AbstractFileSystem, path: str, columns: list[str]) -> pa.Table:
    return read_predictions(fs.unstrip_protocol(path), fs.storage_options, columns)


def _shard_order(path: str) -> tuple[str, int]:
    folder, name = path.rsplit("/", 1) if "/" in path else ("", path)
    return folder, int(PART_NAME.search(name)[1])
