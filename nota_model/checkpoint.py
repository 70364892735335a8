"""Safe reading and writing of state dicts, and the seed's checkpoint contract.

Seed checkpoints are SALMONN-style `.pth` files, `{"model": state_dict, ...}`, read here with
`torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary objects.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from nota_model.config import WHISPER_FRAMES_PER_SECOND, NotaConfig
from nota_model.errors import CheckpointError

# Parameters a NOTA checkpoint trains; everything else comes from the frozen components' own weights.
TRAINED_PREFIXES = ("speech_Qformer.", "speech_query_tokens", "speech_llama_proj.", "ln_speech.", "ln_audio.")
LORA_MARKER = ".lora_"

# Frozen components whose entries the seed's saver left in its checkpoints (the resized, tied lm_head,
# say): the model takes them from the components' own weights. CED buffers (init_bn statistics, mel
# filterbank, window) are loaded: the seed's training may have updated the statistics.
FROZEN_PREFIXES = ("llama_model.", "beats.", "speech_encoder.")
# CED entries that our encoder has no use for: the classifier head.
CED_EXTRAS = ("outputlayer.",)


# The seed's run-config names of the settings a trained checkpoint depends on. A seed `.pth` stores its
# run config beside the weights; our safetensors store these in their metadata.
SEED_SETTINGS: dict[str, Callable[[NotaConfig], Any]] = {
    "second_per_window": lambda c: c.qformer.window_seconds,
    "second_stride": lambda c: c.qformer.stride_seconds,
    "num_speech_query_token": lambda c: c.qformer.num_query_tokens,
    "speech_qformer_layer": lambda c: c.qformer.num_layers,
    "lora_rank": lambda c: c.lora.r,
    "lora_alpha": lambda c: c.lora.alpha,
    "end_sym": lambda c: c.prompt.end_symbol,
    "prompt_template": lambda c: c.prompt.template,
}
SETTINGS_METADATA_KEY = "seed_settings"


@dataclass(frozen=True)
class LoadReport:
    loaded: list[str]
    ignored: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    trained_with: dict[str, Any]  # SEED_SETTINGS names -> values, as far as the file records them


def read_checkpoint(path: Path) -> Checkpoint:
    """A trained checkpoint: a seed `.pth` (`{"model": ..., "config": {"model": ...}}`) or our safetensors."""
    if path.suffix == ".safetensors":
        metadata = safetensors_metadata(path)
        return Checkpoint(read_state_dict(path), json.loads(metadata.get(SETTINGS_METADATA_KEY, "{}")))
    loaded = _torch_load(path)
    run_config = loaded.get("config") if isinstance(loaded, dict) else None
    model_config = run_config.get("model", {}) if isinstance(run_config, dict) else {}
    return Checkpoint(_unwrap(loaded, path), {k: v for k, v in model_config.items() if k in SEED_SETTINGS})


def safetensors_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's string metadata (ours: the settings it was trained with, where it came from)."""
    with safetensors.safe_open(str(path), "pt") as file:
        return file.metadata() or {}


def seed_settings(config: NotaConfig) -> dict[str, Any]:
    return {key: setting(config) for key, setting in SEED_SETTINGS.items()}


def check_trained_with(checkpoint: Checkpoint, config: NotaConfig, source: str) -> None:
    """A checkpoint trained with other windows, query tokens, LoRA sizes or prompt format would load
    without a shape error and give wrong text: refuse it."""
    ours = seed_settings(config)
    wrong = [
        f"{key}: trained with {value!r}, config has {ours[key]!r}"
        for key, value in checkpoint.trained_with.items()
        if _comparable(key, value) != _comparable(key, ours[key])
    ]
    if wrong:
        raise CheckpointError(f"{source} was trained with other settings than the model config; fix the config: {'; '.join(wrong)}")


def _comparable(key: str, value: Any) -> Any:
    return round(WHISPER_FRAMES_PER_SECOND * float(value)) if key.startswith("second_") else value


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, a directory of them, or a `.pth`/`.pt`/`.bin` file (weights only)."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not files:
            raise CheckpointError(f"{path} holds no *.safetensors or *.bin weight files")
        return {key: value for file in files for key, value in read_state_dict(file).items()}
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable safetensors file ({err}); re-download or re-save it") from err
    return _unwrap(_torch_load(path), path)


def is_trained_key(key: str) -> bool:
    return key.startswith(TRAINED_PREFIXES) or LORA_MARKER in key


def save_state_dict(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as safetensors to `path`, a new or regular file (safetensors replaces whatever is there,
    a device such as /dev/null included)."""
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is not a regular file: give a file path to write the weights to")
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    safetensors.torch.save_file(contiguous, str(path), metadata=metadata)


def publish_trained(source: Path, target: Path, notes: dict[str, str]) -> None:
    """Write a trained checkpoint as weights to ship: its tensors in float16 (the trained parts of a small model
    are a few MB), its metadata (the settings it was trained with) and `notes` (where it came from)."""
    metadata = safetensors_metadata(source)
    tensors = {key: value.half() if value.is_floating_point() else value for key, value in read_state_dict(source).items()}
    save_state_dict(tensors, target, metadata={**metadata, **notes})


def load_into(
    module: torch.nn.Module,
    checkpoint: dict[str, torch.Tensor],
    required: set[str],
    source: str,
    ignorable: Callable[[str], bool] | None = None,
) -> LoadReport:
    """Copy `checkpoint` into `module`. Every key in `required` must be present; other keys must belong
    to the module or be `ignorable` (by default: a known leftover of the seed's saver), which are never
    loaded. Anything else is an error, not a partial load."""
    ignorable = ignorable or is_seed_leftover
    own = module.state_dict()
    ignored = sorted(key for key in checkpoint if ignorable(key))
    missing = sorted(required - checkpoint.keys())
    unknown = sorted(key for key in checkpoint if key not in own and not ignorable(key))
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in checkpoint.items()
        if key in own and value.shape != own[key].shape
    ]
    if missing or unknown or mismatched:
        raise CheckpointError(_mismatch_message(source, missing, unknown, mismatched))
    loaded = sorted(key for key in checkpoint if key in own and not ignorable(key))
    with torch.no_grad():
        for key in loaded:
            own[key].copy_(checkpoint[key].to(own[key].dtype))
    return LoadReport(loaded=loaded, ignored=ignored)


def is_seed_leftover(key: str) -> bool:
    if key.endswith("embeddings.position_ids") or key.removeprefix("ced.").startswith(CED_EXTRAS):
        return True
    return key.startswith(FROZEN_PREFIXES) and LORA_MARKER not in key


def is_ced_extra(key: str) -> bool:
    return key.startswith(CED_EXTRAS)


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds Python objects other than tensors and plain containers; it is not loaded because that "
            f"would run arbitrary code. Re-save its state dict (torch.save(ckpt['model'], ...)) or as safetensors."
        ) from err
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({err}); it may be truncated") from err


def _unwrap(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict (nor {{'model': state_dict}}) of tensors")
    return state


def _mismatch_message(source: str, missing: list[str], unknown: list[str], mismatched: list[str]) -> str:
    parts = [f"{source} does not fit this model config (is it for another architecture or size?)"]
    for title, keys in (("missing", missing), ("unexpected", unknown), ("wrong shape", mismatched)):
        if keys:
            shown = ", ".join(keys[:8]) + (f" … and {len(keys) - 8} more" if len(keys) > 8 else "")
            parts.append(f"{len(keys)} {title}: {shown}")
    return "; ".join(parts)
