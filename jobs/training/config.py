"""A training run's config: one YAML per stage, typed (unknown keys are errors), overridden by `--set`.

`model` (a preset or YAML, overrides, an optional init checkpoint: stage 2 starts from stage 1's), `datasets`
(training manifests, per-task mixing weights and training prompts, a held-out validation manifest), `run` (steps
or epochs, batch per worker, accumulation, AMP, AdamW and its schedule, workers, GPU or CPU, seed, where
checkpoints go), `augment` (masking of the cached encoder states, off by default) and `logging` (TensorBoard by
default, wandb when asked, offline mode supported).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import fsspec
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nota_model.config import NotaConfig, PromptConfig, load_config
from nota_model.errors import ConfigError, validation_problems
from nota_model.overrides import deep_merge
from nota_model.storage import cache_dir
from nota_model.training import OptimizerConfig, ScheduleConfig, TrainedPart


PLACEHOLDER = PromptConfig().speech_placeholder


def absolute_if_local(location: str) -> str:
    """A local path made absolute where the config is read (the driver): the workers do not run in the
    driver's working directory. URLs stay as they are."""
    if not is_local(location):
        return location
    return str(Path(fsspec.core.strip_protocol(location)).expanduser().absolute())


Location = Annotated[str, AfterValidator(absolute_if_local)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    """The model as inference builds it: a preset name or YAML, nested overrides, an init checkpoint."""

    config: str = "nota-0.5b"
    overrides: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Location | None = None  # trained parameters to start from (seed .pth or safetensors), path or URL

    def load(self) -> NotaConfig:
        config = load_config(self.config, self.overrides)
        if not isinstance(config, NotaConfig):
            raise ConfigError(f"model.config {self.config!r} is not a NOTA model: only the NOTA model trains")
        if config.lora.merge or config.llm.quantization != "none":
            raise ConfigError("lora.merge and llm.quantization are inference options: a model that trains keeps its "
                              "LoRA adapters apart and its LLM in floating point; drop them from model.overrides")
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
    # A local directory: train from the frozen speech encoder's states cached there (one subdirectory per training
    # manifest, built before training where missing: jobs.training.state_cache) instead of from the audio.
    feature_cache: Location | None = None

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


class ObjectiveSection(_Strict):
    """What the trained parts learn from in this stage, and which of them learn (jobs.training.objective)."""

    answer_weight: float = Field(1.0, ge=0)  # the answer tokens' cross-entropy through the LLM; 0: no LLM pass
    ctc_weight: float = Field(0.0, ge=0)  # CTC of the audio tokens against the answer's LLM input embeddings
    frozen: list[TrainedPart] = Field(default_factory=list)  # trained parts that stay as they are: connector, lora

    @model_validator(mode="after")
    def _check(self) -> ObjectiveSection:
        if not (self.answer_weight or self.ctc_weight):
            raise ValueError("objective: give answer_weight or ctc_weight a weight above 0")
        if not self.answer_weight and "lora" not in self.frozen:
            raise ValueError("objective: without the answer term (answer_weight 0) the LLM is not run: freeze lora")
        return self


class AugmentSection(_Strict):
    """SpecAugment-style masks over the training examples' cached encoder states (jobs.training.augment): masked
    values take the item's mean. Off by default; needs datasets.feature_cache; validation is never masked."""

    time_masks: int = Field(0, ge=0)  # time masks per example; 0: none
    time_mask_frames: int = Field(0, ge=0)  # each time mask's largest width, in encoder frames (drawn from 0 to it)
    channel_masks: int = Field(0, ge=0)  # channel masks per example; 0: none
    channel_mask_width: int = Field(0, ge=0)  # each channel mask's largest width, in state channels (drawn from 0 to it)

    @model_validator(mode="after")
    def _check(self) -> AugmentSection:
        if self.time_masks and not self.time_mask_frames:
            raise ValueError("augment: time_masks above 0 need time_mask_frames above 0")
        if self.channel_masks and not self.channel_mask_width:
            raise ValueError("augment: channel_masks above 0 need channel_mask_width above 0")
        return self

    @property
    def active(self) -> bool:
        return bool(self.time_masks or self.channel_masks)


class RunSection(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    storage_path: Location  # local path or fsspec URL; checkpoints go to STORAGE/NAME/checkpoint_*
    storage_options: dict[str, Any] = Field(default_factory=dict)
    epochs: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; give exactly one of epochs and max_steps
    batch_size: int = Field(4, ge=1)  # per worker and micro-batch
    gradient_accumulation: int = Field(1, ge=1)
    amp: Literal["auto", "none", "float16", "bfloat16"] = "auto"  # auto: bfloat16 on GPUs of capability >= 8.0, float16 below, none on CPU
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
    dir: Location | None = None


class LoggingSection(_Strict):
    tensorboard: bool = True
    dir: Location | None = None  # local directory for TensorBoard events and metrics.jsonl; default below
    wandb: WandbSection = Field(default_factory=WandbSection)


class TrainConfig(_Strict):
    model: ModelSection = Field(default_factory=ModelSection)
    datasets: DatasetsSection
    run: RunSection
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    augment: AugmentSection = Field(default_factory=AugmentSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.augment.active and not self.datasets.feature_cache:
            raise ValueError("augment masks the cached encoder states: it needs datasets.feature_cache "
                             "(training from audio computes the states inside the model, past the point of masking)")
        return self

    def log_dir(self) -> Path:
        """Where rank 0 writes TensorBoard events and metrics.jsonl: `logging.dir`, else STORAGE/NAME/logs for
        local storage; for object storage a local directory, copied to STORAGE/NAME/logs at each checkpoint."""
        if self.logging.dir:
            return Path(self.logging.dir)
        if is_local(self.run.storage_path):
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
        return TrainConfig.model_validate(deep_merge(data, overrides or {}))
    except ValidationError as err:
        raise ConfigError(f"invalid training config ({path}): {validation_problems(err.errors())}") from err


def is_local(url: str) -> bool:
    return fsspec.core.split_protocol(url)[0] in (None, "file", "local")
