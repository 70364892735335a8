"""The decode stage: each work item's audio bytes decoded to the model's waveform, in the read tasks."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from jobs.manifest import WORK_ITEM_SCHEMA, read_item_bytes
from nota_model.audio import load_audio
from nota_model.config import AudioConfig
from nota_model.errors import AudioError

DECODED_SCHEMA = WORK_ITEM_SCHEMA.append(pa.field("waveform", pa.binary())).append(
    pa.field("clip", pa.string())  # AudioClip.metadata() as JSON
)
# A decoded clip is float32 at 16 kHz, at most 30 s.
MAX_CLIP_BYTES = 30 * 16000 * 4


def read_item_audio(item: dict[str, Any], storage_options: dict[str, Any]) -> bytes | None:
    """The bytes of an item-list item's audio file (one request), or None with the item's error set."""
    if item["error"] is not None:
        return None
    try:
        return read_item_bytes(item, storage_options)
    except AudioError as err:
        item.update(error=err.code, error_message=err.message)
        return None


def decoded_block(rows: list[dict[str, Any]]) -> pa.Table:
    """Decoded items as one block, sorted by duration, so that the model's batches hold clips of similar length."""
    rows.sort(key=lambda row: json.loads(row["clip"])["seconds"] if row["clip"] else 0.0)
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def decode_item(item: dict[str, Any], data: bytes | None, audio: AudioConfig) -> dict[str, Any]:
    """A work item with its decoded audio (`waveform`, `clip`), or with the decoding error; `data` is the item's
    bytes, None when it already has an error."""
    item.update(waveform=None, clip=None)
    if data is not None:
        try:
            clip = load_audio(data, audio, name=item.get("member") or item["audio"])
            item.update(waveform=clip.waveform.tobytes(), clip=json.dumps(clip.metadata()))
        except AudioError as err:
            item.update(error=err.code, error_message=err.message)
    return item
