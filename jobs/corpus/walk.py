"""The one walk over a corpus: a piece of it (a tar shard, or a slice of an item-list shard) to its checked work
items in order, each with its audio bytes when asked for.

Every reader of a corpus goes through `walk`: the batch job's read tasks (a piece each, ids checked unique within
it), `Manifest.work_items` (every shard in turn, ids checked unique across the corpus: `validate`, references,
training) and training's feature cache. A tar shard's audio comes with its stream (one sequential read); an
item-list item's audio is read with its own request. A failure becomes the item's error row, never an exception.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jobs.corpus.fetch import read_item_bytes
from jobs.corpus.items import ItemListShard, WorkItemChecks, item_list_rows
from jobs.corpus.tars import shard_items
from nota_model.errors import AudioError

if TYPE_CHECKING:
    from jobs.corpus.manifest_schema import Manifest


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


def whole(shard: InputShard) -> ReadPiece:
    """The piece that is all of an input shard."""
    return shard if isinstance(shard, TarShard) else ListSlice(shard, 0, shard.rows)


def walk(piece: ReadPiece, manifest: Manifest, checks: WorkItemChecks,
         with_audio: bool = True) -> Iterator[tuple[dict[str, Any], bytes | None]]:
    """The work items of `piece` in index order (checked by `checks`, which remembers the ids it has seen), each
    with its audio bytes, or None: when not `with_audio` (a tar shard's stream is read all the same, an item
    list's audio files are not), when they cannot be read (the item's error says why), and for an item-list item
    that has an error already (its audio is not read)."""
    if isinstance(piece, TarShard):
        for index, (item, data) in enumerate(shard_items(piece.url, piece.size, manifest.storage_options)):
            yield checks.work_item(item, piece.number, index, piece.url), data if with_audio else None
        return
    rows = itertools.islice(item_list_rows(manifest, piece.shard), piece.start, piece.stop)
    for index, item in enumerate(rows, piece.start):
        item = checks.work_item(item, piece.shard.number, index, manifest.items)
        yield item, _item_audio(item, manifest.storage_options) if with_audio else None


def audio_name(item: dict[str, Any]) -> str:
    """What an item's audio is called in messages: its tar member, else its file's URL."""
    return item.get("member") or item["audio"]


def _item_audio(item: dict[str, Any], storage_options: Mapping[str, Any]) -> bytes | None:
    """The bytes of an item-list item's audio file (one request), or None with the item's error set."""
    if item["error"] is not None:
        return None
    try:
        return read_item_bytes(item, storage_options)
    except AudioError as err:
        item.update(error=err.code, error_message=err.message)
        return None
