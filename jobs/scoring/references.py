"""`--references`: a table of references that replace the prediction rows' own, joined to each block.

The references are an Arrow table (REFERENCE_SCHEMA), never Python dicts: on the cluster one Ray task
reads it and the map tasks share it through the object store, so the driver holds only its ObjectRef.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.corpus.manifest_schema import load_manifest
from nota_model.errors import NotaError

REFERENCE_SCHEMA = pa.schema([
    pa.field("corpus", pa.string()),  # null: the reference of that id in any corpus
    pa.field("id", pa.string(), nullable=False),
    pa.field("reference", pa.list_(pa.string())),
])
LINES_PER_CHUNK = 100_000
_ROW, _MATCH = "__row", "__match"


def read_references(url: str, storage_options: dict[str, Any]) -> pa.Table:
    """The references of a manifest (its items, corpus = the manifest's name), or of a JSONL/Parquet of `id`,
    `reference` (a string or a list of strings) and maybe `corpus`. Where a key repeats, the last one wins;
    a row without a reference is left out."""
    if url.endswith((".yaml", ".yml")):
        manifest = load_manifest(url, storage_options)
        items = manifest.work_items()
        table = pa.table({"corpus": pa.repeat(pa.scalar(manifest.name), len(items)), "id": items["id"],
                          "reference": items["reference"]})
    elif url.endswith(".parquet"):
        table = _read_parquet(url, storage_options)
    else:
        table = _read_jsonl(url, storage_options)
    table = table.filter(pc.is_valid(table["reference"]))
    return _last_of_each_key(table.cast(REFERENCE_SCHEMA))


def _read_parquet(url: str, storage_options: dict[str, Any]) -> pa.Table:
    with fsspec.open(url, "rb", **storage_options) as file:
        parquet = pq.ParquetFile(file)
        names = parquet.schema_arrow.names
        _require({"id", "reference"} - set(names), url)
        table = parquet.read(columns=[name for name in REFERENCE_SCHEMA.names if name in names])
    if "corpus" not in names:
        table = table.add_column(0, "corpus", pa.nulls(len(table), pa.string()))
    if pa.types.is_string(table["reference"].type) or pa.types.is_large_string(table["reference"].type):
        one_each = pa.chunked_array([pa.ListArray.from_arrays(np.arange(len(c) + 1, dtype=np.int32), c, mask=c.is_null())
                                     for c in table["reference"].chunks], pa.list_(table["reference"].type))
        table = table.set_column(table.schema.get_field_index("reference"), "reference", one_each)
    return table.select(REFERENCE_SCHEMA.names)


def _read_jsonl(url: str, storage_options: dict[str, Any]) -> pa.Table:
    """Line by line into Arrow, LINES_PER_CHUNK lines at a time (a line's reference may be a string or a list)."""
    with fsspec.open(url, "rt", encoding="utf-8", **storage_options) as file:
        chunks = [_jsonl_chunk(lines, url) for lines in _batched(enumerate(file, 1), LINES_PER_CHUNK)]
    return pa.concat_tables(chunks) if chunks else REFERENCE_SCHEMA.empty_table()


def _jsonl_chunk(lines: list[tuple[int, str]], url: str) -> pa.Table:
    columns: dict[str, list] = {name: [] for name in REFERENCE_SCHEMA.names}
    for number, line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        _require({"id", "reference"} - row.keys(), f"{url} line {number}")
        reference = row["reference"]
        columns["corpus"].append(row.get("corpus"))
        columns["id"].append(str(row["id"]))
        columns["reference"].append([reference] if isinstance(reference, str) else reference)
    return pa.table(columns, schema=REFERENCE_SCHEMA)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _require(missing: set[str], where: str) -> None:
    if missing:
        raise NotaError(f"{where}: no {' or '.join(sorted(missing))}; references need `id` and `reference` (and maybe `corpus`)")


def _last_of_each_key(table: pa.Table) -> pa.Table:
    numbered = table.append_column(_ROW, pa.array(np.arange(len(table))))
    last = numbered.group_by(["corpus", "id"], use_threads=False).aggregate([(_ROW, "max")])
    return table.take(np.sort(last[f"{_ROW}_max"].to_numpy()))


def referenced(block: pa.Table, references: pa.Table) -> pa.ChunkedArray:
    """The block's `reference` column, in its row order: each row's replaced by the reference of its (corpus, id),
    else by that of its id among the references without a corpus; a row with neither keeps its own."""
    candidates = references.filter(pc.is_in(references["id"], value_set=block["id"].combine_chunks()))
    rows = pa.table({"corpus": block["corpus"], "id": block["id"], _ROW: np.arange(len(block))})
    id_rows, id_references = _matches(rows.select(["id", _ROW]), candidates.filter(pc.is_null(candidates["corpus"])), ["id"])
    corpus_rows, corpus_references = _matches(rows, candidates.filter(pc.is_valid(candidates["corpus"])), ["corpus", "id"])
    own = len(block)
    choice = np.arange(own)  # into [own references..., id_references..., corpus_references...]
    choice[id_rows] = own + np.arange(len(id_rows))
    choice[corpus_rows] = own + len(id_rows) + np.arange(len(corpus_rows))  # a (corpus, id) match wins
    chunks = [*block["reference"].chunks, id_references, corpus_references]
    return pa.chunked_array([c.cast(REFERENCE_SCHEMA.field("reference").type) for c in chunks]).take(choice)


def _matches(rows: pa.Table, references: pa.Table, keys: list[str]) -> tuple[np.ndarray, pa.Array]:
    """The block rows that match a reference on `keys`, and those references. Acero joins no list
    columns, so the join carries each reference's position."""
    positions = references.select(keys).append_column(_MATCH, pa.array(np.arange(len(references))))
    joined = rows.join(positions, keys, join_type="inner", use_threads=False)
    return joined[_ROW].to_numpy(), references["reference"].take(joined[_MATCH]).combine_chunks()
