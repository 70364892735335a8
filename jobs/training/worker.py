"""Each Ray Train worker's loop: the model wrapped for DDP, the sampled and prompted batches, the optimizer
steps with AMP and accumulation, validation, and the checkpoints it reports (and resumes from).

Only the trained parameters learn (Q-Former, query tokens, projection, `ln_speech`/`ln_audio`, LoRA);
the loss is on the answer tokens and the end symbol alone. A checkpoint directory holds:

    model.safetensors   the trained parameters: `load_model(config, checkpoint=".../model.safetensors")`
    model.yaml          the model config it was trained with
    checkpoint.pth      the seed's `{"model": ..., "config": ..., "optimizer": ...}` layout (run.seed_checkpoint)
    train_state.pt      optimizer, schedule, gradient scaler, step and the loss history, for resuming
    validation.json     the validation metrics and predictions at that step, when validated there

A resumed run takes the same step, the same data order (a pure function of the seed and the epoch), the same
prompts, cached-state masks (`augment`) and dropout masks.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import structlog
import torch
import torch.distributed as dist

from jobs.metrics.memory import gpu_memory
from jobs.training.augment import mask_generator, mask_states
from jobs.training.config import TrainConfig, ValidationSection
from jobs.training.data import decode_row
from jobs.training.state_cache import CachedStates
from jobs.training.logger import MetricsLogger
from jobs.training.objective import Objective, autocast, load_ctc_head, save_ctc_head
from nota_model.build import save_trained
from nota_model.checkpoint import load_into, read_checkpoint
from nota_model.config import DecodingConfig
from nota_model.errors import AudioError
from nota_model.model import NotaModel
from nota_model.precision import device_capability, needs_grad_scaler, training_autocast_dtype
from nota_model.training import (
    Example,
    answer_loss,
    batch_for,
    choose_prompt,
    ctc_greedy,
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

log = structlog.get_logger("nota.train")






class WorkerTrainer:
    def __init__(self, config: TrainConfig, model: NotaModel, train: list[dict[str, Any]], validation: list[dict[str, Any]],
                 storage_options: list[dict[str, Any]], rank: int, world_size: int, caches: Sequence[CachedStates] = ()):
        self.config, self.run, self.model = config, config.run, model
        self.train_rows, self.validation_rows, self.storage_options = train, validation, storage_options
        self.caches = caches  # the feature caches that rows with a `cache` number come from
        self.rank, self.world_size = rank, world_size
        self.device = model.device
        self.amp_dtype = _amp_dtype(self.run.amp, self.device)
        self.trained = prepare_for_training(model, config.objective.frozen)
        self.objective = Objective(model, config.objective, config.datasets.max_answer_tokens, self.amp_dtype)
        self.module = ray.train.torch.prepare_model(
            self.objective,
            move_to_device=False,
            parallel_strategy_kwargs={"broadcast_buffers": False},
        )
        self.distributed = isinstance(self.module, torch.nn.parallel.DistributedDataParallel)
        weights = sampling_weights([row["task"] for row in train], config.datasets.task_weights)
        self.weights = weights
        self.epoch_size = config.datasets.samples_per_epoch or len(train)
        self.steps_per_epoch = steps_per_epoch(self.epoch_size, world_size, self.run.batch_size, self.run.gradient_accumulation)
        self.total_steps = self.run.max_steps or self.run.epochs * self.steps_per_epoch
        self.optimizer = make_optimizer(self.objective, self.run.optimizer)
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, self.run.optimizer, self.run.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=needs_grad_scaler(self.amp_dtype, model.dtype))
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
            load_ctc_head(self.objective, Path(directory))
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
            prompt = row["prompt"] or choose_prompt(self.prompts[row["task"]], self.run.seed, epoch, position)
            if "cache" in row:
                states = self.caches[row["cache"]].states(row)
                if self.config.augment.active:
                    states = mask_states(states, self.config.augment, mask_generator(self.run.seed, epoch, position))
                examples.append(Example(None, prompt, row["answer"], states))
                continue
            try:
                clip = decode_row(row, self.storage_options, self.model)
            except AudioError as err:
                failed += 1
                log.warning("train_item_skipped", id=row["id"], audio=row["audio"], error=err.code, message=err.message)
                continue
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
            loss, ctc, samples, tokens = self._train_step()
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
                "step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch, "loss": loss, "ctc_loss": ctc,
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

    def _train_step(self) -> tuple[float | None, float | None, int, int]:
        """One optimizer step; returns the answer loss per answer token and the CTC loss per sample (None for a
        term the objective leaves out), the samples and the answer tokens."""
        torch.manual_seed(step_seed(self.run.seed, self.step, self.rank))
        micro_batches = self._micro_batches(self.step)
        loss_sum, ctc_sum, tokens, samples, failed = 0.0, 0.0, 0, 0, 0
        for micro in range(len(micro_batches)):
            examples, skipped = self._pending.pop((self.step, micro)).result()
            failed += skipped
            if not examples:
                raise RuntimeError(f"step {self.step}: no item of a micro-batch could be decoded (see the warnings); "
                                   "check the corpus with `python -m jobs.manifest validate`")
            sync = micro == len(micro_batches) - 1 or not self.distributed
            with nullcontext() if sync else self.module.no_sync():
                step_loss = self.module(examples)
                self.scaler.scale(step_loss.total / len(micro_batches)).backward()
            loss_sum += (step_loss.answer or 0.0) * step_loss.answer_tokens
            ctc_sum += (step_loss.ctc or 0.0) * len(examples)
            tokens += step_loss.answer_tokens
            samples += len(examples)
        if self.run.optimizer.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.objective.parameters() if p.requires_grad], self.run.optimizer.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        loss_sum, ctc_sum, tokens, samples, failed = _all_sum([loss_sum, ctc_sum, tokens, samples, failed], self.distributed)
        self.skipped_items += int(failed)
        loss = loss_sum / max(tokens, 1) if self.config.objective.answer_weight else None
        ctc = ctc_sum / max(samples, 1) if self.objective.ctc_head is not None else None
        self.history.append({"step": self.step, "loss": loss, "ctc_loss": ctc, "lr": lr, "samples": int(samples)})
        return loss, ctc, int(samples), int(tokens)

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
            texts, ctc_texts = [None] * len(rows), [None] * len(rows)
            with torch.no_grad(), autocast(self.device, self.amp_dtype):
                if self.config.objective.answer_weight:
                    texts = self.model.generate(clips, prompts, decoding).texts
                    examples = [Example(clip, prompt, row["reference"][0]) for clip, prompt, row in zip(clips, prompts, rows)]
                    batch = batch_for(self.model, examples, self.config.datasets.max_answer_tokens)
                    loss_sum += float(answer_loss(self.model, batch, reduction="sum"))
                    tokens += batch.answer_tokens
                if self.objective.ctc_head is not None:
                    ctc_texts = ctc_greedy(self.model, self.objective.ctc_head, self.model.encode_audio(clips))
            results += [{"id": row["id"], "task": row["task"], "reference": row["reference"], "text": text, "ctc_text": ctc_text,
                         "error": None} for row, text, ctc_text in zip(rows, texts, ctc_texts)]
        train_mode(self.model)
        loss_sum, tokens = _all_sum([loss_sum, tokens], self.distributed)
        gathered = [results]
        if self.distributed:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, results)
        if self.rank != 0:
            return {}, None
        predictions = [row for part in gathered for row in part]
        scores = {"val/loss": loss_sum / tokens if tokens else None, "val/items": len(predictions), "val/seconds": time.perf_counter() - started,
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
        save_ctc_head(self.objective, directory)
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
    from jobs.scoring.coco_tools import caption_scores
    from jobs.metrics.wer import corpus_wer

    scores: dict[str, Any] = {}
    good = [row for row in predictions if row["error"] is None]
    scores["val/errors"] = len(predictions) - len(good)
    asr = [row for row in good if row["task"] == "asr" and row["text"] is not None]
    if asr:
        errors = corpus_wer([row["reference"][0] for row in asr], [row["text"] for row in asr])
        scores.update({"val/wer": errors.wer, "val/cer": errors.cer})
    heard = [row for row in good if row["task"] == "asr" and row.get("ctc_text") is not None]
    if heard:  # what the connector alone hears, through the CTC head
        scores["val/ctc_wer"] = corpus_wer([row["reference"][0] for row in heard], [row["ctc_text"] for row in heard]).wer
    aac = [row for row in good if row["task"] == "aac" and row["text"] is not None]
    if aac and validation.captions:
        try:
            captions = caption_scores([row["reference"] for row in aac], [row["text"] for row in aac], validation.spice_lib)
        except (RuntimeError, OSError, ValueError) as err:
            scores["val/caption_error"] = str(err)
        else:
            scores.update({"val/cider_d": captions.cider_d, "val/meteor": captions.meteor, "val/spice": captions.spice,
                           "val/spider": captions.spider})
    return scores


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    return training_autocast_dtype(amp, device_capability(device))


def _all_sum(values: list[float], distributed: bool) -> list[float]:
    if not distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def _memory(device: torch.device) -> dict[str, float]:
    """Peak memory so far: the process's resident set; on a GPU, jobs.metrics.memory's figures."""
    memory = {"max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        memory |= {f"gpu_{key.removesuffix('_bytes')}_gb": value / 2**30 for key, value in gpu_memory(device).items() if value is not None}
    return memory


