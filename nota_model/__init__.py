"""nota_model: the NOTA audio language model as a plain library (no Ray).

    from nota_model import load_config, load_model, load_audio
    loaded = load_model(load_config("tiny"), checkpoint=None)
    clip = load_audio("clip.wav", loaded.model.config.audio)
    output = loaded.model.generate([clip], [loaded.model.config.prompt.task_prompt("asr")])
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and the module it lives in, imported on first use (PEP 562): importing nota_model, or a light
# module of it (config, errors, overrides), loads neither torch nor transformers, so that a command can parse its
# arguments and check a config before paying for them.
_HOMES = {
    "AudioClip": "audio", "decode_audio": "audio", "load_audio": "audio", "prepare_waveform": "audio",
    "whisper_features": "audio",
    "LoadedModel": "build", "load_model": "build", "save_trained": "build",
    "LoadReport": "checkpoint",
    "NotaConfig": "config", "load_config": "config", "preset_names": "config",
    "GenerationOutput": "decoding",
    "AudioError": "errors", "CheckpointError": "errors", "ConfigError": "errors", "NotaError": "errors",
    "WeightsNotFoundError": "errors",
    "ModelFeatures": "features", "compute_features": "features",
    "NotaModel": "model",
}

__all__ = [
    "AudioClip",
    "AudioError",
    "CheckpointError",
    "ConfigError",
    "GenerationOutput",
    "LoadReport",
    "LoadedModel",
    "ModelFeatures",
    "NotaConfig",
    "NotaError",
    "NotaModel",
    "WeightsNotFoundError",
    "compute_features",
    "decode_audio",
    "load_audio",
    "load_config",
    "load_model",
    "prepare_waveform",
    "preset_names",
    "save_trained",
    "whisper_features",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'nota_model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nota_model.{_HOMES[name]}"), name)
