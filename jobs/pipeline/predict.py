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
from nota_model.errors import AudioError, ConfigError
from nota_model.features import ModelFeatures, compute_features


def actor_threads() -> int:
    """The model's CPU threads: as many as the CPUs Ray reserved for this actor (Ray itself sets
    OMP_NUM_THREADS to their whole part, which leaves 1.75 CPUs one thread)."""
    return max(1, math.ceil(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)))


def worker_name(device: object) -> str:
    """host:pid:node=first 8 hex of the Ray node id:gpu=ids:device of the calling actor."""
    gpus = ",".join(str(gpu) for gpu in ray.get_gpu_ids()) or "none"
    node = ray.get_runtime_context().get_node_id()[:8]
    return f"{socket.gethostname()}:{os.getpid()}:node={node}:gpu={gpus}:{device}"


class Predictor:
    """The model in a Ray actor: one per GPU (fp16 by default) or a CPU actor. It takes the features the decode
    tasks computed (computing them itself for rows without), and records in each row `actor_cpu_s`: its
    batch's CPU time on the actor's thread outside `model.generate`, per item."""

    def __init__(self, config: ModelConfig, checkpoint: str | None, settings: JobSettings):
        self.loaded = load_model(config, checkpoint=checkpoint, threads=actor_threads())
        self.model = self.loaded.model
        self.settings = settings
        self.worker = worker_name(self.model.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        cpu_started = time.thread_time()
        rows = [self._output_row(item) for item in batch.to_pylist()]
        runnable = [row for row in rows if row["error"] is None]
        for row in runnable:
            try:
                row["prompt"] = self.model.prompt_for(row["task"], row["prompt"])
            except ConfigError as err:
                row.update(error="invalid_prompt", error_message=str(err))
        generate_cpu_s = self._generate(self._with_features([row for row in runnable if row["error"] is None]))
        table = pa.Table.from_pylist([{k: row[k] for k in OUTPUT_SCHEMA.names} for row in rows], schema=OUTPUT_SCHEMA)
        actor_cpu_s = (time.thread_time() - cpu_started - generate_cpu_s) / max(1, len(rows))
        column = OUTPUT_SCHEMA.get_field_index("actor_cpu_s")
        return table.set_column(column, OUTPUT_SCHEMA.field(column), pa.array([actor_cpu_s] * len(rows), pa.float64()))

    def _with_features(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows that have their features (shipped by the decode tasks, else computed here); a clip the
        model cannot take gets its error."""
        for row in rows:
            try:
                shipped = row.get("features")
                row["_features"] = ModelFeatures.from_bytes(shipped) if shipped else compute_features([row["_clip"]], self.model.config)[0]
            except AudioError as err:
                row.update(error=err.code, error_message=err.message)
        return [row for row in rows if row["error"] is None]

    def _generate(self, rows: list[dict[str, Any]]) -> float:
        """Generates the rows' text; returns the CPU time this thread spent in `model.generate`."""
        if not rows:
            return 0.0
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            output = self.model.generate([row["_clip"] for row in rows], [row["prompt"] for row in rows],
                                         features=[row["_features"] for row in rows])
        except Exception as err:  # noqa: BLE001 - a batch failure must not lose its items
            if len(rows) == 1:
                rows[0].update(error="model_error", error_message=f"{type(err).__name__}: {err}")
                return time.thread_time() - cpu_started
            # one at a time, so that one bad item cannot fail its batch-mates
            return time.thread_time() - cpu_started + sum(self._generate([row]) for row in rows)
        generate_cpu_s = time.thread_time() - cpu_started
        self._fill(rows, output, time.perf_counter() - started)
        return generate_cpu_s

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
        clip = json.loads(item["clip"]) if item["clip"] else {}
        row = {
            **item,
            "corpus": self.settings.corpus,
            "text": None,
            "audio_seconds": clip.get("original_seconds"),
            "truncated": clip.get("truncated"),
            "sample_rate": clip.get("original_sample_rate"),
            "channels": clip.get("original_channels"),
            "model": self.loaded.identity,
            "decoding": self.settings.decoding,
            "output_tokens": None,
            "ttft_s": None,
            "tpot_s": None,
            "batch_size": None,
            "model_s": None,
            "actor_cpu_s": None,
            "worker": self.worker,
            "job_id": self.settings.job_id,
            "created_at": datetime.now(UTC),
        }
        if item["waveform"] is not None:
            waveform = np.frombuffer(item["waveform"], dtype=np.float32)
            fields = {k: v for k, v in clip.items() if k != "waveform"}
            row["_clip"] = AudioClip(waveform=waveform, **fields)
        return row
