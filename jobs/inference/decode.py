"""The decode stage: each work item's audio bytes decoded, in the read tasks, to the model's waveform, its
pieces and their input features (the model actor then only runs forwards). A dry run, which has no model,
gets neither waveform nor features: only what its rows say (the clip's metadata, the pieces, the errors)."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from jobs.corpus.items import WORK_ITEM_SCHEMA
from jobs.corpus.walk import audio_name
from nota_model.audio import load_audio
from nota_model.config import AudioConfig, ModelConfig
from nota_model.errors import AudioError
from nota_model.long_form import check_pieces, piece_features
from nota_model.segment import plan_pieces

DECODED_SCHEMA = (
    WORK_ITEM_SCHEMA.append(pa.field("waveform", pa.binary()))
    .append(pa.field("clip", pa.string()))  # AudioClip.metadata() as JSON
    .append(pa.field("pieces", pa.list_(pa.list_(pa.int64(), 2))))  # (start, end) samples the model runs
    .append(pa.field("features", pa.list_(pa.binary())))  # each piece's ModelFeatures.to_bytes(), float32
    .append(pa.field("speech_share", pa.float64()))  # segment.PiecePlan.speech_share
)
# A decoded clip of up to 30 s: float32 at 16 kHz, and its features (at most 3000 Whisper frames of up to 128
# bins, 3001 CED frames of 64 bins, float32). A long recording makes its block larger.
MAX_CLIP_BYTES = 30 * 16000 * 4 + (3000 * 128 + 3001 * 64) * 4


def decoded_block(rows: list[dict[str, Any]]) -> pa.Table:
    """Decoded items as one block, sorted by duration, so that the model's batches hold clips of similar length."""
    rows.sort(key=lambda row: json.loads(row["clip"])["seconds"] if row["clip"] else 0.0)
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def decode_item(item: dict[str, Any], data: bytes | None, audio: AudioConfig, features_for: ModelConfig | None = None,
                dry_run: bool = False, skip_silence: bool = True) -> dict[str, Any]:
    """A work item with its decoded audio (`waveform`, `clip`), the pieces the model is to run (`pieces`: the
    whole clip when it fits the model's window or `audio.long_form` is `truncate`, else the long recording's
    segments; none for speech recognition audio without speech, with `skip_silence`) and its `speech_share`,
    and, given a model config, each piece's input features (`features`); or with the error. `data` is the item's
    bytes, None when it already has an error. A `dry_run` item gets no waveform and no features (nothing would
    use them), but the same errors: its pieces are checked against the model's input needs."""
    item.update(waveform=None, clip=None, pieces=None, features=None, speech_share=None)
    if data is not None:
        try:
            whole = audio.long_form == "segment"
            clip = load_audio(data, audio, name=audio_name(item), whole=whole)
            plan = plan_pieces(clip.waveform, item["task"], audio.max_seconds, skip_silence)
            item.update(clip=json.dumps(clip.metadata()), pieces=plan.pieces, speech_share=plan.speech_share)
            if dry_run:
                if features_for is not None:
                    check_pieces(clip, plan.pieces, features_for)
            else:
                features = None if features_for is None else [piece.to_bytes() for piece in piece_features(clip, plan.pieces, features_for)]
                item.update(waveform=clip.waveform.tobytes(), features=features)
        except AudioError as err:
            item.update(error=err.code, error_message=err.message, clip=None, pieces=None, speech_share=None)
    return item
