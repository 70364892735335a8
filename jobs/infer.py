"""Batch inference over a corpus on Ray Data: one Parquet row per input item, the answer or an error.

    python -m jobs.infer --manifest M --model CONFIG_OR_PRESET [--checkpoint C] --output URL
    python -m jobs.infer --config RUN.yaml [--FLAG VALUE ...]      # the same options in a file, flags over it

Runs on the current Ray cluster (`RAY_ADDRESS`, as under `ray job submit`) or starts a local one.
Stages, all on the cluster: read and decode (a read task per input shard: a tar shard streamed front to
back, or rows of an item list) -> the model (an actor pool: one actor per GPU in the model's half dtype,
or CPU actors; `--dry-run`: no model) -> write (rows staged per shard; a shard's Parquet file committed
whole once complete). The driver plans the read tasks from shard URLs and gets a few numbers per block.
A rerun with the same output skips complete shards and keeps the rows an interrupted run staged: Ctrl-C or
SIGTERM stops the run, says how many items the output keeps, and exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import types
import typing
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic.fields import FieldInfo

from jobs.command_line import module_entry
from jobs.ray_session import join_ray
from jobs.inference.options import RunOptions, run_options
from nota_model.config import load_config

if TYPE_CHECKING:
    from jobs.inference.predict import Predictor
    from jobs.predictions import OutputStore


def submission_id() -> str | None:
    """The `ray job submit` id of this driver: Ray hands it over in the job config's metadata."""
    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return config.get("metadata", {}).get("job_submission_id")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped a run once it had claimed its output, whose committed and staged rows the next
    run keeps."""

    def __init__(self, store: OutputStore):
        super().__init__()
        self.store = store

    def output_rows(self) -> int:
        """The output's rows: committed, and staged for shards not committed (each index once). Counted once the
        cluster's work has stopped, so that no write lands after."""
        from jobs.inference.write import ShardStaging

        done = self.store.completed_shards()
        staged = ShardStaging(self.store).kept_rows(done)
        return self.store.counts()[0] + sum(len(rows.indices) for rows in staged.values())


@contextlib.contextmanager
def interruptible(store: OutputStore) -> Iterator[None]:
    """A KeyboardInterrupt inside, raised as RunInterrupted: the output it leaves is resumable."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        raise RunInterrupted(store) from interrupt


def run(options: RunOptions, predictor: type[Predictor] | None = None, predictor_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    # Imported here, not at the top: parsing the command line and checking its options loads neither torch nor Ray.
    import pyarrow.compute as pc
    import ray

    from jobs import logs
    from jobs.corpus.manifest_schema import load_manifest
    from jobs.inference.dataset import build_dataset, finish_shards
    from jobs.inference.devices import run_capability, uses_gpus
    from jobs.inference.plan import ReadPlan, check_task
    from jobs.inference.predict import DRY_RUN_IDENTITY, Predictor
    from jobs.inference.progress import ProgressEstimator, ProgressReport
    from jobs.inference.settings import JobSettings
    from jobs.inference.write import Commit, ShardStaging
    from jobs.predictions import OutputStore
    from jobs.scoring.scorer import score
    from nota_model.build import model_identity, random_parts
    from nota_model.overrides import deep_merge

    started = time.perf_counter()
    job_id = options.job_id or submission_id() or f"job-{uuid.uuid4().hex[:12]}"
    log = logs.configure(job_id)
    storage_options = options.storage_options
    manifest = load_manifest(options.manifest, storage_options)
    long_form = {"audio": {"long_form": options.long_form}} if options.long_form else {}
    config = load_config(options.model, deep_merge(options.overrides, long_form))
    options = options.with_model_batch_size(config.batch_size)
    check_task(manifest, config)
    identity = DRY_RUN_IDENTITY if options.dry_run else model_identity(config, options.checkpoint, run_capability(uses_gpus(options.accelerator), options.gpu_wait))
    settings = JobSettings(manifest.name, job_id, identity, config.decoding.model_dump_json(), options.batch_size)
    store = OutputStore(options.output, manifest.name, storage_options)
    store.claim({"model": identity, "decoding": settings.decoding, "long_form": config.audio.long_form,
                 "signals": config.signals.model_dump()})

    with interruptible(store):
        done = store.completed_shards()
        staging = ShardStaging(store)
        plan = ReadPlan.of(manifest, done, staging.kept_rows(done))
        log.info("job_start", corpus=manifest.name, model=identity, shards=plan.shards, items=plan.items,
                 pending_items=plan.pending_items, items_kept=plan.kept_items, shards_done=len(done), ray=ray.cluster_resources())
        logs.headline(f"nota-batch job {job_id}: {manifest.name}, {plan.describe()}, model {identity}", sys.stderr)
        untrained = [] if options.dry_run else random_parts(config, options.checkpoint)
        if untrained:
            log.warning("random_weights", parts=untrained, meaning="the text of this run is MEANINGLESS")
        commits: dict[int, Commit] = {}
        if plan.reads:
            ray.data.DataContext.get_current().enable_progress_bars = options.ray_progress  # else Ray Data's go to its log
            results = build_dataset(plan, manifest, config, options, settings, staging, predictor or Predictor, predictor_kwargs)
            progress = ProgressReport(ProgressEstimator.of(plan), log)
            try:
                # closed on the way out: an interruption stops the execution at once, not once the iterator is collected
                with contextlib.closing(iter(results.iter_batches(batch_format="pyarrow", batch_size=None))) as batches:
                    for batch in batches:
                        progress.add(batch)
                        for result in batch.filter(pc.is_valid(batch["committed_rows"])).to_pylist():
                            commits[result["shard"]] = Commit(result["committed_rows"], result["committed_audio_seconds"])
            finally:
                progress.close()
        commits |= finish_shards(plan, manifest, staging, settings)
        staging.remove()
        wall = time.perf_counter() - started
        kept = [plan.kept[shard] for shard in commits if shard in plan.kept]  # rows answered by an earlier run
        processed = sum(commit.rows for commit in commits.values()) - sum(len(rows.indices) for rows in kept)
        audio_seconds = sum(commit.audio_seconds for commit in commits.values()) - sum(rows.audio_seconds for rows in kept)
        rows, errors = store.counts()
        summary = {
            "corpus": manifest.name, "job_id": job_id, "model": identity, "output": options.output, "dry_run": options.dry_run,
            "items": rows, "errors": sum(errors.values()), "error_codes": dict(sorted(errors.items())),
            "items_this_run": processed, "items_kept": plan.kept_items, "shards_skipped": len(done), "shards_written": len(commits),
            "audio_seconds_this_run": round(audio_seconds, 3), "wall_s": round(wall, 3),
            "wall_items_per_s": round(processed / wall, 3), "wall_x_real_time": round(audio_seconds / wall, 3),
            "finished_at": datetime.now(UTC).isoformat(),
            "random_weights": list(untrained),
        }
        store.write_summary(summary)
        log.info("job_done", **summary)
        if not options.no_score and not options.dry_run:
            summary["metrics"] = f"{store.url.rstrip('/')}/{manifest.name}/_scores"
            summary["groups"] = score(f"{store.url.rstrip('/')}/{manifest.name}", summary["metrics"], options.references,
                                      options.spice_lib, storage_options=storage_options)
    return summary


def parse_args(argv: list[str] | None = None) -> RunOptions:
    """The run's options: --config's file, then the flags (one per RunOptions field) over it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="run options (YAML, path or URL): any of the options below by field name, "
                        "e.g. `batch_size: 8`; a flag given here overrides the file")
    for name, field in RunOptions.model_fields.items():
        parser.add_argument(*_flag(name), help=_help(field), **_flag_kwargs(name, field.annotation))
    flags = vars(parser.parse_args(argv))
    return run_options(flags.pop("config", None), flags)


def _flag(name: str) -> list[str]:
    return {"overrides": ["--set"]}.get(name, [f"--{name.replace('_', '-')}"])


def _help(field: FieldInfo) -> str:
    """The field's description and its default, where the description does not say it (a switch is off)."""
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    if default in (None, {}) or isinstance(default, bool) or "default" in field.description:
        return field.description
    return f"{field.description} (default: {default})"


def _flag_kwargs(name: str, annotation: Any) -> dict[str, Any]:
    """How argparse reads a field's flag: --set and --storage-options as text (run_options parses them)."""
    if name == "overrides":
        return {"action": "append", "metavar": "KEY=VALUE", "dest": "set"}
    if name == "storage_options":
        return {"metavar": "JSON"}
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = [kind for kind in (typing.get_args(annotation) if union else (annotation,)) if kind is not type(None)]
    if kinds == [bool]:
        return {"action": "store_true"}
    if typing.get_origin(kinds[0]) is typing.Literal:
        return {"choices": typing.get_args(kinds[0])}
    return {"type": kinds[0]}


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    load_config(options.model, options.overrides)  # an unknown model or a bad --set: one line, before Ray starts
    import ray

    from jobs import logs
    from jobs.metrics.speed import RATE_LABELS
    from jobs.scoring import report

    logs.ray_data_warnings_to_file()
    starts_ray = not ray.is_initialized()
    join_ray()
    try:
        summary = run(options)
    except RunInterrupted as interrupted:
        if starts_ray:
            ray.shutdown()  # the model actors and the tasks in flight stop: nothing is written after the count
        raise KeyboardInterrupt(f"interrupted: {interrupted.output_rows()} items kept; run the same command again to resume") from interrupted
    groups = summary.pop("groups", None)
    logs.headline(f"nota-batch job {summary['job_id']} done: {summary['items_this_run']} items in {summary['wall_s']} s "
                  f"({summary['wall_items_per_s']} {RATE_LABELS['wall_clock']}), "
                  f"{summary['errors']} errors, output {summary['output']}", sys.stdout)
    print(json.dumps(summary), flush=True)
    if groups is not None:
        print(report.summary(groups), flush=True)
    return 1 if options.strict and summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(module_entry(main))
