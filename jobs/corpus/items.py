"""Work items: WORK_ITEM_SCHEMA, the checks that turn an input row into a work item (an invalid one included,
with its error, so nothing is lost silently), and the rows of one item-list shard (JSONL or Parquet)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError
from pydantic import field_validator

from jobs.corpus.errors import ManifestError, explain
from jobs.corpus.fetch import IO_ERRORS
from jobs.corpus.urls import absolute_url, parent_url, protocol_problem
from nota_model.config import PromptConfig

if TYPE_CHECKING:
    from jobs.corpus.manifest_schema import Manifest

SPEECH_PLACEHOLDER = PromptConfig().speech_placeholder
ITEM_LIST_SUFFIXES = (".jsonl", ".parquet")


WORK_ITEM_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("index", pa.int32(), nullable=False),
        pa.field("audio", pa.string(), nullable=False),
        pa.field("offset", pa.int64()),
        pa.field("size", pa.int64()),
        pa.field("member", pa.string()),
        pa.field("task", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("reference", pa.list_(pa.string())),
        pa.field("error", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("source", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class ItemListShard:
    """Rows [first_row, first_row + rows) of an item list; `offset`: the byte offset of its first row in a JSONL list."""

    number: int
    first_row: int
    rows: int
    offset: int | None


def require_placeholder(prompt: str | None) -> str | None:
    if prompt is not None and SPEECH_PLACEHOLDER not in prompt:
        raise ValueError(f"a prompt must hold {SPEECH_PLACEHOLDER} where the audio goes")
    return prompt


class ItemFields(BaseModel):
    """The fields of an item-list row or of a tar key's .json. Other fields are corpus metadata, ignored."""

    model_config = ConfigDict(extra="ignore")

    id: StrictStr | StrictInt | None = None
    audio: StrictStr | None = None
    task: StrictStr | None = None
    prompt: StrictStr | None = None
    reference: StrictStr | list[StrictStr] | None = None

    _check_prompt = field_validator("prompt")(require_placeholder)


class WorkItemChecks:
    """Makes work items (WORK_ITEM_SCHEMA fields): applies the manifest's defaults and the checks that span
    the items it has seen (ids are unique among them)."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.ids: set[str] = set()

    def work_item(self, item: dict[str, Any], shard: int, index: int, source: str) -> dict[str, Any]:
        item = {**item, "shard": shard, "index": index, "source": source, **self._defaults(item)}
        if item.get("error") is None:
            item.update(self._problem(item))
        self.ids.add(item["id"])
        return {name: item.get(name) for name in WORK_ITEM_SCHEMA.names}

    def _defaults(self, item: dict[str, Any]) -> dict[str, Any]:
        """The manifest's task; its prompt only for items of its task; a reference as a list."""
        task = item.get("task") or self.manifest.task
        prompt = item.get("prompt") or (self.manifest.prompt if task == self.manifest.task else None)
        return {"task": task, "prompt": prompt, "reference": as_list(item.get("reference"))}

    def _problem(self, item: dict[str, Any]) -> dict[str, str]:
        if item["id"] in self.ids:
            return {"error": "duplicate_id", "error_message": f"id {item['id']!r} is already taken by an earlier item"}
        if self.manifest.require_reference and item["reference"] is None:
            return {"error": "missing_reference", "error_message": "the manifest requires references; this has none"}
        return {}


def as_list(reference: str | list[str] | None) -> list[str] | None:
    return [reference] if isinstance(reference, str) else reference or None


def one_or_list(references: list[str]) -> str | list[str]:
    return references[0] if len(references) == 1 else references


def invalid_item(item_id: str, message: str, code: str = "invalid_item", audio: str = "") -> dict[str, Any]:
    return {"id": item_id, "audio": audio, "error": code, "error_message": message}


def item_list_rows(manifest: Manifest, shard: ItemListShard) -> Iterator[dict[str, Any]]:
    """The items of one item-list shard (before `WorkItemChecks`)."""
    base = parent_url(manifest.items)
    rows = _read_item_list(manifest.items, manifest.storage_options, shard)
    for number, row in enumerate(rows, shard.first_row):
        yield _list_item(row, number, base)


def _read_item_list(url: str, storage_options: Mapping[str, Any], shard: ItemListShard) -> Iterator[str | dict[str, Any]]:
    """The shard's JSONL lines as text (each parsed on its own, so one bad line is one invalid item), or Parquet rows."""
    with _item_list(url, storage_options) as file:
        if url.endswith(".parquet"):
            yield from _parquet_slice(pq.ParquetFile(file), shard.first_row, shard.rows)
        else:
            file.seek(shard.offset)
            lines = (line.decode("utf-8", errors="replace") for line in file if line.strip())
            yield from (line for _, line in zip(range(shard.rows), lines))


def _parquet_slice(file: pq.ParquetFile, first: int, rows: int) -> Iterator[dict[str, Any]]:
    start = 0
    for group in range(file.num_row_groups):
        size = file.metadata.row_group(group).num_rows
        if start + size > first and start < first + rows:
            table = file.read_row_group(group)
            yield from table.slice(max(0, first - start), first + rows - max(first, start)).to_pylist()
        start += size


def parquet_rows(url: str, storage_options: Mapping[str, Any]) -> int:
    with _item_list(url, storage_options) as file:
        return pq.ParquetFile(file).metadata.num_rows


def jsonl_shard_offsets(url: str, rows_per_shard: int, storage_options: Mapping[str, Any]) -> tuple[int, list[int]]:
    """Non-blank lines of a JSONL list, and the byte offset of every `rows_per_shard`th."""
    rows, position, offsets = 0, 0, []
    with _item_list(url, storage_options) as file:
        for line in file:
            if line.strip():
                if rows % rows_per_shard == 0:
                    offsets.append(position)
                rows += 1
            position += len(line)
    return rows, offsets


@contextmanager
def _item_list(url: str, storage_options: Mapping[str, Any]) -> Iterator[IO[bytes]]:
    """The item list open for reading; read errors are ManifestErrors."""
    try:
        with fsspec.open(url, "rb", **storage_options) as file:
            yield file
    except FileNotFoundError:
        raise ManifestError(f"items: {url} does not exist; check the path") from None
    except (*IO_ERRORS, pa.ArrowInvalid) as err:
        raise ManifestError(f"items: cannot read {url}: {err}") from None


def _list_item(row: str | dict[str, Any], number: int, base: str) -> dict[str, Any]:
    """An item-list row; relative audio paths resolve against the item list's directory."""
    fallback = f"row-{number}"
    try:
        data = json.loads(row) if isinstance(row, str) else row
        fields = ItemFields.model_validate(data)
    except ValidationError as err:
        return invalid_item(_id_of(data) or fallback, f"row {number}: {explain(err)}")
    except ValueError as err:
        return invalid_item(fallback, f"row {number} is not JSON: {err}")
    item_id = _id_of(data)
    if item_id is None or not fields.audio:
        return invalid_item(item_id or fallback, f"row {number} has no {'id' if item_id is None else 'audio URL'}")
    audio = absolute_url(fields.audio, base)
    problem = protocol_problem(audio)
    if problem:
        return invalid_item(item_id, problem, audio=audio)
    return {**fields.model_dump(exclude={"id", "audio"}), "id": item_id, "audio": audio}


def _id_of(data: Any) -> str | None:
    item_id = data.get("id") if isinstance(data, dict) else None
    return str(item_id) if isinstance(item_id, (str, int)) and not isinstance(item_id, bool) and item_id != "" else None
