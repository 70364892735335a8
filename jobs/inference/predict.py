"""The predict stage: the model in a Ray actor, one output row per decoded item."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from jobs.inference.devices import (
    DEVICE_FAILURE, OUT_OF_MEMORY, DeviceFailure, actor_device, classify_model_error, end_actor, release_memory,
)
from jobs.inference.settings import JobSettings
from jobs.predictions import OUTPUT_SCHEMA
from nota_model.audio import AudioClip
from nota_model.build import load_model
from nota_model.config import ModelConfig
from nota_model.errors import AudioError, ConfigError
from nota_model.features import ModelFeatures
from nota_model.long_form import LongFormOutput, generate_pieces, piece_features
from nota_model.signals import flags


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
        "segments": None,
        "language": None,
        "language_probability": None,
        "words": None,
        "mean_logprob": None,
        "compression_ratio": None,
        "flags": None,
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
        "actor_cpu_s": None,
        "worker": worker,
        "job_id": settings.job_id,
        "created_at": datetime.now(UTC),
    }


def dry_run_rows(batch: pa.Table, settings: JobSettings) -> pa.Table:
    """The dry run's stage in place of the model: each decoded item's row, text null (`model`: dry-run)."""
    worker = worker_name(DRY_RUN_IDENTITY)
    rows = [output_row(item, settings, DRY_RUN_IDENTITY, worker) for item in batch.drop_columns(["waveform", "features"]).to_pylist()]
    return pa.Table.from_pylist([{k: row[k] for k in OUTPUT_SCHEMA.names} for row in rows], schema=OUTPUT_SCHEMA)


class Predictor:
    """The model in a Ray actor: one per GPU (on the GPU Ray assigned it, in the precision the run claimed) or
    a CPU actor. It takes the features the decode tasks computed (computing them itself for rows without), and
    records in each row `actor_cpu_s`: its batch's CPU time on the actor's thread outside `model.generate`,
    per item."""

    def __init__(self, config: ModelConfig, checkpoint: str | None, settings: JobSettings):
        self.loaded = load_model(config, checkpoint=checkpoint, device=actor_device(), threads=actor_threads())
        self.model = self.loaded.model
        self.settings = settings
        self.worker = worker_name(self.model.device)
        if self.loaded.identity != settings.model_identity:
            raise ConfigError(
                f"this model actor runs {self.loaded.identity} but the run writes {settings.model_identity}: its GPU "
                "differs from the one the run was planned on (bfloat16 from compute capability 8.0; below, float16, "
                "or a float32 LLM for Qwen2-family models); set the model's dtype (--set dtype=float16, or float32 for "
                "a Qwen2-family LLM) so that every GPU runs the same precision"
            )

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            return self._rows(batch)
        except DeviceFailure as err:
            end_actor(err)
            raise

    def _rows(self, batch: pa.Table) -> pa.Table:
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
        """The rows with their pieces' features (shipped by the decode tasks, else computed here); a clip the
        model cannot take gets its error."""
        for row in rows:
            try:
                shipped = row.get("features")
                row["_features"] = ([ModelFeatures.from_bytes(piece) for piece in shipped] if shipped is not None
                                    else piece_features(row["_clip"], row["_pieces"], self.model.config))
            except AudioError as err:
                row.update(error=err.code, error_message=err.message)
        return [row for row in rows if row["error"] is None]

    def _generate(self, rows: list[dict[str, Any]]) -> float:
        """Generates the rows' text; returns the CPU time this thread spent in `model.generate`. A batch out of
        GPU memory is run in halves; one that fails otherwise, item by item, so that one bad item cannot fail
        its batch-mates (`classify_model_error`). A device failure is no item's fault: it raises DeviceFailure.
        The parts run after the `except` block: inside it, the traceback would keep the failed call's frames,
        and so its tensors, alive while they run, and freeing the cache would free nothing."""
        if not rows:
            return 0.0
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            output = generate_pieces(self.model, [row["_clip"] for row in rows], [row["prompt"] for row in rows],
                                     [row["_pieces"] for row in rows], self.settings.batch_size,
                                     features=[row["_features"] for row in rows])
        except Exception as err:  # noqa: BLE001 - a batch failure must not lose its items
            failure, message = classify_model_error(err), f"{type(err).__name__}: {err}"
            if failure == DEVICE_FAILURE:
                raise DeviceFailure(message) from err
        else:
            generate_cpu_s = time.thread_time() - cpu_started
            self._fill(rows, output, time.perf_counter() - started)
            return generate_cpu_s
        if failure == OUT_OF_MEMORY:
            release_memory()
        spent = time.thread_time() - cpu_started
        if len(rows) == 1:
            rows[0].update(error=failure, error_message=message)
            return spent
        parts = [rows[: len(rows) // 2], rows[len(rows) // 2 :]] if failure == OUT_OF_MEMORY else [[row] for row in rows]
        return spent + sum(self._generate(part) for part in parts)

    def _fill(self, rows: list[dict[str, Any]], output: LongFormOutput, model_s: float) -> None:
        """Each row's answer and its signals. Latency and batch size only on rows that reached the model (silence
        does not); `model_s` on every row of the batch, whose work it is."""
        finished = datetime.now(UTC)  # one timestamp a batch: (worker, created_at) names the batch
        for row, answer in zip(rows, output.answers):
            if answer.non_finite:
                row.update(error="non_finite_logits", error_message=(
                    f"the model's scores became inf or NaN running in {self.loaded.identity.rsplit('+', 1)[-1]} (an "
                    "overflow): its text is garbage; run this model in float32 or bfloat16 (--set dtype=...)"))
                continue
            ran = answer.batch_size is not None
            row.update(
                text=answer.text,
                segments=[asdict(segment) for segment in answer.segments],
                language=answer.language,
                language_probability=answer.language_probability,
                words=None if answer.words is None else [asdict(word) for word in answer.words],
                mean_logprob=answer.signals.mean_logprob,
                compression_ratio=answer.signals.compression_ratio,
                flags=flags(answer.signals, row["speech_share"], self.model.config.signals),
                output_tokens=answer.output_tokens,
                ttft_s=output.ttft_s if ran else None,
                tpot_s=output.tpot_s if ran else None,
                batch_size=answer.batch_size,
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
            row["_pieces"] = [tuple(piece) for piece in item["pieces"]]
        return row
