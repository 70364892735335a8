"""Training the NOTA model on Ray Train: the config schema, the data, each worker's loop, its metrics logger and
the driver's `run` (`python -m jobs.train` is the command line over it; its help says what a run does and writes)."""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import fsspec
import numpy as np
import ray
import ray.train
import ray.train.torch
import structlog
import torch
import torch.distributed as dist
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jobs import logs
from jobs.corpus.manifest import Manifest, load_manifest, read_item_bytes
from nota_model.audio import AudioClip, load_audio
from nota_model.build import load_model, save_trained
from nota_model.checkpoint import load_into, read_checkpoint
from nota_model.config import DecodingConfig, NotaConfig, PromptConfig, load_config
from nota_model.errors import AudioError, ConfigError
from nota_model.model import NotaModel
from nota_model.storage import cache_dir
from nota_model.training import (
    Example,
    OptimizerConfig,
    ScheduleConfig,
    answer_loss,
    batch_for,
    choose_prompt,
    epoch_order,
    make_optimizer,
    make_scheduler,
    prepare_for_training,
    sampling_weights,
    save_seed_checkpoint,
    shard_steps,
    step_seed,
    steps_per_epoch,
    train_mode,
    trainable_parameter_count,
)

WEIGHTS_FILE = "model.safetensors"
SEED_FILE = "checkpoint.pth"
STATE_FILE = "train_state.pt"
MODEL_CONFIG_FILE = "model.yaml"
VALIDATION_FILE = "validation.json"
PLACEHOLDER = PromptConfig().speech_placeholder

log = structlog.get_logger("nota.train")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    """The model as inference builds it: a preset name or YAML, nested overrides, an init checkpoint."""

    config: str = "nota-0.5b"
    overrides: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None  # trained parameters to start from (seed .pth or safetensors), path or URL

    def load(self) -> NotaConfig:
        config = load_config(self.config, self.overrides)
        if not isinstance(config, NotaConfig):
            raise ConfigError(f"model.config {self.config!r} is not a NOTA model: only the NOTA model trains")
        return config


class ValidationSection(_Strict):
    """A held-out manifest, decoded and scored (WER for asr, CIDEr-D/METEOR/SPICE for aac) with the
    teacher-forced loss, at the end of each epoch or every `every_steps` steps, and at the last step."""

    manifest: str
    every_steps: int | None = Field(None, ge=1)
    max_items: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    decoding: dict[str, Any] = Field(default_factory=lambda: {"num_beams": 1})  # over the model's decoding
    captions: bool = True  # caption metrics (they need Java); SPICE also needs the CoreNLP jars
    spice_lib: str | None = None


class DatasetsSection(_Strict):
    """Training manifests (each item's references are its answers: one example per reference) and how
    to mix and prompt them."""

    train: list[str] = Field(min_length=1)
    validation: ValidationSection | None = None
    task_weights: dict[str, float] = Field(default_factory=dict)  # share of samples per task; {}: each example once an epoch
    samples_per_epoch: int | None = Field(None, ge=1)  # with task_weights; default: the number of examples
    prompts: dict[str, list[str]] = Field(default_factory=dict)  # training prompts per task; default: the model's task prompt
    max_answer_tokens: int = Field(200, ge=2)
    storage_options: dict[str, Any] = Field(default_factory=dict)  # fsspec options for the manifests

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, prompts: dict[str, list[str]]) -> dict[str, list[str]]:
        for task, texts in prompts.items():
            if not texts:
                raise ValueError(f"prompts.{task} is empty")
            for text in texts:
                if text.count(PLACEHOLDER) != 1:
                    raise ValueError(f"prompts.{task}: each prompt holds {PLACEHOLDER} exactly once: {text!r}")
        return prompts

    @field_validator("task_weights")
    @classmethod
    def _check_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in weights.values()):
            raise ValueError("task_weights must not be negative")
        return weights


class RunSection(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    storage_path: str  # local path or fsspec URL; checkpoints go to STORAGE/NAME/checkpoint_*
    storage_options: dict[str, Any] = Field(default_factory=dict)
    epochs: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; give exactly one of epochs and max_steps
    batch_size: int = Field(4, ge=1)  # per worker and micro-batch
    gradient_accumulation: int = Field(1, ge=1)
    amp: Literal["auto", "none", "float16", "bfloat16"] = "auto"  # auto: float16 on GPU, none on CPU
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    cpus_per_worker: float = Field(1.0, gt=0)
    seed: int = 42
    checkpoint_every_steps: int | None = Field(None, ge=1)  # None: at the end of each epoch; always at the last step
    keep_checkpoints: int | None = Field(None, ge=1)  # None: keep all
    seed_checkpoint: bool = False  # also write the seed's .pth layout
    max_failures: int = Field(3, ge=-1)  # worker-group restarts from the latest checkpoint; -1: unlimited
    log_every_steps: int = Field(10, ge=1)
    loader_threads: int = Field(2, ge=1)  # audio reading and decoding ahead of the model, per worker

    @model_validator(mode="after")
    def _check(self) -> RunSection:
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("give exactly one of run.epochs and run.max_steps")
        return self


class WandbSection(_Strict):
    enabled: bool = False
    project: str = "nota"
    entity: str | None = None
    mode: Literal["online", "offline"] = "online"  # offline: written under `dir`, `wandb sync` later
    dir: str | None = None


class LoggingSection(_Strict):
    tensorboard: bool = True
    dir: str | None = None  # local directory for TensorBoard events and metrics.jsonl; default below
    wandb: WandbSection = Field(default_factory=WandbSection)


class TrainConfig(_Strict):
    model: ModelSection = Field(default_factory=ModelSection)
    datasets: DatasetsSection
    run: RunSection
    logging: LoggingSection = Field(default_factory=LoggingSection)

    def log_dir(self) -> Path:
        """Where rank 0 writes TensorBoard events and metrics.jsonl: `logging.dir`, else STORAGE/NAME/logs for
        local storage; for object storage a local directory, copied to STORAGE/NAME/logs at each checkpoint."""
        if self.logging.dir:
            return Path(self.logging.dir)
        if _is_local(self.run.storage_path):
            return Path(fsspec.core.strip_protocol(self.run.storage_path)) / self.run.name / "logs"
        return cache_dir() / "train" / self.run.name / "logs"


def load_train_config(path: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError(f"cannot read the training config {path}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    try:
        return TrainConfig.model_validate(_merge(data, overrides or {}))
    except ValidationError as err:
        raise ConfigError(f"invalid training config ({path}):\n{err}") from err


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


# Data: manifests -> rows (driver), rows -> decoded examples (workers)


def training_rows(manifests: Sequence[Manifest]) -> tuple[list[dict[str, Any]], Counter]:
    """One row per (good item, reference), in manifest and item order; and what was left out, by reason."""
    rows, skipped = [], Counter()
    for source, manifest in enumerate(manifests):
        for item in manifest.work_items().to_pylist():
            if item["error"] is not None:
                skipped[item["error"]] += 1
                continue
            if not item["reference"]:
                skipped["no_reference"] += 1
                continue
            for answer in item["reference"]:
                rows.append({**_audio_fields(item, source), "answer": answer})
    return rows, skipped


def validation_rows(manifest: Manifest, max_items: int | None, source: int) -> tuple[list[dict[str, Any]], Counter]:
    """One row per good item with a reference (all its references), the first `max_items`."""
    rows, skipped = [], Counter()
    for item in manifest.work_items().to_pylist():
        if item["error"] is not None or not item["reference"]:
            skipped[item["error"] or "no_reference"] += 1
            continue
        rows.append({**_audio_fields(item, source), "reference": item["reference"]})
    return rows[:max_items], skipped


def _audio_fields(item: dict[str, Any], source: int) -> dict[str, Any]:
    keys = ("id", "audio", "offset", "size", "member", "task", "prompt")
    return {**{key: item[key] for key in keys}, "source": source}


def decode_row(row: dict[str, Any], storage_options: Sequence[dict[str, Any]], model: NotaModel) -> AudioClip:
    data = read_item_bytes(row, storage_options[row["source"]])
    return load_audio(data, model.config.audio, name=row.get("member") or row["audio"])


# The loop on each worker


class _LossModule(torch.nn.Module):
    """What DDP wraps: the model, with a forward that encodes the clips and returns the mean answer loss
    and the number of answer tokens."""

    def __init__(self, model: NotaModel, max_answer_tokens: int, amp_dtype: torch.dtype | None):
        super().__init__()
        self.model = model
        self.max_answer_tokens = max_answer_tokens
        self.amp_dtype = amp_dtype

    def forward(self, examples: list[Example]) -> tuple[torch.Tensor, int]:
        with autocast(self.model.device, self.amp_dtype):
            batch = batch_for(self.model, examples, self.max_answer_tokens)
            return answer_loss(self.model, batch), batch.answer_tokens


class WorkerTrainer:
    def __init__(self, config: TrainConfig, model: NotaModel, train: list[dict[str, Any]], validation: list[dict[str, Any]],
                 storage_options: list[dict[str, Any]], rank: int, world_size: int):
        self.config, self.run, self.model = config, config.run, model
        self.train_rows, self.validation_rows, self.storage_options = train, validation, storage_options
        self.rank, self.world_size = rank, world_size
        self.device = model.device
        self.amp_dtype = _amp_dtype(self.run.amp, self.device)
        self.trained = prepare_for_training(model)
        self.module = ray.train.torch.prepare_model(
            _LossModule(model, config.datasets.max_answer_tokens, self.amp_dtype),
            move_to_device=False,
            parallel_strategy_kwargs={"broadcast_buffers": False},
        )
        self.distributed = isinstance(self.module, torch.nn.parallel.DistributedDataParallel)
        weights = sampling_weights([row["task"] for row in train], config.datasets.task_weights)
        self.weights = weights
        self.epoch_size = config.datasets.samples_per_epoch or len(train)
        self.steps_per_epoch = steps_per_epoch(self.epoch_size, world_size, self.run.batch_size, self.run.gradient_accumulation)
        self.total_steps = self.run.max_steps or self.run.epochs * self.steps_per_epoch
        self.optimizer = make_optimizer(model, self.run.optimizer)
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, self.run.optimizer, self.run.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.history: list[dict[str, float]] = []  # per optimizer step: loss, lr, samples
        self.skipped_items = 0
        self.prompts = {task: config.datasets.prompts.get(task) or [model.config.prompt.task_prompt(task)]
                        for task in {row["task"] for row in train}}
        self._plans: dict[int, list[list[np.ndarray]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=self.run.loader_threads)
        self._pending: dict[tuple[int, int], Future] = {}
        self.logger: MetricsLogger | None = None  # rank 0's, made once the start step is known

    # Resuming

    def restore(self, checkpoint: ray.train.Checkpoint | None) -> None:
        if checkpoint is None:
            return
        with checkpoint.as_directory() as directory:
            weights = read_checkpoint(Path(directory) / WEIGHTS_FILE)
            load_into(self.model, weights.tensors, required=set(self.model.trained_state_dict()), source=str(directory))
            state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.history, self.skipped_items = state["step"], state["history"], state["skipped_items"]
        log.info("train_resumed", step=self.step, rank=self.rank)

    # Data

    def _plan(self, epoch: int) -> list[list[np.ndarray]]:
        if epoch not in self._plans:
            self._plans = {epoch: shard_steps(
                epoch_order(len(self.train_rows), epoch, self.run.seed, self.weights, self.epoch_size),
                self.world_size, self.rank, self.run.batch_size, self.run.gradient_accumulation,
            )}
        return self._plans[epoch]

    def _micro_batches(self, step: int) -> list[np.ndarray]:
        epoch, index = divmod(step, self.steps_per_epoch)
        return self._plan(epoch)[index]

    def _submit(self, step: int) -> None:
        if step >= self.total_steps:
            return
        epoch, index = divmod(step, self.steps_per_epoch)
        for micro, indices in enumerate(self._micro_batches(step)):
            if (step, micro) not in self._pending:
                positions = [index * self.world_size * self.run.batch_size * self.run.gradient_accumulation
                             + micro * self.world_size * self.run.batch_size + self.rank * self.run.batch_size + k
                             for k in range(len(indices))]
                self._pending[(step, micro)] = self._pool.submit(self._examples, epoch, indices, positions)

    def _examples(self, epoch: int, indices: np.ndarray, positions: list[int]) -> tuple[list[Example], int]:
        examples, failed = [], 0
        for index, position in zip(indices, positions):
            row = self.train_rows[int(index)]
            try:
                clip = decode_row(row, self.storage_options, self.model)
            except AudioError as err:
                failed += 1
                log.warning("train_item_skipped", id=row["id"], audio=row["audio"], error=err.code, message=err.message)
                continue
            prompt = row["prompt"] or choose_prompt(self.prompts[row["task"]], self.run.seed, epoch, position)
            examples.append(Example(clip, prompt, row["answer"]))
        return examples, failed

    # Training

    def fit(self) -> None:
        if self.rank == 0:
            self.logger = MetricsLogger(self.config, self.step)
        log.info("train_start", rank=self.rank, world_size=self.world_size, steps=self.total_steps, start_step=self.step,
                 steps_per_epoch=self.steps_per_epoch, examples=len(self.train_rows), trained_parameters=len(self.trained),
                 trained_values=trainable_parameter_count(self.model), device=str(self.device), amp=str(self.amp_dtype))
        window_started, window_samples, window_steps = time.perf_counter(), 0, 0
        self._submit(self.step)
        while self.step < self.total_steps:
            self._submit(self.step + 1)
            loss, samples, tokens = self._train_step()
            window_samples += samples
            window_steps += 1
            last = self.step == self.total_steps
            end_of_epoch = self.step % self.steps_per_epoch == 0
            validation_every = self.config.datasets.validation and self.config.datasets.validation.every_steps
            validate = self.config.datasets.validation is not None and (
                last or (self.step % validation_every == 0 if validation_every else end_of_epoch))
            every = self.run.checkpoint_every_steps
            save = last or (self.step % every == 0 if every else end_of_epoch)
            if not (save or validate or self.step % self.run.log_every_steps == 0):
                continue
            elapsed = time.perf_counter() - window_started
            metrics = {
                "step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch, "loss": loss,
                "lr": self.history[-1]["lr"], "answer_tokens": tokens,
                "steps_per_s": window_steps / elapsed, "samples_per_s": window_samples / elapsed,
                "skipped_items": self.skipped_items, **_memory(self.device),
            }
            predictions = None
            if validate:
                scores, predictions = self.validate()
                metrics.update(scores)
            self._report(metrics, save, predictions)
            window_started, window_samples, window_steps = time.perf_counter(), 0, 0
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.logger:
            self.logger.close()

    def _train_step(self) -> tuple[float, int, int]:
        torch.manual_seed(step_seed(self.run.seed, self.step, self.rank))
        micro_batches = self._micro_batches(self.step)
        loss_sum, tokens, samples, failed = 0.0, 0, 0, 0
        for micro in range(len(micro_batches)):
            examples, skipped = self._pending.pop((self.step, micro)).result()
            failed += skipped
            if not examples:
                raise RuntimeError(f"step {self.step}: no item of a micro-batch could be decoded (see the warnings); "
                                   "check the corpus with `python -m jobs.manifest validate`")
            sync = micro == len(micro_batches) - 1 or not self.distributed
            with nullcontext() if sync else self.module.no_sync():
                loss, count = self.module(examples)
                self.scaler.scale(loss / len(micro_batches)).backward()
            loss_sum += loss.item() * count
            tokens += count
            samples += len(examples)
        if self.run.optimizer.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.run.optimizer.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        loss_sum, tokens, samples, failed = _all_sum([loss_sum, tokens, samples, failed], self.distributed)
        self.skipped_items += int(failed)
        loss = loss_sum / max(tokens, 1)
        self.history.append({"step": self.step, "loss": loss, "lr": lr, "samples": int(samples)})
        return loss, int(samples), int(tokens)

    # Validation

    def validate(self) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
        """Decode this rank's share of the validation items, gather on rank 0 and score there."""
        validation = self.config.datasets.validation
        decoding = DecodingConfig.model_validate({**self.model.config.decoding.model_dump(), **validation.decoding})
        self.model.eval()
        mine = self.validation_rows[self.rank :: self.world_size]
        results, loss_sum, tokens = [], 0.0, 0
        started = time.perf_counter()
        for start in range(0, len(mine), validation.batch_size):
            rows, clips = [], []
            for row in mine[start : start + validation.batch_size]:
                try:
                    clips.append(decode_row(row, self.storage_options, self.model))
                    rows.append(row)
                except AudioError as err:
                    results.append({"id": row["id"], "task": row["task"], "reference": row["reference"], "text": None, "error": err.code})
            if not rows:
                continue
            prompts = [row["prompt"] or self.model.prompt_for(row["task"]) for row in rows]
            with torch.no_grad(), autocast(self.device, self.amp_dtype):
                output = self.model.generate(clips, prompts, decoding)
                examples = [Example(clip, prompt, row["reference"][0]) for clip, prompt, row in zip(clips, prompts, rows)]
                batch = batch_for(self.model, examples, self.config.datasets.max_answer_tokens)
                loss_sum += float(answer_loss(self.model, batch, reduction="sum"))
                tokens += batch.answer_tokens
            results += [{"id": row["id"], "task": row["task"], "reference": row["reference"], "text": text, "error": None}
                        for row, text in zip(rows, output.texts)]
        train_mode(self.model)
        loss_sum, tokens = _all_sum([loss_sum, tokens], self.distributed)
        gathered = [results]
        if self.distributed:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, results)
        if self.rank != 0:
            return {}, None
        predictions = [row for part in gathered for row in part]
        scores = {"val/loss": loss_sum / max(tokens, 1), "val/items": len(predictions), "val/seconds": time.perf_counter() - started,
                  **validation_scores(predictions, validation)}
        log.info("validation", step=self.step, **scores)
        return scores, predictions

    # Reporting and checkpoints

    def _report(self, metrics: dict[str, Any], save: bool, predictions: list[dict[str, Any]] | None) -> None:
        if self.logger:
            self.logger.log(self.step, metrics)
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="nota-ckpt-") as directory:
            checkpoint = None
            if self.rank == 0:
                self._write_checkpoint(Path(directory), metrics, predictions)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
                self.logger.upload()
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{self.step:08d}")
        log.info("checkpoint_saved", step=self.step, rank=self.rank)

    def _write_checkpoint(self, directory: Path, metrics: dict[str, Any], predictions: list[dict[str, Any]] | None) -> None:
        save_trained(self.model, directory / WEIGHTS_FILE)
        (directory / MODEL_CONFIG_FILE).write_text(self.model.config.to_yaml())
        state = {
            "step": self.step, "history": self.history, "skipped_items": self.skipped_items,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
        }
        torch.save(state, directory / STATE_FILE)
        if self.run.seed_checkpoint:
            epoch = (self.step - 1) // self.steps_per_epoch
            save_seed_checkpoint(self.model, directory / SEED_FILE, {"optimizer": self.optimizer.state_dict(),
                                                                      "scaler": self.scaler.state_dict(), "epoch": epoch})
        if predictions is not None:
            scores = {k: v for k, v in metrics.items() if k.startswith("val/")}
            (directory / VALIDATION_FILE).write_text(json.dumps({"step": self.step, "metrics": scores, "predictions": predictions}, indent=1))


def validation_scores(predictions: list[dict[str, Any]], validation: ValidationSection) -> dict[str, Any]:
    """WER/CER over the asr items, caption metrics over the aac items (None with a note where they cannot run)."""
    from jobs.metrics.captions import caption_scores
    from jobs.metrics.wer import corpus_wer

    scores: dict[str, Any] = {}
    good = [row for row in predictions if row["error"] is None]
    scores["val/errors"] = len(predictions) - len(good)
    asr = [row for row in good if row["task"] == "asr"]
    if asr:
        errors = corpus_wer([row["reference"][0] for row in asr], [row["text"] for row in asr])
        scores.update({"val/wer": errors.wer, "val/cer": errors.cer})
    aac = [row for row in good if row["task"] == "aac"]
    if aac and validation.captions:
        try:
            captions = caption_scores([row["reference"] for row in aac], [row["text"] for row in aac], validation.spice_lib)
        except (RuntimeError, OSError, ValueError) as err:
            scores["val/caption_error"] = str(err)
        else:
            scores.update({"val/cider_d": captions.cider_d, "val/meteor": captions.meteor, "val/spice": captions.spice,
                           "val/spider": captions.spider})
    return scores


class MetricsLogger:
    """Rank 0's metrics: structlog lines, `metrics.jsonl` and TensorBoard in `TrainConfig.log_dir()`, and wandb
    when enabled."""

    def __init__(self, config: TrainConfig, start_step: int = 0):
        self.config = config
        self.dir = config.log_dir()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run drops the events an earlier attempt logged after its checkpoint.
            self.writer = SummaryWriter(log_dir=str(self.dir / "tensorboard"), purge_step=start_step or None)
        self.wandb = _start_wandb(config) if config.logging.wandb.enabled else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        log.info("train_progress", **metrics)
        with open(self.dir / "metrics.jsonl", "a") as file:
            file.write(json.dumps({"time": time.time(), **metrics}) + "\n")
        numbers = {key: float(value) for key, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None and key != "step"}
        if self.writer:
            for key, value in numbers.items():
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
            self.writer.flush()
        if self.wandb:
            self.wandb.log({key if "/" in key else f"train/{key}": value for key, value in numbers.items()}, step=step)

    def upload(self) -> None:
        """Copy the log directory beside the checkpoints (STORAGE/NAME/logs) when they are on object storage."""
        run = self.config.run
        if _is_local(run.storage_path) and not run.storage_options:
            return
        fs, root = fsspec.core.url_to_fs(run.storage_path, **run.storage_options)
        fs.put(str(self.dir) + "/", f"{root.rstrip('/')}/{run.name}/logs/", recursive=True)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()


def _start_wandb(config: TrainConfig) -> Any:
    settings = config.logging.wandb
    try:
        import wandb
    except ImportError as err:
        raise ConfigError("logging.wandb.enabled needs the wandb package: pip install wandb") from err
    return wandb.init(project=settings.project, entity=settings.entity, name=config.run.name, id=config.run.name,
                      resume="allow", mode=settings.mode, dir=settings.dir or str(config.log_dir()),
                      config=config.model_dump(mode="json"))


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    if amp == "none":
        return None
    if amp == "float16" and device.type != "cuda":
        raise ConfigError("run.amp float16 needs a GPU; on CPU use bfloat16 or none")
    return getattr(torch, amp)


def _all_sum(values: list[float], distributed: bool) -> list[float]:
    if not distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def _memory(device: torch.device) -> dict[str, float]:
    """Peak memory so far: the GPU's allocator, and the process's resident set."""
    memory = {"max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        memory["gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return memory


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
    trainer = WorkerTrainer(config, loaded.model, data["train"], data["validation"], data["storage_options"],
                            context.get_world_rank(), context.get_world_size())
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


# Driver


def storage(run: RunSection) -> tuple[str, Any]:
    """Ray Train's storage_path and storage_filesystem for any fsspec URL."""
    if _is_local(run.storage_path) and not run.storage_options:
        return os.path.abspath(fsspec.core.strip_protocol(run.storage_path)), None
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(run.storage_path, **run.storage_options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _is_local(url: str) -> bool:
    return fsspec.core.split_protocol(url)[0] in (None, "file", "local")


def checkpoint_url(run: RunSection, checkpoint: ray.train.Checkpoint) -> str:
    """A checkpoint's directory as a URL that `load_model` and fsspec read."""
    protocol = fsspec.core.split_protocol(run.storage_path)[0]
    return checkpoint.path if protocol in (None, "file", "local") else f"{protocol}://{checkpoint.path}"


def run(config: TrainConfig, fail_at_steps: Sequence[int] = (), fail_marker: str | None = None) -> dict[str, Any]:
    """Train on the current Ray cluster; returns a summary (final checkpoint URL and metrics).
    `fail_at_steps` and `fail_marker` are for tests: workers fail once at each of those steps."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    model_config = config.model.load()
    options = config.datasets.storage_options
    manifests = [load_manifest(url, options) for url in config.datasets.train]
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
    data = ray.put({"train": train, "validation": validation, "storage_options": storage_options})
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
        "log_dir": str(config.log_dir()),
    }
    log.info("train_job_done", **summary)
    return summary
