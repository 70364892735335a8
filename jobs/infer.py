"""Batch inference over a corpus on Ray Data: one Parquet row per input item, the answer or an error.

    python -m jobs.infer --manifest M --model CONFIG_OR_PRESET [--checkpoint C] --output URL

Runs on the current Ray cluster (`RAY_ADDRESS`, as under `ray job submit`) or starts a local one.
Stages, all on the cluster: read and decode (a read task per input shard: a tar shard streamed front to
back, or rows of an item list) -> the model (an actor pool: one actor per GPU in the model's half dtype,
or CPU actors; `--dry-run`: no model) -> write (rows staged per shard; a shard's Parquet file committed
whole once complete). The driver plans the read tasks from shard URLs and gets a few numbers per block.
A rerun with the same output skips complete shards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pyarrow.compute as pc
import ray

from jobs import logs
from jobs.cli import module_entry
from jobs.corpus.manifest import load_manifest
from jobs.inference.dataset import CPU_NODE_DECODE_CPUS, build_dataset, finish_shards
from jobs.inference.plan import ReadPlan
from jobs.inference.predict import DRY_RUN_IDENTITY, Predictor
from jobs.inference.settings import JobSettings
from jobs.inference.write import Commit, ShardStaging
from jobs.predictions import OutputStore
from jobs.score import add_scoring_arguments
from jobs.scoring import report
from jobs.scoring.score import score
from nota_model.build import model_identity, random_parts
from nota_model.config import load_config
from nota_model.overrides import parse_overrides


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
    long_audio = [f"audio.long_audio={args.long_audio}"] if args.long_audio else []
    config = load_config(args.model, parse_overrides([*args.set, *long_audio]))
    identity = DRY_RUN_IDENTITY if args.dry_run else model_identity(config, args.checkpoint)
    settings = JobSettings(manifest.name, job_id, identity, config.decoding.model_dump_json(), args.batch_size)
    store = OutputStore(args.output, manifest.name, storage_options)
    store.claim({"model": identity, "decoding": settings.decoding, "long_audio": config.audio.long_audio})

    done = store.completed_shards()
    plan = ReadPlan.of(manifest, done)
    staging = ShardStaging(store)
    staging.remove()  # rows staged by an interrupted run: their shards are read again
    log.info("job_start", corpus=manifest.name, model=identity, shards=plan.shards, items=plan.items,
             pending_items=plan.pending_items, shards_done=len(done), ray=ray.cluster_resources())
    logs.headline(f"nota-batch job {job_id}: {manifest.name}, {plan.describe()} to run, model {identity}", sys.stderr)
    untrained = [] if args.dry_run else random_parts(config, args.checkpoint)
    if untrained:
        log.warning("random_weights", parts=untrained, meaning="the text of this run is MEANINGLESS")
    commits: dict[int, Commit] = {}
    if plan.pending:
        results = build_dataset(plan, manifest, config, args, settings, staging, predictor, predictor_kwargs)
        for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
            for result in batch.filter(pc.is_valid(batch["committed_rows"])).to_pylist():
                commits[result["shard"]] = Commit(result["committed_rows"], result["committed_audio_seconds"])
    commits |= finish_shards(plan, manifest, staging, settings)
    staging.remove()
    wall = time.perf_counter() - started
    processed = sum(commit.rows for commit in commits.values())
    audio_seconds = sum(commit.audio_seconds for commit in commits.values())
    rows, errors = store.counts()
    summary = {
        "corpus": manifest.name, "job_id": job_id, "model": identity, "output": args.output, "dry_run": args.dry_run,
        "items": rows, "errors": sum(errors.values()), "error_codes": dict(sorted(errors.items())),
        "items_this_run": processed, "shards_skipped": len(done), "shards_written": len(commits),
        "audio_seconds_this_run": round(audio_seconds, 3), "wall_s": round(wall, 3),
        "items_per_s": round(processed / wall, 3), "x_real_time": round(audio_seconds / wall, 3),
        "finished_at": datetime.now(UTC).isoformat(),
        "random_weights": list(untrained),
    }
    store.write_summary(summary)
    log.info("job_done", **summary)
    if not args.no_score and not args.dry_run:
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
    parser.add_argument("--batch-size", type=int, default=8, help="items per model batch (pieces of long recordings)")
    parser.add_argument(
        "--long-audio", choices=("segment", "truncate"),
        help="a recording longer than the model's 30 s window: segment it (speech at pauses found by a VAD, "
        "other tasks in fixed windows) and stitch the answers, or truncate it to 30 s as the seed does "
        "(default: the config's audio.long_audio, segment)",
    )
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
    parser.add_argument(
        "--dry-run", action="store_true",
        help="read and decode every item and write its row (audio seconds, sample rate, channels, errors; no text) "
        "without loading a model; the output is marked `dry-run` and never mixes with a model's",
    )
    parser.add_argument("--no-score", action="store_true", help="skip scoring the corpus at the end (OUTPUT/NAME/_scores)")
    add_scoring_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.ray_data_warnings_to_file()
    if not ray.is_initialized():
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
    sys.exit(module_entry(main))
