"""The training run on Ray Train (`TorchTrainer`, DDP): the driver reads the manifests, starts the workers
and returns where the final checkpoint is; `train_worker` is what each worker runs.

A run resumes from its latest checkpoint after a worker failure (`run.max_failures` restarts) and when
the same run is started again (same `run.name` and `run.storage_path`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec
import ray
import ray.train
import ray.train.torch
import structlog
import torch

from jobs import logs
from jobs.corpus.manifest_schema import Manifest, load_manifest
from jobs.training.config import RunSection, TrainConfig, is_local
from jobs.training.data import training_rows, validation_rows
from jobs.training.state_cache import DONE_FILE, CachedStates, build_cache, cache_directories, cached_training_rows
from jobs.training.objective import load_ctc_head
from jobs.training.worker import VALIDATION_FILE, WEIGHTS_FILE, WorkerTrainer
from nota_model.build import load_model
from nota_model.checkpoint import publish_trained
from nota_model.errors import ConfigError
from nota_model.storage import resolve

# A checkpoint's directory (worker.py names them), beside Ray Train's own files
CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)")

log = structlog.get_logger("nota.train")


def train_worker(settings: dict[str, Any]) -> None:
    """Ray Train's per-worker function."""
    config = TrainConfig.model_validate(settings["config"])
    logs.configure(f"train:{config.run.name}")
    context = ray.train.get_context()
    torch.set_num_threads(max(1, int(config.run.cpus_per_worker)))
    fail_at = settings.get("fail_at_steps")
    device = ray.train.torch.get_device()
    loaded = load_model(config.model.load(), checkpoint=config.model.checkpoint, device=device)
    data = ray.get(settings["data"])
    caches = [CachedStates.open(Path(directory), loaded.model.config) for directory in data["caches"]]
    trainer = WorkerTrainer(config, loaded.model, data["train"], data["validation"], data["storage_options"],
                            context.get_world_rank(), context.get_world_size(), caches)
    if config.model.checkpoint:  # the stage before's CTC head, when it saved one beside its weights
        load_ctc_head(trainer.objective, resolve(config.model.checkpoint).parent)
    trainer.restore(ray.train.get_checkpoint())
    if fail_at:
        _inject_failures(trainer, fail_at, settings["fail_marker"])
    trainer.fit()


def _inject_failures(trainer: WorkerTrainer, steps: list[int], marker: str) -> None:
    """Tests: a worker dies once for each of `steps`, at its first report from that step on (a marker
    file `MARKER-STEP` records that it did, across restarts)."""
    report = trainer._report

    def failing(metrics: dict[str, Any], save: bool, predictions: Any) -> None:
        for step in steps:
            if trainer.step >= step and not os.path.exists(f"{marker}-{step}"):
                Path(f"{marker}-{step}").write_text(str(trainer.step))
                raise RuntimeError(f"injected failure at step {trainer.step}")
        report(metrics, save, predictions)

    trainer._report = failing


def prepare_caches(config: TrainConfig, manifests: Sequence[Manifest]) -> list[Path]:
    """The training manifests' feature caches, built here first where they are missing or incomplete."""
    directories = cache_directories(Path(config.datasets.feature_cache), manifests)
    model = None
    for manifest, directory in zip(manifests, directories):
        if not (directory / DONE_FILE).exists():
            model = model or load_model(config.model.load()).model
            log.info("feature_cache_build", manifest=manifest.name, directory=str(directory))
            log.info("feature_cache_built", directory=str(directory), **build_cache(model, manifest, directory))
    return directories


def storage(run: RunSection) -> tuple[str, Any]:
    """Ray Train's storage_path and storage_filesystem for any fsspec URL."""
    if is_local(run.storage_path) and not run.storage_options:
        return os.path.abspath(fsspec.core.strip_protocol(run.storage_path)), None
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(run.storage_path, **run.storage_options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def checkpoint_url(run: RunSection, checkpoint: ray.train.Checkpoint) -> str:
    """A checkpoint's directory as a URL that `load_model` and fsspec read."""
    protocol = fsspec.core.split_protocol(run.storage_path)[0]
    return checkpoint.path if protocol in (None, "file", "local") else f"{protocol}://{checkpoint.path}"


def run_checkpoints(run: RunSection) -> tuple[Any, list[tuple[int, str]]]:
    """The run's filesystem and its checkpoint directories as (step, path), oldest first (Ray Train's own
    files beside them are no checkpoint)."""
    fs, root = fsspec.core.url_to_fs(f"{run.storage_path.rstrip('/')}/{run.name}", **run.storage_options)
    names = [(CHECKPOINT_NAME.fullmatch(path.rsplit("/", 1)[-1]), path) for path in fs.ls(root, detail=False)] if fs.exists(root) else []
    return fs, sorted((int(name.group(1)), path) for name, path in names if name)


def choose_checkpoint(run: RunSection) -> dict[str, Any]:
    """The run's checkpoint to use: the one with the lowest WER on the validation manifest (`val/wer` of the decoded
    answers, else `val/ctc_wer` for a stage that decodes none; the later of equals) among those validated when
    saved, else the latest. Every checkpoint choice goes through here, so it is made on the validation manifest
    alone: the real-speech development set (manifests/real-speech-dev.yaml)."""
    fs, checkpoints = run_checkpoints(run)
    if not checkpoints:
        raise ConfigError(f"run {run.name!r} has no checkpoint under {run.storage_path}: train it first")
    validated = [(step, path, _validation_metrics(fs, path)) for step, path in checkpoints]
    for metric in ("val/wer", "val/ctc_wer"):
        scored = [(metrics[metric], -step, path) for step, path, metrics in validated if metrics.get(metric) is not None]
        if scored:
            value, step, path = min(scored)
            return {"step": -step, "checkpoint": path, "chosen_by": metric, "value": value}
    step, path = checkpoints[-1]
    return {"step": step, "checkpoint": path, "chosen_by": "latest", "value": None}


def _validation_metrics(fs: Any, checkpoint: str) -> dict[str, Any]:
    """The validation scores a checkpoint's validation file records; {} for a checkpoint not validated when saved."""
    path = f"{checkpoint}/{VALIDATION_FILE}"
    return json.loads(fs.cat_file(path))["metrics"] if fs.exists(path) else {}


def publish(config: TrainConfig, target: str) -> dict[str, Any]:
    """The run's chosen checkpoint (`choose_checkpoint`) written to `target` as weights to ship (`checkpoint.publish_trained`)."""
    fs, _ = run_checkpoints(config.run)
    chosen = choose_checkpoint(config.run)
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / "model.safetensors"
        fs.get(f"{chosen['checkpoint']}/{WEIGHTS_FILE}", str(local))
        publish_trained(local, Path(target), {"run": config.run.name, "step": str(chosen["step"]), "chosen_by": chosen["chosen_by"]})
    return {"run": config.run.name, **chosen, "published": target}


def run(config: TrainConfig, fail_at_steps: Sequence[int] = (), fail_marker: str | None = None) -> dict[str, Any]:
    """Train on the current Ray cluster; returns a summary (final checkpoint URL and metrics).
    `fail_at_steps` and `fail_marker` are for tests: workers fail once at each of those steps."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    model_config = config.model.load()
    options = config.datasets.storage_options
    manifests = [load_manifest(url, options) for url in config.datasets.train]
    caches: list[str] = []
    if config.datasets.feature_cache:
        caches = [str(directory) for directory in prepare_caches(config, manifests)]
        train, skipped = cached_training_rows([CachedStates.open(Path(d), model_config) for d in caches]), Counter()
    else:
        train, skipped = training_rows(manifests)
    if not train:
        raise ConfigError(f"the training manifests hold no item with a reference (left out: {dict(skipped)})")
    tasks = Counter(row["task"] for row in train)
    for task in tasks:
        if task not in config.datasets.prompts:
            model_config.prompt.task_prompt(task)  # raises for a task without any prompt
    storage_options = [manifest.storage_options for manifest in manifests]  # rows name theirs by `source`
    validation: list[dict[str, Any]] = []
    if config.datasets.validation:
        held_out = load_manifest(config.datasets.validation.manifest, options)
        validation, skipped_validation = validation_rows(held_out, config.datasets.validation.max_items, len(manifests))
        storage_options.append(held_out.storage_options)
        if skipped_validation:
            log.warning("validation_items_left_out", reasons=dict(skipped_validation))
    use_gpu = config.run.use_gpu if config.run.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    log.info("train_job_start", name=config.run.name, examples=len(train), tasks=dict(tasks), left_out=dict(skipped),
             validation_items=len(validation), workers=config.run.num_workers, use_gpu=use_gpu)
    data = ray.put({"train": train, "validation": validation, "storage_options": storage_options, "caches": caches})
    storage_path, filesystem = storage(config.run)
    settings = {"config": config.model_dump(mode="json"), "data": data}
    if fail_at_steps:
        settings.update(fail_at_steps=list(fail_at_steps), fail_marker=fail_marker)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=settings,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.run.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.run.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=config.run.name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.run.keep_checkpoints),
        ),
    )
    result = trainer.fit()
    checkpoint = result.checkpoint
    summary = {
        "name": config.run.name,
        "checkpoint": checkpoint_url(config.run, checkpoint) if checkpoint else None,
        "weights": f"{checkpoint_url(config.run, checkpoint)}/{WEIGHTS_FILE}" if checkpoint else None,
        "metrics": result.metrics,
        "chosen": choose_checkpoint(config.run),
        "log_dir": str(config.log_dir()),
    }
    log.info("train_job_done", **summary)
    return summary
