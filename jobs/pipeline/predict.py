"""The predict stage: the model in a Ray actor, one output row per decoded item."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from jobs.outputs import OUTPUT_SCHEMA
from jobs.pipeline.settings import JobSettings
from nota_model.audio import AudioClip
from nota_model.build import load_model
from nota_model.config import ModelConfig
from nota_model.decoding import GenerationOutput
from nota_model.errors import ConfigError


def actor_threads() -> int:
    """The model's CPU threads: as many as the CPUs Ray reserved for this actor (Ray itself sets
    OMP_NUM_THREADS to their whole part, which leaves 1.75 CPUs one thread)."""
    return max(1, math.ceil(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)))


def worker_name(device: object) -> str:
    """host:pid:node=first 8 hex of the Ray node id:gpu=ids:device of the calling actor."""
    gpus = ",".join(str(gpu) for gpu in ray.get_gpu_ids()) or "none"
    node = ray.get_runtime_context().get_node_id()[:8]
    return f"{socket.gethostname()}:{os.getpid()}:node={node}:gpu={gpus}:{device}"


DRY_RUN_IDENTITY = "dry-run"


def output_row(item: dict[str, Any], settings: JobSettings, model_identity: str, worker: str) -> dict[str, Any]:
    """A decoded item's output row before the model answers: what its audio is, who makes the row."""
    clip = json.loads(item["clip"]) if item["clip"] else {}
    return {
        **item,
        "corpus": settings.corpus,
        "text": None,
        "audio_seconds": clip.get("original_seconds"),
        "truncated": clip.get("truncated"),
        "sample_rate": clip.get("original_sample_rate"),
        "channels": clip.get("original_channels"),
        "model": model_identity,
        "decoding": settings.decoding,
        "output_tokens": None,
        "ttft_s": None,
        "tpot_s": None,
        "batch_size": None,
        "model_s": None,
        "worker": worker,
        "job_id": settings.job_id,
        "created_at": datetime.now(UTC),
    }


def dry_run_rows(batch: pa.Table, settings: JobSettings) -> pa.Table:
    """The dry run's stage in place of the model: each decoded item's row, text null (`model`: dry-run)."""
    worker = worker_name(DRY_RUN_IDENTITY)
    rows = [output_row(item, settings, DRY_RUN_IDENTITY, worker) for item in batch.drop_columns(["waveform"]).to_pylist()]
    return pa.Table.from_pylist([{k: row[k] for k in OUTPUT_SCHEMA.names} for row in rows], schema=OUTPUT_SCHEMA)


class Predictor:
    """The model in a Ray actor: one per GPU (fp16 by default) or a CPU actor."""

    def __init__(self, config: ModelConfig, checkpoint: str | None, settings: JobSettings):
        self.loaded = load_model(config, checkpoint=checkpoint, threads=actor_threads())
        self.model = self.loaded.model
        self.settings = settings
        self.worker = worker_name(self.model.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._output_row(item) for item in batch.to_pylist()]
        runnable = [row for row in rows if row["error"] is None]
        for row in runnable:
            try:
                row["prompt"] = self.model.prompt_for(row["task"], row["prompt"])
            except ConfigError as err:
                row.update(error="invalid_prompt", error_message=str(err))
        self._generate([row for row in runnable if row["error"] is None])
        return pa.Table.from_pylist([{k: row[k] for k in OUTPUT_SCHEMA.names} for row in rows], schema=OUTPUT_SCHEMA)

    def _generate(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        started = time.perf_counter()
        try:
            output = self.model.generate([row["_clip"] for row in rows], [row["prompt"] for row in rows])
        except Exception as err:  # noqa: BLE001 - a batch failure must not lose its items
            if len(rows) == 1:
                rows[0].update(error="model_error", error_message=f"{type(err).__name__}: {err}")
                return
            for row in rows:  # one at a time, so that one bad item cannot fail its batch-mates
                self._generate([row])
            return
        self._fill(rows, output, time.perf_counter() - started)

    def _fill(self, rows: list[dict[str, Any]], output: GenerationOutput, model_s: float) -> None:
        finished = datetime.now(UTC)  # one timestamp a batch: (worker, created_at) names the batch
        for index, row in enumerate(rows):
            row.update(
                text=output.texts[index],
                output_tokens=output.output_tokens[index],
                ttft_s=output.ttft_s,
                tpot_s=output.tpot_s,
                batch_size=len(rows),
                model_s=model_s,
                created_at=finished,
            )

    def _output_row(self, item: dict[str, Any]) -> dict[str, Any]:
        row = output_row(item, self.settings, self.loaded.identity, self.worker)
        clip = json.loads(item["clip"]) if item["clip"] else {}
        if item["waveform"] is not None:
            waveform = np.frombuffer(item["waveform"], dtype=np.float32)
            fields = {k: v for k, v in clip.items() if k != "waveform"}
            row["_clip"] = AudioClip(waveform=waveform, **fields)
        return row
