"""Transcripts handed on: a predictions folder as subtitles (SRT or WebVTT, a file an item) or as JSONL (a file
a corpus, a line an item, its language and word times included).

Cues are cut at word times where the row has them (`words`: Whisper on CTranslate2), to be read as they
show: at most two lines of about 42 characters, at most 7 s, and a new cue after a pause of over half a
second, never inside a word (a word longer than a line is a line of its own); a full cue ends at its last
clause end rather than a word into the next sentence. A row without word times (the NOTA model; outputs
written before word times) gets a cue a piece of its `segments`, and one without `segments` (written before
long recordings were segmented) one cue over its whole audio. Items with an error or no text get no subtitle
file (they are counted); in JSONL every item has its line, its error included. Part files are read one at a
time, in shard order, and a JSONL file is streamed (one atomic write).

A subtitle file is named by its id percent-encoded (`file_stem`), so that two ids never share a file and the
name gives the id back (`urllib.parse.unquote`); a name too long for a file system is cut and ends in a hash
of the whole id. A WebVTT file also carries its id in a NOTE block (SRT has no comments).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import IO, Any
from urllib.parse import quote

import fsspec

from jobs.predictions import PART_NAME, prediction_files, read_predictions, require_bucket
from nota_model.errors import NotaError
from nota_model.storage import write_atomically, write_bytes_atomically

FORMATS = ("srt", "vtt", "jsonl")
JSONL_COLUMNS = ["id", "corpus", "shard", "index", "audio", "task", "model", "text", "segments", "language",
                 "language_probability", "words", "audio_seconds", "error", "error_message"]
# A cue read as it shows: at most MAX_LINES lines of MAX_LINE_CHARACTERS, on screen MAX_CUE_SECONDS at most;
# a pause between words of over PAUSE_SECONDS starts a new cue; punctuation and a pause of CLAUSE_PAUSE_SECONDS
# end a clause, where a full cue ends.
MAX_LINE_CHARACTERS = 42
MAX_LINES = 2
MAX_CUE_SECONDS = 7.0
PAUSE_SECONDS = 0.5
CLAUSE_PAUSE_SECONDS = 0.2
# Characters a file name keeps as they are; every other byte of the id's UTF-8 is written %XX.
SAFE_CHARACTERS = "_.-"
# Longest file stem kept whole (file systems allow 255 bytes a name); a longer one is cut and given a hash.
MAX_STEM = 200
HASH_CHARACTERS = 16


def encoded_id(item_id: str) -> str:
    """The id percent-encoded: letters, digits and `_.-` kept, anything else (`/`, `%`, `~`, spaces, accents, ...)
    as the %XX of its UTF-8 bytes, a leading dot too (no hidden files, no `..`); `unquote` gives the id back."""
    encoded = quote(item_id, safe=SAFE_CHARACTERS).replace("~", "%7E")  # quote keeps `~`: file_stem's mark
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def file_stem(item_id: str) -> str:
    """An item's subtitle file name without extension: its encoded id, or, past MAX_STEM characters, the
    encoded id's start, `~` (never in an encoded id) and a hash of the whole id."""
    encoded = encoded_id(item_id)
    if len(encoded) <= MAX_STEM:
        return encoded
    digest = hashlib.sha256(item_id.encode()).hexdigest()[:HASH_CHARACTERS]
    return f"{encoded[:MAX_STEM - HASH_CHARACTERS - 1]}~{digest}"


def timestamp(seconds: float, separator: str) -> str:
    """`HH:MM:SS<separator>mmm`, to the nearest millisecond (SRT separates milliseconds by a comma, WebVTT by a dot)."""
    millis = max(0, round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def cues(row: dict[str, Any]) -> list[tuple[float, float, str]]:
    """(start, end, text) of each cue: cut at the row's word times where it has them, else a cue a piece with
    text; the whole audio for an item without segments."""
    if row.get("words"):
        return word_cues(row["words"])
    if row["segments"] is None:
        return [(0.0, row["audio_seconds"] or 0.0, row["text"].strip())] if (row["text"] or "").strip() else []
    return [(piece["start"], piece["end"], piece["text"].strip()) for piece in row["segments"] if (piece["text"] or "").strip()]


def word_cues(words: list[dict[str, Any]]) -> list[tuple[float, float, str]]:
    """The words (`word`, `start`, `end`, each word's text with its leading space) in cues: a word joins the
    cue before it unless a pause comes first or the cue would not fit (`fits`). A full cue ends after its last
    clause end (`_after_last_clause`) where the words after it, with the new one, fit a cue of their own: a cue
    does not end a word or two into the next sentence. A cue's lines are joined by a newline."""
    cues: list[list[dict[str, Any]]] = []
    for word in (word for word in words if word["word"].strip()):
        current = cues[-1] if cues else []
        if current and word["start"] - current[-1]["end"] <= PAUSE_SECONDS and fits([*current, word]):
            current.append(word)
            continue
        carried = _after_last_clause(current) if current and word["start"] - current[-1]["end"] <= PAUSE_SECONDS else []
        if carried and fits([*carried, word]):
            del current[-len(carried):]
            cues.append([*carried, word])
        else:
            cues.append([word])
    return [(cue[0]["start"], cue[-1]["end"], "\n".join(cue_lines(cue))) for cue in cues]


def fits(words: list[dict[str, Any]]) -> bool:
    """Whether the words make one cue: on screen MAX_CUE_SECONDS at most, in MAX_LINES lines at most."""
    return words[-1]["end"] - words[0]["start"] <= MAX_CUE_SECONDS and len(cue_lines(words)) <= MAX_LINES


def _after_last_clause(words: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The words after the last clause end: a word ending in punctuation and followed by a pause of at least
    CLAUSE_PAUSE_SECONDS (so not `Mr.` in `Mr. John`). None where no word but the last ends a clause."""
    ends = [n for n, (word, following) in enumerate(zip(words, words[1:]))
            if unicodedata.category(word["word"].strip()[-1]).startswith("P") and following["start"] - word["end"] >= CLAUSE_PAUSE_SECONDS]
    return words[ends[-1] + 1:] if ends else []


def cue_lines(words: list[dict[str, Any]]) -> list[str]:
    """The words' text in lines of at most MAX_LINE_CHARACTERS, filled in order, broken between words only."""
    filled: list[str] = []
    for word in words:
        joined = (filled[-1] + word["word"]).strip() if filled else ""
        if filled and len(joined) <= MAX_LINE_CHARACTERS:
            filled[-1] = joined
        else:
            filled.append(word["word"].strip())
    return filled


def srt(row: dict[str, Any]) -> str:
    blocks = [f"{n}\n{timestamp(start, ',')} --> {timestamp(end, ',')}\n{text}\n" for n, (start, end, text) in enumerate(cues(row), 1)]
    return "\n".join(blocks)


def vtt(row: dict[str, Any]) -> str:
    blocks = [f"{timestamp(start, '.')} --> {timestamp(end, '.')}\n{text}\n" for start, end, text in cues(row)]
    return "\n".join(["WEBVTT\n", f"NOTE id={encoded_id(row['id'])}\n", *blocks])


def jsonl_line(row: dict[str, Any]) -> str:
    return json.dumps({name: row.get(name) for name in JSONL_COLUMNS}, ensure_ascii=False) + "\n"


def export(predictions: str, output: str, kind: str, storage_options: dict[str, Any] | None = None) -> Counter:
    """Write `kind` files for every item under `predictions` into `output`: OUTPUT/CORPUS/ID.srt|vtt,
    or OUTPUT/CORPUS.jsonl (CORPUS: the part files' folder). Returns counts: `written` items, `skipped`
    (subtitles: an error or no text), `duplicates` (subtitles: an id seen before in its corpus, whose first
    file is kept)."""
    if kind not in FORMATS:
        raise NotaError(f"unknown format {kind!r}: choose one of {', '.join(FORMATS)}")
    options = storage_options or {}
    require_bucket(output, options)
    out_fs, out_root = fsspec.core.url_to_fs(output, **options)
    counts: Counter = Counter()
    for corpus, rows in _corpora(predictions, options):
        if kind == "jsonl":
            write_atomically(out_fs, f"{out_root}/{corpus}.jsonl", partial(_write_lines, rows, counts))
            continue
        written: set[str] = set()
        for row in rows:
            if row["error"] is not None or not cues(row):
                counts["skipped"] += 1
                continue
            if row["id"] in written:
                counts["duplicates"] += 1
                continue
            text = srt(row) if kind == "srt" else vtt(row)
            write_bytes_atomically(out_fs, f"{out_root}/{corpus}/{file_stem(row['id'])}.{kind}", text.encode())
            written.add(row["id"])
            counts["written"] += 1
    return counts


def _write_lines(rows: Iterator[dict[str, Any]], counts: Counter, file: IO[bytes]) -> None:
    for row in rows:
        file.write(jsonl_line(row).encode())
        counts["written"] += 1


def _corpora(predictions: str, options: dict[str, Any]) -> Iterator[tuple[str, Iterator[dict[str, Any]]]]:
    """Each part-file folder (a corpus) and its rows, read one part file at a time, in shard and index order."""
    fs, root = fsspec.core.url_to_fs(predictions, **options)
    folders: dict[str, list[tuple[int, str]]] = {}
    for path in prediction_files(fs, root):
        folder = path.rsplit("/", 1)[0] if "/" in path else ""
        folders.setdefault(folder, []).append((int(PART_NAME.search(path)[1]), path))
    if not folders:
        raise NotaError(f"{predictions} holds no prediction files (part-NNNNN.parquet): check the --predictions URL")
    for folder, parts in sorted(folders.items()):
        paths = [fs.unstrip_protocol(path) for _, path in sorted(parts)]
        yield folder.rsplit("/", 1)[-1], (row for path in paths
                                          for row in read_predictions(path, options, JSONL_COLUMNS).sort_by("index").to_pylist())
