"""Typed model config, loadable from YAML. Every size is a value here, not a constant in the code.

A config names component weights by local path or fsspec URL. Where a path is missing the component
is built with random weights from its `hf_config` (tests, timing of the architecture).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nota_model.errors import ConfigError, validation_problems
from nota_model.overrides import deep_merge
from nota_model.storage import CTRANSLATE2_DIR

PRESETS_DIR = Path(__file__).parent / "presets"

# Whisper encoders turn 30 s into 1500 states: 50 per second, from 100 log-mel frames per second.
WHISPER_FRAMES_PER_SECOND = 50
WHISPER_MEL_FRAMES = 3000
WHISPER_MEL_FRAMES_PER_SECOND = 100


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AudioContextConfig(_Strict):
    """How much input the Whisper encoder sees (whisper.cpp's "audio context").
    `full` (the default): 30 s, the clip padded with silence, as Whisper was trained; exact.
    `clip`: the clip's own log-mel frames plus `margin_seconds` of the silence after it: the encoder's cost
    shrinks with the clip (about 30 s / (clip + margin)), at some risk to quality: Whisper never saw a
    shorter input in training. The NOTA model then also gives fewer audio tokens (one per 17 states:
    about 3 per second of input instead of 88 for every clip), so the LLM sees a shorter audio span than
    it was trained with."""

    mode: Literal["full", "clip"] = "full"
    margin_seconds: float = Field(1.0, ge=0.0)

    def mel_frames(self, seconds: float) -> int:
        """Log-mel frames the encoder takes for a clip of `seconds`: the clip and the margin rounded up to a
        whole second (clips of similar lengths then share a forward; Whisper has no padding mask), at most 30 s."""
        if self.mode == "full":
            return WHISPER_MEL_FRAMES
        return min(WHISPER_MEL_FRAMES, math.ceil(seconds + self.margin_seconds) * WHISPER_MEL_FRAMES_PER_SECOND)


class SpeechEncoderConfig(_Strict):
    """The Whisper encoder (frozen). `hf_config` holds transformers `WhisperConfig` fields; `audio_context`: how
    much input it sees (`AudioContextConfig`: 30 s, or trimmed to the clip)."""

    kind: Literal["whisper"] = "whisper"
    path: str | None = None
    hf_config: dict[str, Any] = Field(default_factory=dict)
    audio_context: AudioContextConfig = Field(default_factory=AudioContextConfig)

    @property
    def width(self) -> int:
        return int(self.hf_config.get("d_model", 1280))

    @property
    def num_mel_bins(self) -> int:
        return int(self.hf_config.get("num_mel_bins", 128))


class AudioEncoderConfig(_Strict):
    """The non-speech audio encoder (frozen). `ced` is the seed's CED variant; `none` drops the branch."""

    kind: Literal["ced", "beats", "none"] = "ced"
    path: str | None = None
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    patch_size: int = 16
    patch_stride: int = 16
    n_mels: int = 64
    n_fft: int = 512
    win_length: int = 512
    hop_length: int = 160
    f_min: float = 0.0
    f_max: float = 8000.0
    top_db: float = 120.0
    fbank_mean: float = 15.41663
    fbank_std: float = 6.55582
    target_length: int = 3001

    @property
    def width(self) -> int:
        return 0 if self.kind == "none" else self.embed_dim


class QFormerConfig(_Strict):
    """The connector: a window-level Q-Former, `num_query_tokens` learned queries per window of encoder frames.
    `kind`: `bert`, the seed's BERT layers with cross-attention, of the sizes below, random until trained;
    `whisper_decoder`, the first `num_layers` layers of the speech encoder's Whisper decoder and its final layer
    norm (DiVA, arXiv 2410.02678), of the decoder's own sizes, initialised from the decoder weights in the
    speech encoder's checkpoint (`nota_model.connector`): the BERT sizes (`hidden_size` to `initializer_range`)
    are then not read."""

    kind: Literal["bert", "whisper_decoder"] = "bert"
    hidden_size: int = 768
    num_layers: int = 2
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    cross_attention_freq: int = 1
    num_query_tokens: int = 1
    window_seconds: float = 0.333333
    stride_seconds: float = 0.333333
    initializer_range: float = 0.02
    # Consecutive audio tokens averaged into one before the projection (a clip's last run may be shorter): 2 halves
    # the tokens the LLM reads per second of audio, with the windows the connector was trained on. A longer window
    # would do the same, but a checkpoint trained with other windows is refused (`checkpoint.check_trained_with`).
    pool_tokens: int = Field(1, ge=1)

    @property
    def window_frames(self) -> int:
        return round(WHISPER_FRAMES_PER_SECOND * self.window_seconds)

    @property
    def stride_frames(self) -> int:
        return round(WHISPER_FRAMES_PER_SECOND * self.stride_seconds)


class LoRAConfig(_Strict):
    """LoRA on the LLM. `merge`: fold the adapters into the base weights once the trained parameters are loaded
    (peft's `merge_and_unload`): the same outputs up to float rounding, without the adapters' matmuls at each
    step; inference only (a model that trains keeps its adapters apart)."""

    enabled: bool = True
    merge: bool = False
    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "gate_proj")


class LLMConfig(_Strict):
    """A transformers causal LM. `hf_config` (with `model_type`) describes it for random init.
    `quantization`: `int8` runs the LLM's linear layers (LoRA adapters apart) with int8 weights (a scale per output
    channel) and activations quantised at each call with the whole batch's scale (torch's dynamic quantisation), so
    an item's scores move slightly with its batch-mates: CPU only, inference only, with `dtype` float32."""

    path: str | None = None
    tokenizer: str | None = None
    hf_config: dict[str, Any] = Field(default_factory=dict)
    quantization: Literal["none", "int8"] = "none"

    @property
    def tokenizer_path(self) -> str | None:
        return self.tokenizer or self.path


class PromptConfig(_Strict):
    template: str = "USER: {}\nASSISTANT:"
    speech_placeholder: str = "<SpeechHere>"
    bos_token: str = "<|im_start|>"
    end_symbol: str = "<|im_end|>"
    pad_token: str = "[PAD]"
    tasks: dict[str, str] = Field(
        default_factory=lambda: {
            "asr": "<Speech><SpeechHere></Speech> Recognize the speech and give me the transcription.",
            "aac": "<Speech><SpeechHere></Speech> Please write down what your hear in the audio.",
        }
    )

    def task_prompt(self, task: str) -> str:
        if task not in self.tasks:
            raise ConfigError(f"unknown task {task!r}: the config's prompt.tasks has {sorted(self.tasks)}; pass a prompt")
        return self.tasks[task]


class DecodingConfig(_Strict):
    """num_beams 1 is greedy search. Generation stops on the prompt's end symbol and on
    `extra_stop_tokens` (the seed's Qwen generation config also stopped on `<|endoftext|>`).
    `cache`: the LLM's KV cache in transformers' `generate`: `dynamic` (grows each step) or `static`
    (allocated once for the prompt plus `max_new_tokens`: fixed shapes, the same greedy tokens).
    `compile`: `torch.compile` the LLM's forward (with the static cache; the first batches of each
    shape pay the compilation). Both apply to the NOTA model's LLM; the Whisper engines ignore them.
    `word_timestamps`: each word's start, end and probability, from an alignment of the text with the audio
    after decoding (`nota_model.word_times`): Whisper on CTranslate2 only; the transformers engine, the parity
    reference, gives none, and the NOTA model cannot (its LLM's answer has no alignment to the audio)."""

    num_beams: int = Field(4, ge=1)
    max_new_tokens: int = Field(200, ge=1)
    min_new_tokens: int = Field(1, ge=0)
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    extra_stop_tokens: tuple[str, ...] = ()
    cache: Literal["dynamic", "static"] = "dynamic"
    compile: bool = False
    word_timestamps: bool = False

    @model_validator(mode="after")
    def _check_compile(self) -> DecodingConfig:
        if self.compile and self.cache != "static":
            raise ValueError("decoding.compile needs decoding.cache: static (a dynamic cache changes shape every step)")
        return self


class AudioConfig(_Strict):
    """How a clip is prepared: the seed pads to at least 1 s and truncates to 30 s (`max_seconds`, the model's
    window). `long_form` says what the batch runners do with a longer recording: `segment` it into pieces of
    at most the window (`nota_model.segment`), or `truncate` it to the window as the seed does. Recordings
    over `max_recording_seconds` are refused (error `audio_too_long`) before their samples are decoded."""

    sample_rate: int = 16000
    channel_mode: Literal["mean", "first"] = "mean"
    min_seconds: float = 1.0
    max_seconds: float = 30.0
    long_form: Literal["segment", "truncate"] = "segment"
    max_recording_seconds: float = Field(3600.0, gt=0)


class SignalsConfig(_Strict):
    """What a row says about how far to trust it (`nota_model.signals`). `skip_silence`: speech recognition audio
    in which the VAD hears no speech gets an empty answer and the `no_speech` flag without reaching the model
    (false: a clip of up to the window goes to the model whatever the VAD hears; a longer recording is cut at
    its speech either way). The thresholds: a mean token log-probability below `low_confidence_logprob` flags
    `low_confidence`, a compression ratio above `repetition_compression_ratio` flags `repetition` (Whisper's
    own defaults; a model's preset may set its own)."""

    skip_silence: bool = True
    low_confidence_logprob: float = -1.0
    repetition_compression_ratio: float = 2.4


class _ModelConfig(_Strict):
    """What every model kind's config has: a name, decoding, audio preparation, the signals' settings, a dtype and
    the items per model batch the batch job runs (`batch_size`; the job's `--batch-size` replaces it)."""

    name: str = "custom"
    decoding: DecodingConfig = Field(default_factory=DecodingConfig)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    signals: SignalsConfig = Field(default_factory=SignalsConfig)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _check_audio(self) -> _ModelConfig:
        if self.audio.max_seconds > 30.0:
            raise ValueError("audio.max_seconds above 30 does not fit the Whisper encoder's 30 s window")
        return self

    def with_overrides(self, overrides: dict[str, Any]) -> ModelConfig:
        return _validate(deep_merge(self.model_dump(), overrides), f"{self.name} with overrides", overrides)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class WhisperASRConfig(_ModelConfig):
    """Plain Whisper speech recognition: the reference every re-scoring compares against.
    `path` is a transformers Whisper directory (e.g. `pack://whisper-base`). `language`: the language to
    transcribe (a Whisper code, `en`); None: Whisper detects each piece's language and transcribes in it (an
    English-only model takes None or `en`, and always writes English). `engine`: `transformers` (torch;
    `dtype` applies) or `ctranslate2` (the C++ engine, several files per batch; `compute_type` applies: `auto`
    is int8 on CPU and float16 on GPU). `num_mel_bins`: the model's log-mel bins, which the features are
    computed with before the model is loaded (checked against the model when it loads). `audio_context`: see
    `AudioContextConfig` (both engines take a trimmed input)."""

    model_kind: Literal["whisper"] = "whisper"
    path: str
    language: str | None = "en"
    task: Literal["transcribe", "translate"] = "transcribe"
    engine: Literal["transformers", "ctranslate2"] = "transformers"
    ctranslate2_path: str | None = None
    num_mel_bins: int = 80  # the model's log-mel bins (80; 128 for large-v3), checked when it loads
    audio_context: AudioContextConfig = Field(default_factory=AudioContextConfig)
    compute_type: Literal[
        "auto", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32"
    ] = "auto"

    @property
    def ctranslate2_location(self) -> str:
        """The CTranslate2 model directory: `ctranslate2_path`, else the `ctranslate2` folder inside `path`."""
        return self.ctranslate2_path or f"{self.path.rstrip('/')}/{CTRANSLATE2_DIR}"


class NotaConfig(_ModelConfig):
    model_kind: Literal["nota"] = "nota"
    speech_encoder: SpeechEncoderConfig = Field(default_factory=SpeechEncoderConfig)
    audio_encoder: AudioEncoderConfig = Field(default_factory=AudioEncoderConfig)
    qformer: QFormerConfig = Field(default_factory=QFormerConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    seed: int = 0
    # The trained parameters (Q-Former, projection, LoRA; safetensors) the config ships with, loaded when no
    # checkpoint is given: a path, `pkg://nota_model/weights/...` or an fsspec URL. None: random until trained.
    trained_weights: str | None = None

    @model_validator(mode="after")
    def _check(self) -> NotaConfig:
        if self.qformer.hidden_size % self.qformer.num_heads:
            raise ValueError("qformer.hidden_size must be a multiple of qformer.num_heads")
        if self.decoding.word_timestamps:
            raise ValueError("decoding.word_timestamps: the NOTA model gives no word times (its LLM's answer has no "
                             "alignment to the audio); only the Whisper models do")
        if self.llm.quantization == "int8" and self.dtype not in ("auto", "float32"):
            raise ValueError(f"llm.quantization int8 computes in float32 around its int8 weights: dtype {self.dtype} "
                             "does not combine with it (use dtype float32 or auto)")
        return self

    @property
    def encoder_width(self) -> int:
        """Width of the concatenated encoder states the Q-Former attends to."""
        return self.speech_encoder.width + self.audio_encoder.width


ModelConfig = NotaConfig | WhisperASRConfig


def checkpoint_for(config: ModelConfig, checkpoint: str | None) -> str | None:
    """The trained parameters a model runs with: the checkpoint given, else those its config ships with."""
    return checkpoint or (config.trained_weights if isinstance(config, NotaConfig) else None)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(name_or_path: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Load a preset by name (see `preset_names()`) or a YAML file, then apply nested overrides."""
    path, source = PRESETS_DIR / f"{name_or_path}.yaml", f"preset {name_or_path}"
    if name_or_path not in preset_names():
        path, source = Path(name_or_path), name_or_path
    if not path.is_file():
        raise ConfigError(f"no preset or config file {name_or_path!r}; presets: {', '.join(preset_names())}")
    return _validate(deep_merge(_read(path), overrides or {}), source, overrides or {})


def _read(path: Path) -> dict[str, Any]:
    """A config file's keys, over those of the preset it names as `extends` (a recipe of a preset is its few
    options, not a copy of the preset)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    base = data.pop("extends", None)
    if base is None:
        return data
    if base not in preset_names():
        raise ConfigError(f"{path} extends {base!r}, which is no preset; presets: {', '.join(preset_names())}")
    return deep_merge(_read(PRESETS_DIR / f"{base}.yaml"), data)


def _validate(data: dict[str, Any], source: str, overrides: dict[str, Any]) -> ModelConfig:
    """The config, or a ConfigError naming each bad key, and saying which of them an override set (so that a bad
    `--set` is not blamed on the preset)."""
    kind = WhisperASRConfig if data.get("model_kind") == "whisper" else NotaConfig
    try:
        return kind.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(("override " if _overridden(error["loc"], overrides) else "") + validation_problems([error])
                             for error in err.errors())
        raise ConfigError(f"invalid model config ({source}): {problems}") from err


def _overridden(loc: tuple[int | str, ...], overrides: dict[str, Any]) -> bool:
    """Whether the value at `loc` (a pydantic error's location) comes from `overrides`."""
    node: Any = overrides
    for key in loc:
        if not isinstance(node, dict):
            return True  # the override replaced this whole part of the config
        if key not in node:
            return False
        node = node[key]
    return bool(loc)
