"""Rank 0's training metrics: structlog lines, metrics.jsonl, TensorBoard, and wandb when enabled."""

from __future__ import annotations

import json
import time
from typing import Any

import fsspec
import structlog

from jobs.training.config import TrainConfig, is_local
from nota_model.errors import ConfigError

log = structlog.get_logger("nota.train")


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
        if is_local(run.storage_path) and not run.storage_options:
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
