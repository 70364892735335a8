"""A training run's data: manifests to rows on the driver (one per item and reference: the corpus walked by
`Manifest.work_items`), a row to its decoded clip on the worker (a training step's items come in random order:
each one's audio is read on its own, `read_item_bytes`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from jobs.corpus.fetch import read_item_bytes
from jobs.corpus.manifest_schema import Manifest
from jobs.corpus.walk import audio_name
from nota_model.audio import AudioClip, load_audio
from nota_model.model import NotaModel


def training_rows(manifests: Sequence[Manifest]) -> tuple[list[dict[str, Any]], Counter]:
    """One row per (good item, reference), in manifest and item order; and what was left out, by reason."""
    rows, skipped = [], Counter()
    for source, manifest in enumerate(manifests):
        for item in manifest.work_items().to_pylist():
            reason = left_out(item)
            if reason is not None:
                skipped[reason] += 1
                continue
            for answer in item["reference"]:
                rows.append({**_audio_fields(item, source), "answer": answer})
    return rows, skipped


def validation_rows(manifest: Manifest, max_items: int | None, source: int) -> tuple[list[dict[str, Any]], Counter]:
    """One row per good item with a reference (all its references), the first `max_items`."""
    rows, skipped = [], Counter()
    for item in manifest.work_items().to_pylist():
        reason = left_out(item)
        if reason is not None:
            skipped[reason] += 1
            continue
        rows.append({**_audio_fields(item, source), "reference": item["reference"]})
    return rows[:max_items], skipped


def left_out(item: dict[str, Any]) -> str | None:
    """Why a work item cannot serve training: its error, else `no_reference`; None for a good item with a reference."""
    return item["error"] or (None if item["reference"] else "no_reference")


def _audio_fields(item: dict[str, Any], source: int) -> dict[str, Any]:
    keys = ("id", "audio", "offset", "size", "member", "task", "prompt")
    return {**{key: item[key] for key in keys}, "source": source}


def decode_row(row: dict[str, Any], storage_options: Sequence[dict[str, Any]], model: NotaModel) -> AudioClip:
    data = read_item_bytes(row, storage_options[row["source"]])
    return load_audio(data, model.config.audio, name=audio_name(row))
