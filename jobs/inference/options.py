"""A batch-inference run's options, typed: from a YAML file (`--config`), then the command line's flags over it.

Every field is also a flag of the same name (`batch_size` is `--batch-size`); unknown keys are errors. A flag
replaces the file's value, but for the two mappings, which merge key by key: `overrides` (the model config's;
`--set KEY=VALUE` adds to them) and `storage_options` (`--storage-options JSON`).
"""

from __future__ import annotations

from typing import Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jobs.command_line import check_storage_options, parse_storage_options
from nota_model.errors import ConfigError, validation_problems
from nota_model.overrides import deep_merge, parse_overrides

# On a node without GPUs decoding gets this share of a CPU, the model actors the rest.
CPU_NODE_DECODE_CPUS = 0.25
# A GPU's share per actor may leave this much of each GPU unused: 0.333 (three actors) is 1/3.
GPU_SHARE_SLACK = 0.01


class RunOptions(BaseModel):
    """What `python -m jobs.infer` (`nota-batch infer`) runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: str = Field(description="corpus manifest (YAML), path or URL")
    model: str = Field(description="preset name or YAML config")
    output: str = Field(description="output URL (local path, s3://...)")
    checkpoint: str | None = Field(None, description="trained parameters (seed .pth or safetensors), path or URL")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="model config overrides: nested in the file (`overrides: {llm: {path: ...}}`), one --set "
        "KEY=VALUE each on the command line (`--set llm.path=...`)")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for the manifest, the corpus and the output, e.g. an S3 endpoint; credentials "
        "belong in the standard AWS variables")
    batch_size: int | None = Field(
        None, ge=1, description="items per model batch (pieces of long recordings) (default: the model config's "
        "batch_size, 8 unless the preset says)")
    long_form: Literal["segment", "truncate"] | None = Field(
        None,
        description="a recording longer than the model's 30 s window: segment it (speech at pauses found by a VAD, "
        "other tasks in fixed windows) and stitch the answers, or truncate it to 30 s as the seed does "
        "(default: the config's audio.long_form, segment)")
    pool_size: int | None = Field(
        None, ge=1, description="model actors to start with (default: 1 / --gpus-per-actor per GPU, else 1)")
    max_pool_size: int | None = Field(None, ge=1, description="let the pool grow to this many as GPU nodes join")
    actor_restarts: int = Field(
        3, ge=0, description="restarts of a model actor whose node is lost or whose device fails, "
        "its batches redone, before the job fails (a node lost now and then is survived, a broken GPU is not)")
    cpus_per_actor: float | None = Field(
        None, gt=0,
        description="CPUs reserved per model actor; its model runs as many threads (default: 1 with GPUs; without "
        "GPUs, a node's CPUs less the decode share, split between the actors on it)")
    decode_cpus: float | None = Field(
        None, gt=0,
        description=f"CPUs reserved per audio decoding task (default: 1 with GPUs, {CPU_NODE_DECODE_CPUS} without)")
    gpus_per_actor: float = Field(
        1.0, gt=0, le=1,
        description="share of a GPU per model actor, 1/k for a whole k so that k actors fill each GPU (0.5, 0.25, "
        "0.333): several copies of a small model on one GPU, each in its own share of the GPU's memory; GPU runs "
        "only")
    accelerator: Literal["auto", "gpu", "cpu"] = Field(
        "auto",
        description="auto: GPUs for the model actors (--gpus-per-actor each) if the cluster has GPUs when the job "
        "starts; gpu: always (on an autoscaling cluster whose GPU nodes join later); cpu: never")
    gpu_wait: float = Field(
        300.0, gt=0,
        description="seconds to wait for a GPU for the model actors (a GPU node to join) before exiting 2; GPU "
        "runs only")
    job_id: str | None = Field(None, description="default: the Ray job submission id, else a fresh one")
    strict: bool = Field(False, description="exit 1 when any item has an error")
    dry_run: bool = Field(
        False,
        description="read and decode every item and write its row (audio seconds, sample rate, channels, errors; "
        "no text) without loading a model; the output is marked `dry-run` and never mixes with a model's")
    ray_progress: bool = Field(
        False, description="show Ray Data's per-operator progress too (by default it goes to Ray Data's log file)")
    no_score: bool = Field(False, description="skip scoring the corpus at the end (OUTPUT/NAME/_scores)")
    references: str | None = Field(
        None, description="a corpus manifest, or a JSONL/Parquet of id and reference, replacing the rows' references")
    spice_lib: str | None = Field(
        None, description="folder with the Stanford CoreNLP 3.6.0 jars SPICE needs (default: $NOTA_SPICE_LIB)")

    @field_validator("gpus_per_actor")
    @classmethod
    def _whole_gpus(cls, share: float) -> float:
        """Actors on a GPU must fill it: with 0.4, two fit and a fifth of every GPU would stay unused."""
        if 1 - int(1 / share + 1e-9) * share > GPU_SHARE_SLACK:
            raise ValueError(f"gpus_per_actor {share} does not divide a GPU: give 1/k for a whole k (1, 0.5, 0.333, "
                             f"0.25, 0.2, ...), so that k actors fill each GPU")
        return share

    @model_validator(mode="after")
    def _gpu_share_on_gpus(self) -> RunOptions:
        if self.accelerator == "cpu" and self.gpus_per_actor != 1:
            raise ValueError("gpus_per_actor is for GPU runs; with accelerator cpu the model actors take "
                             "--cpus-per-actor CPUs each: drop --gpus-per-actor")
        return self

    def with_model_batch_size(self, model_batch_size: int) -> RunOptions:
        """These options with the model config's `batch_size` where none was given."""
        return self if self.batch_size else self.model_copy(update={"batch_size": model_batch_size})

    @property
    def actors_per_gpu(self) -> int:
        """Model actors that share one GPU (1 / gpus_per_actor)."""
        return int(1 / self.gpus_per_actor + 1e-9)


def run_options(config: str | None, flags: dict[str, Any]) -> RunOptions:
    """The options of a run: the YAML file `config` (path or URL; None: none), then `flags` (field names; `set`:
    a list of KEY=VALUE, `storage_options`: a JSON object) over it. Storage options are checked against the
    filesystems of the manifest, output and references URLs here, before any of them is opened."""
    data = _read(config) if config else {}
    flags = dict(flags)
    if "set" in flags:
        flags["overrides"] = parse_overrides(flags.pop("set"))
    if isinstance(flags.get("storage_options"), str):
        flags["storage_options"] = parse_storage_options(flags["storage_options"])
    merged = {**data, **flags}
    for mapping in ("overrides", "storage_options"):
        if isinstance(data.get(mapping), dict) and mapping in flags:
            merged[mapping] = deep_merge(data[mapping], flags[mapping])
    try:
        options = RunOptions.model_validate(merged)
    except ValidationError as err:
        where = f" ({config} and the flags)" if config else ""
        raise ConfigError(f"invalid run options{where}: {_explain(err)}") from None
    check_storage_options(options.storage_options, [options.manifest, options.output, options.references])
    return options


def _read(url: str) -> dict[str, Any]:
    try:
        with fsspec.open(url, "rb") as file:
            data = yaml.safe_load(file.read())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the run options {url}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{url} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{url}: run options are a YAML mapping of option names (manifest, model, output, ...)")
    return data


def _explain(err: ValidationError) -> str:
    """One line; a missing option names both of its spellings."""
    missing = [".".join(map(str, e["loc"])) for e in err.errors() if e["type"] == "missing"]
    others = [e for e in err.errors() if e["type"] != "missing"]
    return "; ".join([*(f"{name} is missing (--{name.replace('_', '-')}, or `{name}:` in --config)" for name in missing),
                      *([validation_problems(others, whole="run options")] if others else [])])
