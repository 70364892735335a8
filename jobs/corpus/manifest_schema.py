"""Corpus manifests: what a batch job reads, as a table of work items.

A manifest (YAML, see manifests/README.md) names a corpus, its default task and prompt, and its input:
an item list (JSONL or Parquet) or a glob of WebDataset tar shards, cut into numbered input shards
(`Manifest.input_shards()`: `shard_files()`, the tar shards' URLs and sizes, or `item_list_shards()`, row
ranges of the list). `jobs.corpus.walk` turns a shard into its work items (one per input row or tar key,
invalid ones included, so nothing is lost silently), with their audio bytes when asked; `Manifest.work_items()`
walks the whole corpus into one table (`validate`, training). `python -m jobs.manifest` is the command line
over them; jobs.corpus.make makes corpora.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo
from pydantic import field_validator, model_validator

from jobs.corpus.errors import ManifestError, explain
from jobs.corpus.fetch import IO_ERRORS
from jobs.corpus.items import (
    ITEM_LIST_SUFFIXES,
    WORK_ITEM_SCHEMA,
    ItemListShard,
    WorkItemChecks,
    jsonl_shard_offsets,
    parquet_rows,
    require_placeholder,
)
from jobs.corpus.urls import glob_files, parent_url, protocol_problem, resolve_url
from jobs.corpus.walk import InputShard, TarShard, walk, whole
from nota_model.config import PromptConfig

# The tasks a model answers without a prompt of the item's own: those of a NOTA config's default prompts
# (`prompt.tasks`), of which the Whisper reference models answer `asr` alone. A config may name others.
KNOWN_TASKS = tuple(sorted(PromptConfig().tasks))


def check_tasks(tasks: Iterable[str], known: Collection[str] = KNOWN_TASKS, where: str = "") -> None:
    """Refuse tasks (of items without a prompt) that no prompt covers, before anything runs: a model would
    answer every such item with `invalid_prompt`. Task names are compared as given (`ASR` is not `asr`)."""
    unknown = sorted(set(tasks) - set(known))
    if unknown:
        raise ManifestError(
            f"{where}no prompt for task {', '.join(map(repr, unknown))}: the known tasks are "
            f"{', '.join(map(repr, sorted(known)))} (names are case-sensitive); use one of them, or give a prompt "
            "holding <SpeechHere> for another task")


def check_item_tasks(items: pa.Table, where: str = "") -> None:
    """`check_tasks` over the good work items without a prompt of their own (`validate`)."""
    promptless = items.filter(pc.and_(pc.is_null(items["error"]), pc.is_null(items["prompt"])))
    check_tasks(pc.unique(promptless["task"]).to_pylist(), where=where)


class Manifest(BaseModel):
    """A corpus. `items` and `shards` are resolved URLs once validated (see `load_manifest`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    task: str = Field(min_length=1)
    prompt: str | None = None
    items: str | None = None
    shards: str | None = None
    items_per_shard: int = Field(1000, ge=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    require_reference: bool = False

    _check_prompt = field_validator("prompt")(require_placeholder)

    @field_validator("items", "shards")
    @classmethod
    def _resolve(cls, url: str | None, info: ValidationInfo) -> str | None:
        """Relative to the manifest's own location (the validation context's `base`), else to the working directory."""
        if url is None:
            return None
        url = resolve_url(url, (info.context or {}).get("base", os.getcwd()))
        problem = protocol_problem(url)
        if problem:
            raise ValueError(problem)
        return url

    @field_validator("items")
    @classmethod
    def _item_list_format(cls, url: str | None) -> str | None:
        if url is not None and not url.endswith(ITEM_LIST_SUFFIXES):
            raise ValueError(f"an item list must be a {' or '.join(ITEM_LIST_SUFFIXES)} file")
        return url

    @model_validator(mode="after")
    def _one_input(self) -> Manifest:
        if (self.items is None) == (self.shards is None):
            raise ValueError("give exactly one input: `items` (an item list URL) or `shards` (a glob of tar shards)")
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, _redacted(value) if name == "storage_options" else value

    def work_items(self) -> pa.Table:
        """One work item per item-list row or tar key, in (shard, index) order, as a WORK_ITEM_SCHEMA table: the
        whole corpus walked in one process (ids checked unique across it), for `validate` and training."""
        checks = WorkItemChecks(self)
        items = (item for shard in self.input_shards() for item, _ in walk(whole(shard), self, checks, with_audio=False))
        return pa.Table.from_pylist(list(items), schema=WORK_ITEM_SCHEMA)

    def input_shards(self) -> list[InputShard]:
        """The corpus's numbered input shards: its tar shards, or its item list cut into shards."""
        if self.items is not None:
            return self.item_list_shards()
        return [TarShard(number, url, size) for number, (url, size) in enumerate(self.shard_files())]

    def shard_files(self) -> list[tuple[str, int]]:
        """The tar shards (URL, size), sorted: shard N is the Nth."""
        shards = glob_files(self.shards, self.storage_options)
        if not shards:
            raise ManifestError(f"shards: {self.shards} matches no file; check the glob and the credentials")
        return shards

    def item_list_shards(self) -> list[ItemListShard]:
        """The item list cut into shards of `items_per_shard` rows. A JSONL list is read once for the byte offset
        of each shard's first row; a Parquet list's row counts are in its footer."""
        if self.items.endswith(".parquet"):
            total = parquet_rows(self.items, self.storage_options)
            offsets: list[int | None] = [None] * -(-total // self.items_per_shard)
        else:
            total, offsets = jsonl_shard_offsets(self.items, self.items_per_shard, self.storage_options)
        return [ItemListShard(number, number * self.items_per_shard,
                              min(self.items_per_shard, total - number * self.items_per_shard), offset)
                for number, offset in enumerate(offsets)]


def load_manifest(url: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Read and validate a manifest (a local path or fsspec URL). `storage_options` serve to read it and are the
    corpus's defaults: the manifest's own `storage_options` extend and override them."""
    options = dict(storage_options or {})
    try:
        with fsspec.open(url, "rb", **options) as file:
            text = file.read()
    except FileNotFoundError:
        raise ManifestError(f"{url}: no such manifest; check the path") from None
    except (*IO_ERRORS, ValueError, ImportError) as err:
        raise ManifestError(f"{url}: cannot read the manifest: {err}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None) or "syntax error"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ManifestError(f"{url}: not valid YAML{where}: {problem}") from None
    manifest = validated(document, parent_url(url), url)
    manifest.storage_options = {**options, **manifest.storage_options}
    return manifest


def validated(document: Any, base: str, where: str) -> Manifest:
    if not isinstance(document, dict):
        raise ManifestError(f"{where}: a manifest is a YAML mapping (name, task, items or shards, ...)")
    try:
        return Manifest.model_validate(document, context={"base": base})
    except ValidationError as err:
        # Never echo input values: storage_options may hold credentials.
        raise ManifestError(f"{where}: {explain(err)} (see manifests/README.md)") from None


def _redacted(value: Any) -> Any:
    return {key: _redacted(inner) for key, inner in value.items()} if isinstance(value, dict) else "***"

