"""Making corpora: tar shards and their manifest from a folder of audio (`build_shards`), and a manifest with
its item list from the seed's annotation JSON (`import_seed`); every file written atomically."""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import tarfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import fsspec
import yaml
from pydantic import ValidationError

from jobs.corpus.errors import ManifestError, explain
from jobs.corpus.fetch import IO_ERRORS
from jobs.corpus.items import SPEECH_PLACEHOLDER, ItemFields, as_list, one_or_list
from jobs.corpus.manifest_schema import check_tasks, validated
from jobs.corpus.tars import AUDIO_EXTENSIONS
from jobs.corpus.urls import absolute_url, glob_files, parent_url, resolve_url
from nota_model.storage import write_atomically

SEED_TASKS = {"audiocaption": "aac", "audiocaption_v2": "aac"}
_log = logging.getLogger(__name__)


def _write_atomically(url: str, write: Callable[[IO[bytes]], None], storage_options: Mapping[str, Any]) -> None:
    try:
        write_atomically(*fsspec.core.url_to_fs(url, **storage_options), write)
    except (*IO_ERRORS, ValueError, ImportError) as err:
        raise ManifestError(f"cannot write {url}: {err}") from None


def _write_text(url: str, text: str, storage_options: Mapping[str, Any]) -> None:
    _write_atomically(url, lambda file: file.write(text.encode("utf-8")), storage_options)


def _manifest_text(document: dict[str, Any], base: str, where: str) -> str:
    validated(document, base, where)
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


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
    check_tasks([task], where="--task: ")
    options = dict(storage_options or {})
    audio = _audio_files(audio_dir)
    ids = sorted(audio)
    chunks = [ids[start : start + items_per_shard] for start in range(0, len(ids), items_per_shard)]
    width = max(5, len(str(len(chunks) - 1)))
    glob = f"{posixpath.basename(out)}-{'?' * width}.tar"
    manifest_url = f"{out}.yaml"
    text = _manifest_text({"name": name, "task": task, "shards": glob}, parent_url(manifest_url), "build")
    if glob_files(absolute_url(glob, parent_url(manifest_url)), options):
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
    except IO_ERRORS as err:
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
        fields = ItemFields.model_validate_json(line)
    except ValidationError as err:
        raise ManifestError(f"{where}: {explain(err)}") from None
    if fields.id is None or fields.reference is None:
        raise ManifestError(f"{where}: a row needs an id and a reference")
    return str(fields.id), as_list(fields.reference)


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
                meta["reference"] = one_or_list(references)
            data = json.dumps(meta, ensure_ascii=False).encode("utf-8")
            tar.addfile(_regular_member(f"{key}.json", len(data), time.time()), io.BytesIO(data))


def _regular_member(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = size, int(mtime)
    return info


def import_seed(
    seed: str, name: str, out: str, audio_root: str | None = None, storage_options: Mapping[str, Any] | None = None
) -> str:
    """The seed project's annotation JSON (`{"annotation": [{"path", "text", "task", "Q"?}]}`) or test list
    (`[{"testset_id", "path", "task"}]`) -> an item list `<out stem>.jsonl` beside the manifest `out`."""
    options = dict(storage_options or {})
    try:
        with fsspec.open(seed, "rt", encoding="utf-8", **options) as file:
            document = json.load(file)
    except (*IO_ERRORS, ValueError) as err:
        raise ManifestError(f"{seed}: cannot read it as JSON: {err}") from None
    rows = document.get("annotation") if isinstance(document, dict) else document
    if not isinstance(rows, list):
        raise ManifestError(f"{seed}: expected {{\"annotation\": [...]}} or a list of items")
    items = seed_items(rows, resolve_url(audio_root, os.getcwd()) if audio_root else parent_url(seed), seed)
    tasks = Counter(item["task"] for item in items if item.get("task"))
    items_url = posixpath.splitext(out)[0] + ".jsonl"
    task = tasks.most_common(1)[0][0] if tasks else "asr"
    document = {"name": name, "task": task, "items": posixpath.basename(items_url)}
    text = _manifest_text(document, parent_url(out), "import-seed")
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
            fields = {"id": item_id, "audio": absolute_url(row["path"], audio_root), "task": task, "prompt": prompt}
            items[key] = {field: value for field, value in fields.items() if value is not None}
        if row.get("text") is not None:
            texts[key].append(str(row["text"]))
    return [item | ({"reference": one_or_list(texts[key])} if texts[key] else {}) for key, item in items.items()]


def _unique(item_id: str, number: int, taken: set[str]) -> str:
    return item_id if item_id not in taken else f"{item_id}-{number}"
