"""WebDataset tar shards streamed front to back: each key's members grouped into one item with its audio bytes
as the members pass, links followed, a truncated shard retried from where it stopped."""

from __future__ import annotations

import json
import logging
import posixpath
import re
import tarfile
import time
from collections.abc import Generator, Iterator, Mapping
from typing import IO, Any

import fsspec
from pydantic import ValidationError

from jobs.corpus.errors import explain
from jobs.corpus.fetch import IO_ERRORS, RETRY_DELAYS_S, is_transient
from jobs.corpus.items import ItemFields, invalid_item

AUDIO_EXTENSIONS = frozenset({"wav", "flac", "mp3", "ogg"})


# A tar shard is read front to back in requests of this size: one request for a shard up to 64 MB.
STREAM_BLOCK_SIZE = 64 << 20


# The key of a WebDataset member is its path up to the first dot of its file name; the rest is its extension.
_MEMBER_NAME = re.compile(r"^(?P<key>(?:.*/)?[^/.]+)\.(?P<ext>[^/]+)$")
_log = logging.getLogger(__name__)


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
        except IO_ERRORS as err:
            if delay is None or not is_transient(err):
                yield invalid_item(f"{url}#unreadable", f"cannot read shard {url}: {err}", "unreadable_shard", url), None
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
        yield invalid_item(f"{url}#corrupt", message, "corrupt_shard", url), None


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
        return invalid_item(key, message, audio=url)
    try:
        fields = ItemFields.model_validate(json.loads(members["json"])) if "json" in members else ItemFields()
    except ValidationError as err:
        return invalid_item(key, f"{url}: {key}.json: {explain(err)}", audio=url)
    except ValueError as err:
        return invalid_item(key, f"{url}: {key}.json is not JSON: {err}", audio=url)
    reference = fields.reference
    if reference is None and "txt" in members:
        reference = members["txt"].decode("utf-8", errors="replace").strip()
    member = members[audio[0]]
    if isinstance(member, str):
        return invalid_item(key, f"{url}: {member}", audio=url)
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
