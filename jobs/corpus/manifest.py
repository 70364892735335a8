"""Corpus manifests: what a batch job reads, as a table of work items; and the tool that makes them.

A manifest (YAML, see manifests/README.md) names a corpus, its default task and prompt, and its input:
an item list (JSONL or Parquet) or a glob of WebDataset tar shards, cut into numbered input shards:
`Manifest.shard_files()` (tar shards: URLs and sizes) or `Manifest.item_list_shards()` (row ranges of the
list). `shard_items` streams one tar shard (its items with their audio bytes, as the members pass) and
`item_list_rows` reads the rows of one item-list shard; `WorkItemChecks` turns them into work items (one per
input row or tar key, invalid ones included, so nothing is lost silently). `Manifest.work_items()` enumerates
the whole corpus into one table (`validate`); `read_item_bytes` reads one item's audio (a whole file, or a
byte range of a tar) with retries. `python -m jobs.manifest` is the command line over it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import tarfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, TypeVar

import aiohttp
import botocore.exceptions
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, ValidationInfo
from pydantic import field_validator, model_validator

from nota_model.config import PromptConfig
from nota_model.errors import AudioError, NotaError
from nota_model.storage import write_atomically
from nota_model.storage import cache_dir

SPEECH_PLACEHOLDER = PromptConfig().speech_placeholder
AUDIO_EXTENSIONS = frozenset({"wav", "flac", "mp3", "ogg"})
ITEM_LIST_SUFFIXES = (".jsonl", ".parquet")
SEED_TASKS = {"audiocaption": "aac", "audiocaption_v2": "aac"}
RETRY_DELAYS_S = (0.5, 1.0, 2.0)
# A tar shard is read front to back in requests of this size: one request for a shard up to 64 MB.
STREAM_BLOCK_SIZE = 64 << 20

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

_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}")
# The key of a WebDataset member is its path up to the first dot of its file name; the rest is its extension.
_MEMBER_NAME = re.compile(r"^(?P<key>(?:.*/)?[^/.]+)\.(?P<ext>[^/]+)$")
_IO_ERRORS = (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, aiohttp.ClientError)
_TRANSIENT_CLIENT_ERRORS = (
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ConnectionError,
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
)
_MISSING_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError)

_log = logging.getLogger(__name__)
T = TypeVar("T")


class ManifestError(NotaError):
    """A manifest, an item list, a shard glob or a tool argument is invalid or unreadable."""


def _require_placeholder(prompt: str | None) -> str | None:
    if prompt is not None and SPEECH_PLACEHOLDER not in prompt:
        raise ValueError(f"a prompt must hold {SPEECH_PLACEHOLDER} where the audio goes")
    return prompt


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

    _check_prompt = field_validator("prompt")(_require_placeholder)

    @field_validator("items", "shards")
    @classmethod
    def _resolve(cls, url: str | None, info: ValidationInfo) -> str | None:
        """Relative to the manifest's own location (the validation context's `base`), else to the working directory."""
        if url is None:
            return None
        url = resolve_url(url, (info.context or {}).get("base", os.getcwd()))
        problem = _protocol_problem(url)
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
        whole corpus in one process (ids checked unique across it), for `validate` and training."""
        checks = WorkItemChecks(self)
        if self.items is not None:
            shards = [(shard, item_list_rows(self, shard)) for shard in self.item_list_shards()]
            items = (checks.work_item(item, shard.number, index, self.items)
                     for shard, rows in shards for index, item in enumerate(rows))
        else:
            items = (checks.work_item(item, shard, index, url)
                     for shard, (url, size) in enumerate(self.shard_files())
                     for index, (item, _) in enumerate(shard_items(url, size, self.storage_options)))
        return pa.Table.from_pylist(list(items), schema=WORK_ITEM_SCHEMA)

    def shard_files(self) -> list[tuple[str, int]]:
        """The tar shards (URL, size), sorted: shard N is the Nth."""
        shards = _glob(self.shards, self.storage_options)
        if not shards:
            raise ManifestError(f"shards: {self.shards} matches no file; check the glob and the credentials")
        return shards

    def item_list_shards(self) -> list[ItemListShard]:
        """The item list cut into shards of `items_per_shard` rows. A JSONL list is read once for the byte offset
        of each shard's first row; a Parquet list's row counts are in its footer."""
        if self.items.endswith(".parquet"):
            total = _parquet_rows(self.items, self.storage_options)
            offsets: list[int | None] = [None] * -(-total // self.items_per_shard)
        else:
            total, offsets = _jsonl_shard_offsets(self.items, self.items_per_shard, self.storage_options)
        return [ItemListShard(number, number * self.items_per_shard,
                              min(self.items_per_shard, total - number * self.items_per_shard), offset)
                for number, offset in enumerate(offsets)]


@dataclass(frozen=True)
class ItemListShard:
    """Rows [first_row, first_row + rows) of an item list; `offset`: the byte offset of its first row in a JSONL list."""

    number: int
    first_row: int
    rows: int
    offset: int | None


def load_manifest(url: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Read and validate a manifest (a local path or fsspec URL). `storage_options` serve to read it and are the
    corpus's defaults: the manifest's own `storage_options` extend and override them."""
    options = dict(storage_options or {})
    try:
        with fsspec.open(url, "rb", **options) as file:
            text = file.read()
    except FileNotFoundError:
        raise ManifestError(f"{url}: no such manifest; check the path") from None
    except (*_IO_ERRORS, ValueError, ImportError) as err:
        raise ManifestError(f"{url}: cannot read the manifest: {err}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None) or "syntax error"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ManifestError(f"{url}: not valid YAML{where}: {problem}") from None
    manifest = _validated(document, _parent(url), url)
    manifest.storage_options = {**options, **manifest.storage_options}
    return manifest


def _validated(document: Any, base: str, where: str) -> Manifest:
    if not isinstance(document, dict):
        raise ManifestError(f"{where}: a manifest is a YAML mapping (name, task, items or shards, ...)")
    try:
        return Manifest.model_validate(document, context={"base": base})
    except ValidationError as err:
        # Never echo input values: storage_options may hold credentials.
        raise ManifestError(f"{where}: {_explain(err)} (see manifests/README.md)") from None


def _explain(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in err.errors())


def _redacted(value: Any) -> Any:
    return {key: _redacted(inner) for key, inner in value.items()} if isinstance(value, dict) else "***"


# URLs


def resolve_url(url: str, base: str) -> str:
    """Expand `${VAR}` / `${VAR:-default}` and `~`, then make `url` absolute against the directory URL `base`."""
    return _absolute(os.path.expanduser(expand_variables(url)), base)


def expand_variables(text: str) -> str:
    """`${VAR}` or `${VAR:-default}`; NOTA_CACHE defaults to the project's cache (~/.cache/nota)."""

    def value(match: re.Match[str]) -> str:
        name, default = match["name"], match["default"]
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        if name == "NOTA_CACHE":
            return str(cache_dir())
        raise ManifestError(f"{text}: environment variable {name} is not set; set it or write ${{{name}:-default}}")

    return _VARIABLE.sub(value, text)


def _absolute(url: str, base: str) -> str:
    if "://" in url or os.path.isabs(url):
        return url
    protocol, path = fsspec.core.split_protocol(base)
    joined = posixpath.normpath(posixpath.join(path, url))
    return joined if protocol is None else f"{protocol}://{joined}"


def _parent(url: str) -> str:
    protocol, path = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        return os.path.dirname(os.path.abspath(path))
    return f"{protocol}://{posixpath.dirname(path)}"


def _glob(url: str, storage_options: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(URL, size) of the files matching `url`, sorted."""
    try:
        fs, pattern = fsspec.core.url_to_fs(url, **storage_options)
        found = fs.glob(pattern, detail=True)
    except _IO_ERRORS as err:
        raise ManifestError(f"shards: cannot list {url}: {err}") from None
    local = isinstance(fs, LocalFileSystem)
    return [
        (path if local else fs.unstrip_protocol(path), info["size"])
        for path, info in sorted(found.items())
        if info["type"] == "file"
    ]


def _protocol_problem(url: str) -> str | None:
    protocol, _ = fsspec.core.split_protocol(url)
    problem = _filesystem_problem(protocol or "file")
    return f"{url}: no filesystem for {protocol}:// ({problem})" if problem else None


@lru_cache(maxsize=None)
def _filesystem_problem(protocol: str) -> str | None:
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as err:
        return str(err)
    return None


# Enumeration


class _Fields(BaseModel):
    """The fields of an item-list row or of a tar key's .json. Other fields are corpus metadata, ignored."""

    model_config = ConfigDict(extra="ignore")

    id: StrictStr | StrictInt | None = None
    audio: StrictStr | None = None
    task: StrictStr | None = None
    prompt: StrictStr | None = None
    reference: StrictStr | list[StrictStr] | None = None

    _check_prompt = field_validator("prompt")(_require_placeholder)


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
        return {"task": task, "prompt": prompt, "reference": _as_list(item.get("reference"))}

    def _problem(self, item: dict[str, Any]) -> dict[str, str]:
        if item["id"] in self.ids:
            return {"error": "duplicate_id", "error_message": f"id {item['id']!r} is already taken by an earlier item"}
        if self.manifest.require_reference and item["reference"] is None:
            return {"error": "missing_reference", "error_message": "the manifest requires references; this has none"}
        return {}


def _as_list(reference: str | list[str] | None) -> list[str] | None:
    return [reference] if isinstance(reference, str) else reference or None


def _one_or_list(references: list[str]) -> str | list[str]:
    return references[0] if len(references) == 1 else references


def _invalid(item_id: str, message: str, code: str = "invalid_item", audio: str = "") -> dict[str, Any]:
    return {"id": item_id, "audio": audio, "error": code, "error_message": message}


def item_list_rows(manifest: Manifest, shard: ItemListShard) -> Iterator[dict[str, Any]]:
    """The items of one item-list shard (before `WorkItemChecks`)."""
    base = _parent(manifest.items)
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


def _parquet_rows(url: str, storage_options: Mapping[str, Any]) -> int:
    with _item_list(url, storage_options) as file:
        return pq.ParquetFile(file).metadata.num_rows


def _jsonl_shard_offsets(url: str, rows_per_shard: int, storage_options: Mapping[str, Any]) -> tuple[int, list[int]]:
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
    except (*_IO_ERRORS, pa.ArrowInvalid) as err:
        raise ManifestError(f"items: cannot read {url}: {err}") from None


def _list_item(row: str | dict[str, Any], number: int, base: str) -> dict[str, Any]:
    """An item-list row; relative audio paths resolve against the item list's directory."""
    fallback = f"row-{number}"
    try:
        data = json.loads(row) if isinstance(row, str) else row
        fields = _Fields.model_validate(data)
    except ValidationError as err:
        return _invalid(_id_of(data) or fallback, f"row {number}: {_explain(err)}")
    except ValueError as err:
        return _invalid(fallback, f"row {number} is not JSON: {err}")
    item_id = _id_of(data)
    if item_id is None or not fields.audio:
        return _invalid(item_id or fallback, f"row {number} has no {'id' if item_id is None else 'audio URL'}")
    audio = _absolute(fields.audio, base)
    problem = _protocol_problem(audio)
    if problem:
        return _invalid(item_id, problem, audio=audio)
    return {**fields.model_dump(exclude={"id", "audio"}), "id": item_id, "audio": audio}


def _id_of(data: Any) -> str | None:
    item_id = data.get("id") if isinstance(data, dict) else None
    return str(item_id) if isinstance(item_id, (str, int)) and not isinstance(item_id, bool) and item_id != "" else None


def shard_items(url: str, size: int, storage_options: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], bytes | None]]:
    """The items of one tar shard with their audio bytes (None for an invalid item), read as one sequential
    stream. A transient error restarts the stream past the items already given (after 0.5, 1 and 2 s); a shard
    that cannot be read (further) is one more item, `unreadable_shard`."""
    given = 0
    for delay in (*RETRY_DELAYS_S, None):
        try:
            for number, pair in enumerate(_stream_shard(url, size, storage_options)):
                if number >= given:
                    given += 1
                    yield pair
            return
        except _IO_ERRORS as err:
            if delay is None or not _is_transient(err):
                yield _invalid(f"{url}#unreadable", f"cannot read shard {url}: {err}", "unreadable_shard", url), None
                return
            _log.warning("transient error on %s, retrying in %.1f s: %s", url, delay, err)
            time.sleep(delay)


def _stream_shard(url: str, size: int, storage_options: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], bytes | None]]:
    """Members are read front to back and grouped by key as they pass (WebDataset keeps a key's members
    together): a key's item is given when the next key starts. Items before any damage are given; the damage
    is one more item, `corrupt_shard`."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    with fs.open(path, "rb", block_size=STREAM_BLOCK_SIZE) as file:
        try:
            with tarfile.open(fileobj=file, mode="r:") as tar:
                damage = yield from _items_by_key(url, tar, file, size)
        except tarfile.TarError as err:
            damage = f"not a whole tar: {err}"
    if damage:
        message = f"{url}: {damage}; any items after it are lost: rebuild the shard"
        yield _invalid(f"{url}#corrupt", message, "corrupt_shard", url), None


def _items_by_key(url: str, tar: tarfile.TarFile, file: IO[bytes], size: int) -> Generator[tuple[dict[str, Any], bytes | None], None, str | None]:
    """Audio members are kept as TarInfo, .json/.txt as bytes. Returns what is damaged, if anything (tarfile
    itself stops silently at a cut or garbled header)."""
    files: dict[str, tarfile.TarInfo] = {}
    key, group, damage = None, {}, None
    for member in tar:
        link = member.islnk() or member.issym()
        if not (member.isfile() or link):
            continue
        if member.offset_data + member.size > size:
            damage = f"member {member.name} is cut: the shard ends at byte {size}"
            break
        match = _MEMBER_NAME.match(member.name)
        member_key, ext = (match["key"], match["ext"].lower()) if match else (member.name, "")
        if link and ext not in AUDIO_EXTENSIONS:
            continue
        if member_key != key:
            if group:
                yield _item_with_audio(url, key, group, tar, files)
            key, group = member_key, {}
        if ext in AUDIO_EXTENSIONS:
            group[ext] = member
        else:
            group[ext] = tar.extractfile(member).read() if ext in ("json", "txt") else None
        if not link:
            files[member.name] = member
    else:
        file.seek(tar.offset)
        if file.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            damage = f"no end-of-archive marker at byte {tar.offset}: the shard is cut or garbled there"
    if group:
        yield _item_with_audio(url, key, group, tar, files)
    return damage


def _item_with_audio(url: str, key: str, group: dict[str, Any], tar: tarfile.TarFile,
                     files: dict[str, tarfile.TarInfo]) -> tuple[dict[str, Any], bytes | None]:
    """A key's item and its audio bytes. A link member reads as the earlier audio member it points at."""
    for ext, member in group.items():
        if isinstance(member, tarfile.TarInfo) and (member.islnk() or member.issym()):
            group[ext] = _link_target(member, files)
    item = _group_item(url, key, group)
    if item.get("error") is not None:
        return item, None
    audio = next(member for ext, member in group.items() if ext in AUDIO_EXTENSIONS)
    return item, tar.extractfile(audio).read()


def _link_target(link: tarfile.TarInfo, files: dict[str, tarfile.TarInfo]) -> tarfile.TarInfo | str:
    """The audio member a link member points at (a hard link names it from the archive root, a symbolic link
    from its own folder), or why it cannot be read."""
    beside = posixpath.join(posixpath.dirname(link.name), link.linkname)
    name = link.linkname if link.islnk() else posixpath.normpath(beside)
    target = files.get(name)
    if target is None or posixpath.splitext(name)[1][1:].lower() not in AUDIO_EXTENSIONS:
        return f"member {link.name} is a link to {link.linkname}, which is no audio member of this shard"
    return target


def _group_item(url: str, key: str, members: dict[str, Any]) -> dict[str, Any]:
    audio = sorted(ext for ext in members if ext in AUDIO_EXTENSIONS)
    if len(audio) != 1:
        found = ", ".join(f"{key}.{ext}" for ext in members)
        message = f"{url}: key {key} needs one audio member (.wav, .flac, .mp3, .ogg); it has {found}"
        return _invalid(key, message, audio=url)
    try:
        fields = _Fields.model_validate(json.loads(members["json"])) if "json" in members else _Fields()
    except ValidationError as err:
        return _invalid(key, f"{url}: {key}.json: {_explain(err)}", audio=url)
    except ValueError as err:
        return _invalid(key, f"{url}: {key}.json is not JSON: {err}", audio=url)
    reference = fields.reference
    if reference is None and "txt" in members:
        reference = members["txt"].decode("utf-8", errors="replace").strip()
    member = members[audio[0]]
    if isinstance(member, str):
        return _invalid(key, f"{url}: {member}", audio=url)
    return {
        "id": key if fields.id is None or fields.id == "" else str(fields.id),
        "audio": url,
        "offset": member.offset_data,
        "size": member.size,
        "member": member.name,
        "task": fields.task,
        "prompt": fields.prompt,
        "reference": reference,
    }


# Reading


def read_item_bytes(row: Mapping[str, Any], storage_options: Mapping[str, Any]) -> bytes:
    """The audio bytes of a work item: the whole file, or its byte range in a tar. Transient errors are retried
    (after 0.5, 1 and 2 s); failures raise AudioError `missing_audio`, `not_audio` (a directory), `forbidden_audio`,
    `truncated_audio` (a tar shorter than its listing) or `read_failed` (retries exhausted, or another storage error)."""
    url, offset, size = row["audio"], row.get("offset"), row.get("size")
    where = url if row.get("member") is None else f"{url} member {row['member']}"
    try:
        data = _retrying(lambda: _read(url, offset, size, storage_options), where)
    except _MISSING_ERRORS as err:
        if _is_directory(url, storage_options):
            raise AudioError("not_audio", f"{where} is a directory, not an audio file") from err
        raise AudioError("missing_audio", f"{where} does not exist") from err
    except PermissionError as err:
        raise AudioError("forbidden_audio", f"{where}: access denied; check the credentials and permissions") from err
    except _IO_ERRORS as err:
        raise AudioError("read_failed", f"{where}: {err}") from err
    if size is not None and len(data) != size:
        raise AudioError("truncated_audio", f"{where}: got {len(data)} of {size} bytes: the shard has changed")
    return data


def _is_directory(url: str, storage_options: Mapping[str, Any]) -> bool:
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    try:
        return fs.isdir(path)
    except _IO_ERRORS:
        return False


def _read(url: str, offset: int | None, size: int | None, storage_options: Mapping[str, Any]) -> bytes:
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    if offset is None:
        return fs.cat_file(path)
    return fs.cat_file(path, start=offset, end=offset + size)


def _retrying(call: Callable[[], T], what: str) -> T:
    for delay in RETRY_DELAYS_S:
        try:
            return call()
        except Exception as err:
            if not _is_transient(err):
                raise
            _log.warning("transient error on %s, retrying in %.1f s: %s", what, delay, err)
            time.sleep(delay)
    return call()


def _is_transient(err: BaseException) -> bool:
    if isinstance(err, (*_MISSING_ERRORS, PermissionError)):
        return False
    if isinstance(err, (OSError, *_TRANSIENT_CLIENT_ERRORS)):  # OSError includes ConnectionError, TimeoutError
        return True
    status = _http_status(err)
    return status is not None and (status >= 500 or status in (408, 429))


def _http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    status = getattr(err, "status", None)  # aiohttp ClientResponseError
    return status if isinstance(status, int) else None


# Writing


def _write_atomically(url: str, write: Callable[[IO[bytes]], None], storage_options: Mapping[str, Any]) -> None:
    try:
        write_atomically(*fsspec.core.url_to_fs(url, **storage_options), write)
    except (*_IO_ERRORS, ValueError, ImportError) as err:
        raise ManifestError(f"cannot write {url}: {err}") from None


def _write_text(url: str, text: str, storage_options: Mapping[str, Any]) -> None:
    _write_atomically(url, lambda file: file.write(text.encode("utf-8")), storage_options)


def _manifest_text(document: dict[str, Any], base: str, where: str) -> str:
    _validated(document, base, where)
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


# build


def build_shards(
    audio_dir: Path,
    references: str | None,
    name: str,
    task: str,
    out: str,
    items_per_shard: int = 1000,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Pack the audio files under `audio_dir` (id: the path below it without extension) with their references
    (`<stem>.txt` beside each file, or a .tsv/.jsonl file) into tar shards `{out}-00000.tar`, ...; write the
    manifest `{out}.yaml` beside them and return its URL."""
    if items_per_shard < 1:
        raise ManifestError(f"--items-per-shard must be at least 1, not {items_per_shard}")
    options = dict(storage_options or {})
    audio = _audio_files(audio_dir)
    ids = sorted(audio)
    chunks = [ids[start : start + items_per_shard] for start in range(0, len(ids), items_per_shard)]
    width = max(5, len(str(len(chunks) - 1)))
    glob = f"{posixpath.basename(out)}-{'?' * width}.tar"
    manifest_url = f"{out}.yaml"
    text = _manifest_text({"name": name, "task": task, "shards": glob}, _parent(manifest_url), "build")
    if _glob(_absolute(glob, _parent(manifest_url)), options):
        raise ManifestError(f"{out}: shards from an earlier build are there; remove them or choose another --out")
    texts = _read_references(references, options) if references else _references_beside(audio)
    unmatched = sorted(set(texts) - set(audio))
    if unmatched:
        _log.warning("%d references name no audio file under %s, e.g. %s", len(unmatched), audio_dir, unmatched[0])
    for number, chunk in enumerate(chunks):
        entries = [(item_id, audio[item_id], texts.get(item_id)) for item_id in chunk]
        _write_atomically(f"{out}-{number:0{width}d}.tar", lambda file: _write_tar(file, entries), options)
    _write_text(manifest_url, text, options)
    return manifest_url


def _audio_files(directory: Path) -> dict[str, Path]:
    if not directory.is_dir():
        raise ManifestError(f"--audio-dir {directory} is not a directory")
    files: dict[str, Path] = {}
    for path in sorted(directory.rglob("*")):
        if path.suffix[1:].lower() in AUDIO_EXTENSIONS and path.is_file():
            item_id = path.relative_to(directory).with_suffix("").as_posix()
            if item_id in files:
                raise ManifestError(f"{files[item_id]} and {path} would both be item {item_id!r}; keep one")
            files[item_id] = path
    if not files:
        raise ManifestError(f"no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))}) under {directory}")
    return files


def _references_beside(audio: dict[str, Path]) -> dict[str, list[str]]:
    beside = {item_id: path.with_suffix(".txt") for item_id, path in audio.items()}
    return {item_id: [text.read_text(encoding="utf-8").strip()] for item_id, text in beside.items() if text.is_file()}


def _read_references(url: str, storage_options: Mapping[str, Any]) -> dict[str, list[str]]:
    """`id<TAB>text` lines (.tsv) or `{"id", "reference"}` rows (.jsonl); an id given more than once gets a list."""
    if not url.endswith((".tsv", ".jsonl")):
        raise ManifestError(f"--references {url}: give a .tsv (id<TAB>text) or .jsonl ({{id, reference}}) file")
    try:
        with fsspec.open(url, "rt", encoding="utf-8", **storage_options) as file:
            lines = file.read().splitlines()
    except _IO_ERRORS as err:
        raise ManifestError(f"--references {url}: cannot read it: {err}") from None
    references: dict[str, list[str]] = defaultdict(list)
    for number, line in enumerate(lines, 1):
        if line.strip():
            item_id, texts = _reference_line(line, url.endswith(".tsv"), f"{url} line {number}")
            references[item_id].extend(texts)
    return references


def _reference_line(line: str, tsv: bool, where: str) -> tuple[str, list[str]]:
    if tsv:
        item_id, tab, text = line.partition("\t")
        if not tab:
            raise ManifestError(f"{where}: expected id<TAB>text")
        return item_id, [text]
    try:
        fields = _Fields.model_validate_json(line)
    except ValidationError as err:
        raise ManifestError(f"{where}: {_explain(err)}") from None
    if fields.id is None or fields.reference is None:
        raise ManifestError(f"{where}: a row needs an id and a reference")
    return str(fields.id), _as_list(fields.reference)


def _write_tar(file: IO[bytes], entries: list[tuple[str, Path, list[str] | None]]) -> None:
    """WebDataset members: `<key>.<ext>` (the audio) and `<key>.json` ({"id", "reference"?}), keys numbered."""
    with tarfile.open(fileobj=file, mode="w") as tar:
        for number, (item_id, path, references) in enumerate(entries):
            key = f"{number:06d}"
            with open(path, "rb") as audio:
                stat = os.fstat(audio.fileno())  # not gettarinfo: it writes a hard-linked file's later copies as links
                tar.addfile(_regular_member(f"{key}{path.suffix.lower()}", stat.st_size, stat.st_mtime), audio)
            meta: dict[str, Any] = {"id": item_id}
            if references:
                meta["reference"] = _one_or_list(references)
            data = json.dumps(meta, ensure_ascii=False).encode("utf-8")
            tar.addfile(_regular_member(f"{key}.json", len(data), time.time()), io.BytesIO(data))


def _regular_member(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = size, int(mtime)
    return info


# import-seed


def import_seed(
    seed: str, name: str, out: str, audio_root: str | None = None, storage_options: Mapping[str, Any] | None = None
) -> str:
    """The seed project's annotation JSON (`{"annotation": [{"path", "text", "task", "Q"?}]}`) or test list
    (`[{"testset_id", "path", "task"}]`) -> an item list `<out stem>.jsonl` beside the manifest `out`."""
    options = dict(storage_options or {})
    try:
        with fsspec.open(seed, "rt", encoding="utf-8", **options) as file:
            document = json.load(file)
    except (*_IO_ERRORS, ValueError) as err:
        raise ManifestError(f"{seed}: cannot read it as JSON: {err}") from None
    rows = document.get("annotation") if isinstance(document, dict) else document
    if not isinstance(rows, list):
        raise ManifestError(f"{seed}: expected {{\"annotation\": [...]}} or a list of items")
    items = seed_items(rows, resolve_url(audio_root, os.getcwd()) if audio_root else _parent(seed), seed)
    tasks = Counter(item["task"] for item in items if item.get("task"))
    items_url = posixpath.splitext(out)[0] + ".jsonl"
    task = tasks.most_common(1)[0][0] if tasks else "asr"
    document = {"name": name, "task": task, "items": posixpath.basename(items_url)}
    text = _manifest_text(document, _parent(out), "import-seed")
    _write_text(items_url, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), options)
    _write_text(out, text, options)
    return out


def seed_items(rows: list[Any], audio_root: str, where: str) -> list[dict[str, Any]]:
    """Items from seed rows. Rows of one audio with the same task and question merge: their texts become the
    item's references (several captions of one clip). id: `testset_id`, else the audio's stem (made unique)."""
    items: dict[tuple[Any, ...], dict[str, Any]] = {}
    texts: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    ids: set[str] = set()
    for number, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise ManifestError(f"{where}: row {number} has no `path`")
        task = SEED_TASKS.get(row.get("task"), row.get("task"))
        prompt = f"<Speech>{SPEECH_PLACEHOLDER}</Speech> {row['Q']}" if row.get("Q") else None
        key = (row.get("testset_id"), row["path"], task, prompt)
        if key not in items:
            item_id = _unique(Path(row["path"]).stem, number, ids) if key[0] is None else str(key[0])
            ids.add(item_id)
            fields = {"id": item_id, "audio": _absolute(row["path"], audio_root), "task": task, "prompt": prompt}
            items[key] = {field: value for field, value in fields.items() if value is not None}
        if row.get("text") is not None:
            texts[key].append(str(row["text"]))
    return [item | ({"reference": _one_or_list(texts[key])} if texts[key] else {}) for key, item in items.items()]


def _unique(item_id: str, number: int, taken: set[str]) -> str:
    return item_id if item_id not in taken else f"{item_id}-{number}"
