"""nota_model: the NOTA audio language model as a plain library (no Ray).

    from nota_model import load_config, load_model, load_audio
    loaded = load_model(load_config("tiny"), checkpoint=None)
    clip = load_audio("clip.wav", loaded.model.config.audio)
    output = loaded.model.generate([clip], [loaded.model.config.prompt.task_prompt("asr")])
"""

from nota_model.audio import AudioClip, decode_audio, load_audio, prepare_waveform, whisper_features
from nota_model.build import LoadedModel, load_model, save_trained
from nota_model.checkpoint import LoadReport
from nota_model.config import NotaConfig, load_config, preset_names
from nota_model.decoding import GenerationOutput
from nota_model.errors import AudioError, CheckpointError, ConfigError, NotaError, WeightsNotFoundError
from nota_model.features import ModelFeatures, compute_features
from nota_model.model import NotaModel

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
