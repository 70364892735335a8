"""Batch inference over a corpus on Ray Data: one Parquet row per input item, the answer or an error.

    python -m jobs.infer --manifest M --model CONFIG_OR_PRESET [--checkpoint C] --output URL

Runs on the current Ray cluster (`RAY_ADDRESS`, as under `ray job submit`) or starts a local one.
Stages: work items (driver) -> read and decode audio (CPU tasks) -> the model (an actor pool: one
actor per GPU in the model's half dtype, or CPU actors) -> Parquet files, one per input shard, written
by the driver as soon as a shard is complete. A rerun with the same output skips complete shards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from jobs import logs, report
from jobs.manifest import WORK_ITEM_SCHEMA, Manifest, load_manifest, read_item_bytes
from jobs.outputs import OUTPUT_SCHEMA, OutputStore
from jobs.score import add_scoring_arguments, score
from nota_model.audio import AudioClip, load_audio
from nota_model.build import load_model, model_identity, random_parts
from nota_model.config import AudioConfig, ModelConfig, load_config
from nota_model.decoding import GenerationOutput
from nota_model.errors import AudioError, ConfigError
from nota_model.transcribe import parse_overrides

DECODED_SCHEMA = WORK_ITEM_SCHEMA.append(pa.field("waveform", pa.binary())).append(
    pa.field("clip", pa.string())  # AudioClip.metadata() as JSON
)
BLOCKS_PER_ACTOR = 4
# A decode block holds up to this many model batches: its clips are sorted by duration, so that each batch
# holds clips of similar length, and every batch cut from it is full.
BATCHES_PER_BLOCK = 4
# A decoded clip is float32 at 16 kHz, at most 30 s.
MAX_CLIP_BYTES = 30 * 16000 * 4
# On a node without GPUs decoding gets this share of a CPU, the model actors the rest.
CPU_NODE_DECODE_CPUS = 0.25
ACTOR_START_TIMEOUT_S = 900


@dataclass(frozen=True)
class JobSettings:
    corpus: str
    job_id: str
    model_identity: str
    decoding: str


def decode_audio_batch(batch: pa.Table, audio: AudioConfig, storage_options: dict[str, Any]) -> pa.Table:
    """Read and decode each work item's audio; a failure becomes the item's error. Rows leave sorted by
    duration, so that the model's batches hold clips of similar length."""
    rows = []
    for item in batch.to_pylist():
        item.update(waveform=None, clip=None)
        if item["error"] is None:
            try:
                clip = load_audio(read_item_bytes(item, storage_options), audio, name=item.get("member") or item["audio"])
                item.update(waveform=clip.waveform.tobytes(), clip=json.dumps(clip.metadata()))
            except AudioError as err:
                item.update(error=err.code, error_message=err.message)
        rows.append(item)
    rows.sort(key=lambda row: json.loads(row["clip"])["seconds"] if row["clip"] else 0.0)
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


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
            "worker": self.worker,
            "job_id": self.settings.job_id,
            "created_at": datetime.now(UTC),
        }
        if item["waveform"] is not None:
            waveform = np.frombuffer(item["waveform"], dtype=np.float32)
            fields = {k: v for k, v in clip.items() if k != "waveform"}
            row["_clip"] = AudioClip(waveform=waveform, **fields)
        return row


class ShardCollector:
    """Gathers result rows per shard; writes a shard's file once all its items are in."""

    def __init__(self, store: OutputStore, expected: dict[int, int]):
        self.store = store
        self.expected = expected
        self.rows: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
        self.written: set[int] = set()

    def add(self, row: dict[str, Any]) -> None:
        shard = row["shard"]
        if shard in self.written:  # a late copy from a redone batch: the shard is complete already
            return
        self.rows[shard][row["index"]] = row  # a redone batch replaces, never duplicates
        if len(self.rows[shard]) == self.expected[shard]:
            self._write(shard)

    def finish(self, pending: pa.Table, settings: JobSettings) -> None:
        """Items the pipeline never returned (it should not happen) still get a row: an error."""
        for item in pending.to_pylist():
            if item["shard"] not in self.written and item["index"] not in self.rows[item["shard"]]:
                self.rows[item["shard"]][item["index"]] = lost_row(item, settings)
        for shard in sorted(set(self.rows) - set(self.written)):
            self._write(shard)

    def _write(self, shard: int) -> None:
        self.store.write_shard(shard, list(self.rows.pop(shard).values()))
        self.written.add(shard)


def lost_row(item: dict[str, Any], settings: JobSettings) -> dict[str, Any]:
    return {
        **{name: None for name in OUTPUT_SCHEMA.names},
        **{k: item[k] for k in ("id", "shard", "index", "source", "audio", "task", "prompt", "reference")},
        "corpus": settings.corpus,
        "error": "lost",
        "error_message": "the pipeline returned no result for this item",
        "model": settings.model_identity,
        "decoding": settings.decoding,
        "job_id": settings.job_id,
        "created_at": datetime.now(UTC),
    }


def build_dataset(pending: pa.Table, manifest: Manifest, config: ModelConfig, args: argparse.Namespace, settings: JobSettings,
                  predictor: type[Predictor] = Predictor, predictor_kwargs: dict[str, Any] | None = None) -> ray.data.Dataset:
    gpus = int(ray.cluster_resources().get("GPU", 0))
    on_gpu = args.accelerator == "gpu" or (args.accelerator == "auto" and gpus > 0)
    pool = args.pool_size or max(gpus, 1)
    sizing = resource_sizing(on_gpu, pool, args.cpus_per_actor, args.decode_cpus)
    block_rows = decode_block_rows(pending.num_rows, args.batch_size, pool)
    context = ray.data.DataContext.get_current()
    # Start feeding the model once the whole starting pool is up, so that no GPU idles while one actor takes
    # all. Set before the first dataset is made: a dataset keeps a copy of the context it was made in.
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    # A decoded block must stay one block, so that the model's batches cut from it are all full.
    context.target_max_block_size = max(context.target_max_block_size or 0, 2 * block_rows * MAX_CLIP_BYTES)
    blocks = [pending.slice(start, block_rows) for start in range(0, pending.num_rows, block_rows)]
    decoded = ray.data.from_arrow(blocks).map_batches(
        decode_audio_batch,
        batch_size=block_rows,
        batch_format="pyarrow",
        fn_kwargs={"audio": config.audio, "storage_options": manifest.storage_options},
        num_cpus=sizing.decode_cpus,
    )
    return decoded.map_batches(
        predictor,
        batch_size=args.batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={"config": config, "checkpoint": args.checkpoint, "settings": settings, **(predictor_kwargs or {})},
        compute=ray.data.ActorPoolStrategy(min_size=pool, max_size=max(pool, args.max_pool_size or pool)),
        num_gpus=1 if on_gpu else 0,
        num_cpus=sizing.actor_cpus,
    )  # Ray Data restarts a lost actor and retries its batches by default (max_restarts=-1, max_task_retries=-1)


@dataclass(frozen=True)
class ResourceSizing:
    actor_cpus: float
    decode_cpus: float


def resource_sizing(on_gpu: bool, pool: int, actor_cpus: float | None, decode_cpus: float | None) -> ResourceSizing:
    """CPUs for each model actor and each decode task. A GPU actor needs one CPU to feed its GPU and decoding
    takes whole CPUs beside it. Without GPUs the model is the work: decoding gets a small share of a node and
    the actors on it split the rest, so that the model's threads have the cores and decoding never starves it."""
    if on_gpu:
        return ResourceSizing(actor_cpus or 1.0, decode_cpus or 1.0)
    decode_cpus = decode_cpus or CPU_NODE_DECODE_CPUS
    if actor_cpus is None:
        node_cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]
        actors_per_node = -(-pool // max(1, sum(1 for cpus in node_cpus if cpus >= 1)))
        actor_cpus = max(1.0, (max(node_cpus, default=1.0) - decode_cpus) / actors_per_node)
    return ResourceSizing(actor_cpus, decode_cpus)


def decode_block_rows(items: int, batch_size: int, pool: int) -> int:
    """Rows of a decode block: a whole number of model batches, up to BATCHES_PER_BLOCK, and few enough
    that a small corpus still gives several blocks to each starting actor."""
    batches = -(-items // (BLOCKS_PER_ACTOR * pool * batch_size))
    return batch_size * max(1, min(BATCHES_PER_BLOCK, batches))


def submission_id() -> str | None:
    """The `ray job submit` id of this driver: Ray hands it over in the job config's metadata."""
    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return config.get("metadata", {}).get("job_submission_id")


def run(args: argparse.Namespace, predictor: type[Predictor] = Predictor, predictor_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    job_id = args.job_id or submission_id() or f"job-{uuid.uuid4().hex[:12]}"
    log = logs.configure(job_id)
    storage_options = json.loads(args.storage_options)
    manifest = load_manifest(args.manifest, storage_options)
    config = load_config(args.model, parse_overrides(args.set))
    identity = model_identity(config, args.checkpoint)
    settings = JobSettings(manifest.name, job_id, identity, config.decoding.model_dump_json())
    store = OutputStore(args.output, manifest.name, storage_options)
    store.claim({"model": identity, "decoding": settings.decoding})

    items = manifest.work_items()
    done = store.completed_shards()
    pending = items.filter(pa.compute.invert(pa.compute.is_in(items["shard"], pa.array(sorted(done), pa.int32()))))
    log.info("job_start", corpus=manifest.name, model=identity, items=items.num_rows, pending=pending.num_rows,
             shards_done=len(done), ray=ray.cluster_resources())
    logs.headline(f"nota-batch job {job_id}: {manifest.name}, {pending.num_rows} of {items.num_rows} items to run, "
                  f"model {identity}", sys.stderr)
    untrained = random_parts(config, args.checkpoint)
    if untrained:
        log.warning("random_weights", parts=untrained, meaning="the text of this run is MEANINGLESS")
    collector = ShardCollector(store, dict(zip(*np.unique(pending["shard"].to_numpy(), return_counts=True))))
    audio_seconds, processed = 0.0, 0
    if pending.num_rows:
        for batch in build_dataset(pending, manifest, config, args, settings, predictor, predictor_kwargs).iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                collector.add(row)
                processed += 1
                audio_seconds += row["audio_seconds"] or 0.0
    collector.finish(pending, settings)
    wall = time.perf_counter() - started
    errors = [e for e in store.read_column("error") if e is not None]
    summary = {
        "corpus": manifest.name, "job_id": job_id, "model": identity, "output": args.output,
        "items": items.num_rows, "errors": len(errors), "error_codes": {c: errors.count(c) for c in sorted(set(errors))},
        "items_this_run": processed, "shards_skipped": len(done), "shards_written": len(collector.written),
        "audio_seconds_this_run": round(audio_seconds, 3), "wall_s": round(wall, 3),
        "items_per_s": round(processed / wall, 3), "x_real_time": round(audio_seconds / wall, 3),
        "finished_at": datetime.now(UTC).isoformat(),
        "random_weights": list(untrained),
    }
    store.write_summary(summary)
    log.info("job_done", **summary)
    if not args.no_score:
        summary["metrics"] = f"{store.url.rstrip('/')}/{manifest.name}/_scores"
        summary["groups"] = score(f"{store.url.rstrip('/')}/{manifest.name}", summary["metrics"], args.references,
                                  args.spice_lib, storage_options=storage_options)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="corpus manifest (YAML), path or URL")
    parser.add_argument("--model", required=True, help="preset name or YAML config")
    parser.add_argument("--checkpoint", help="trained parameters (seed .pth or safetensors), path or URL")
    parser.add_argument("--output", required=True, help="output URL (local path, s3://...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    parser.add_argument(
        "--storage-options", default="{}", metavar="JSON",
        help="fsspec options for the manifest, the corpus and the output, e.g. an S3 endpoint; credentials "
        "belong in the standard AWS variables",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="items per model batch")
    parser.add_argument("--pool-size", type=int, help="model actors to start with (default: one per GPU, else 1)")
    parser.add_argument("--max-pool-size", type=int, help="let the pool grow to this many as GPU nodes join")
    parser.add_argument(
        "--cpus-per-actor", type=float,
        help="CPUs reserved per model actor; its model runs as many threads (default: 1 with GPUs; without GPUs, "
        "a node's CPUs less the decode share, split between the actors on it)",
    )
    parser.add_argument(
        "--decode-cpus", type=float,
        help=f"CPUs reserved per audio decoding task (default: 1 with GPUs, {CPU_NODE_DECODE_CPUS} without)",
    )
    parser.add_argument(
        "--accelerator", choices=("auto", "gpu", "cpu"), default="auto",
        help="auto: one GPU per model actor if the cluster has GPUs when the job starts; gpu: always (on an "
        "autoscaling cluster whose GPU nodes join later); cpu: never",
    )
    parser.add_argument("--job-id", help="default: the Ray job submission id, else a fresh one")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any item has an error")
    parser.add_argument("--no-score", action="store_true", help="skip scoring the corpus at the end (OUTPUT/NAME/_scores)")
    add_scoring_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.ray_data_warnings_to_file()
    ray.init(address=os.environ.get("RAY_ADDRESS"))
    summary = run(args)
    groups = summary.pop("groups", None)
    logs.headline(f"nota-batch job {summary['job_id']} done: {summary['items_this_run']} items in {summary['wall_s']} s, "
                  f"{summary['errors']} errors, output {summary['output']}", sys.stdout)
    print(json.dumps(summary), flush=True)
    if groups is not None:
        print(report.summary(groups), flush=True)
    return 1 if args.strict and summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
