"""A cache of the frozen Whisper encoder's states of a corpus, so that training runs the encoder once per clip.

Layout under the cache directory, one pair of files per corpus shard (written atomically, so a killed build
resumes at the first shard it has not finished):

    states-NNNNN.f16       the shard's items' encoder states, float16, (frames, width) each, back to back
    index-NNNNN.parquet    one row per item: id, task, prompt, reference, seconds, offset and frames into the .f16
    CACHE.json             what the states depend on (encoder weights, audio context, audio preparation)

The states are `NotaModel.speech_states`, exactly what inference computes for the same clip; training turns them
into audio tokens with `NotaModel.tokens_from_speech_states`. Items that fail to decode are left out and counted.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import structlog
import torch

from jobs.corpus.items import WorkItemChecks
from jobs.corpus.manifest_schema import Manifest
from jobs.corpus.walk import audio_name, walk, whole
from jobs.training.data import left_out
from nota_model.audio import AudioClip, load_audio
from nota_model.config import NotaConfig
from nota_model.errors import AudioError, ConfigError
from nota_model.model import NotaModel
from nota_model.storage import resolve, sha256_of

INDEX_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("reference", pa.list_(pa.string())),
    pa.field("seconds", pa.float64(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),  # first row of the item's states in the shard's .f16 file
    pa.field("frames", pa.int32(), nullable=False),
])
CACHE_FILE = "CACHE.json"
DONE_FILE = "DONE.json"
ENCODE_BATCH = 16

log = structlog.get_logger("nota.features")


def cache_key(config: NotaConfig) -> dict[str, Any]:
    """What cached states depend on: the encoder's weights and size, how much input it sees, how audio is prepared."""
    encoder = config.speech_encoder
    weights = resolve(encoder.path) / "model.safetensors" if encoder.path else None
    return {
        "speech_encoder": encoder.path, "weights_sha256": sha256_of(weights) if weights else None,
        "width": encoder.width, "audio_context": encoder.audio_context.model_dump(), "audio": config.audio.model_dump(),
    }


def build_cache(model: NotaModel, manifest: Manifest, directory: Path) -> dict[str, int]:
    """Encode every good item of `manifest` with a reference into `directory`, shard by shard as the corpus walk
    gives them with their audio (ids checked unique across the corpus, as `Manifest.work_items` does), skipping
    shards already there (walked without audio, for their ids). Returns counts: items cached, and items left out
    by reason."""
    if (directory / DONE_FILE).exists():
        return json.loads((directory / DONE_FILE).read_text())
    directory.mkdir(parents=True, exist_ok=True)
    _check_key(directory, cache_key(model.config))
    checks = WorkItemChecks(manifest)
    counts: Counter = Counter()
    for shard in manifest.input_shards():
        index_path = directory / f"index-{shard.number:05d}.parquet"
        if index_path.exists():
            for _ in walk(whole(shard), manifest, checks, with_audio=False):
                pass
            counts["cached"] += pq.read_metadata(index_path).num_rows
            continue
        shard_counts = _encode_shard(model, walk(whole(shard), manifest, checks), directory, shard.number)
        counts.update(shard_counts)
        log.info("feature_cache_shard", directory=str(directory), shard=shard.number, items=shard_counts.total(), **counts)
    (directory / DONE_FILE).write_text(json.dumps(dict(counts)))
    return dict(counts)


def _check_key(directory: Path, key: dict[str, Any]) -> None:
    path = directory / CACHE_FILE
    if path.exists() and json.loads(path.read_text()) != key:
        raise ConfigError(f"{directory} caches states of another encoder or audio set-up; use another directory")
    path.write_text(json.dumps(key, indent=1))


def _encode_shard(model: NotaModel, items: Iterable[tuple[dict[str, Any], bytes | None]], directory: Path,
                  shard: int) -> Counter:
    counts: Counter = Counter()
    good: list[tuple[dict[str, Any], AudioClip]] = []
    for row, data in items:
        reason = left_out(row)
        if reason is not None:
            counts[reason] += 1
            continue
        try:
            good.append((row, load_audio(data, model.config.audio, name=audio_name(row))))
        except AudioError as err:
            counts[err.code] += 1
    index, offset = [], 0
    states_path = directory / f"states-{shard:05d}.f16"
    with open(states_path.with_suffix(".part"), "wb") as file:
        for start in range(0, len(good), ENCODE_BATCH):
            batch = good[start : start + ENCODE_BATCH]
            for (row, clip), states in zip(batch, model.speech_states([clip for _, clip in batch])):
                values = states.float().cpu().numpy().astype(np.float16)
                file.write(values.tobytes())
                index.append({"id": row["id"], "task": row["task"], "prompt": row["prompt"], "reference": row["reference"],
                              "seconds": clip.seconds, "offset": offset, "frames": len(values)})
                offset += len(values)
    os.replace(states_path.with_suffix(".part"), states_path)
    part = directory / f"index-{shard:05d}.part"
    pq.write_table(pa.Table.from_pylist(index, schema=INDEX_SCHEMA), part)
    os.replace(part, directory / f"index-{shard:05d}.parquet")  # last: marks the shard done
    counts["cached"] += len(index)
    return counts


@dataclass
class CachedStates:
    """A built cache, memory-mapped: `rows` (the index, in shard order) and each row's states."""

    rows: list[dict[str, Any]]
    arrays: dict[int, np.ndarray]
    width: int

    @classmethod
    def open(cls, directory: Path, config: NotaConfig) -> CachedStates:
        path = directory / CACHE_FILE
        if not path.exists():
            raise ConfigError(f"{directory} holds no feature cache: jobs.train builds it before training "
                              "when datasets.feature_cache names its parent")
        if json.loads(path.read_text()) != cache_key(config):
            raise ConfigError(f"{directory} caches states of another encoder or audio set-up than the model's")
        width = config.speech_encoder.width
        rows, arrays = [], {}
        for index_path in sorted(directory.glob("index-*.parquet")):
            shard = int(index_path.stem.split("-")[1])
            arrays[shard] = np.memmap(directory / f"states-{shard:05d}.f16", dtype=np.float16, mode="r").reshape(-1, width)
            rows += [{**row, "shard": shard} for row in pq.read_table(index_path).to_pylist()]
        if not rows:
            raise ConfigError(f"the feature cache {directory} is empty")
        return cls(rows, arrays, width)

    def states(self, row: dict[str, Any]) -> torch.Tensor:
        values = self.arrays[row["shard"]][row["offset"] : row["offset"] + row["frames"]]
        return torch.from_numpy(np.asarray(values, dtype=np.float32))


def cache_directories(root: Path, manifests: Sequence[Manifest]) -> list[Path]:
    """Each training manifest's cache: a subdirectory of `datasets.feature_cache` named after its corpus."""
    names = [manifest.name for manifest in manifests]
    if len(set(names)) != len(names):
        raise ConfigError(f"datasets.feature_cache needs training manifests with distinct names, not {names}")
    return [root / name for name in names]


def cached_training_rows(caches: Sequence[CachedStates]) -> list[dict[str, Any]]:
    """One row per (cached item, reference), in cache and item order; `cache` names the cache it is in."""
    return [{"cache": number, "shard": row["shard"], "offset": row["offset"], "frames": row["frames"], "id": row["id"],
             "task": row["task"], "prompt": row["prompt"], "answer": answer}
            for number, cache in enumerate(caches) for row in cache.rows for answer in row["reference"]]
