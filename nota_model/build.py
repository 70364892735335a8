"""Assemble a NotaModel from its config: component weights from paths/URLs (random where none is given),
the seed's tokenizer set-up, LoRA, and an optional trained checkpoint."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from nota_model.ced import CEDEncoder, resize_position_embeddings
from nota_model.checkpoint import (
    SETTINGS_METADATA_KEY,
    LoadReport,
    check_trained_with,
    is_ced_extra,
    load_into,
    read_checkpoint,
    read_state_dict,
    save_state_dict,
    seed_settings,
)
from nota_model.config import (
    AudioEncoderConfig, LLMConfig, ModelConfig, NotaConfig, SpeechEncoderConfig, WhisperASRConfig, checkpoint_for,
)
from nota_model.connector import decoder_layer_weights, decoder_queries
from nota_model.errors import ConfigError
from nota_model.lightweight import check_quantization, merge_lora, quantize_int8
from nota_model.model import NotaModel
from nota_model.precision import (
    Capability, ct2_compute_type, device_capability, float16_overflow_warning, llm_dtype, resolve_dtype,
)
from nota_model.storage import resolve, sha256_of
from nota_model.whisper_asr import WhisperASR, load_whisper_asr

if TYPE_CHECKING:
    from nota_model.whisper_ct2 import WhisperCT2

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: NotaModel | WhisperASR | WhisperCT2
    identity: str
    checkpoint_sha256: str | None
    checkpoint_report: LoadReport | None
    random_parts: tuple[str, ...] = ()  # parts built with random weights: their output means nothing
    precision_warning: str | None = None  # `precision.float16_overflow_warning`

    def warning(self) -> str | None:
        """What a user must be told before reading this model's text, if anything."""
        warnings = [self.precision_warning] if self.precision_warning else []
        if self.random_parts:
            warnings.insert(0, f"{self.identity}: {', '.join(self.random_parts)} have RANDOM weights, so the text is "
                               "MEANINGLESS: it shows the model runs, not what it hears. Give trained weights (config "
                               "paths, --checkpoint).")
        return " ".join(warnings) or None


def load_model(
    config: ModelConfig, checkpoint: str | None = None, device: str | torch.device | None = None, threads: int | None = None
) -> LoadedModel:
    """Build the model a config describes: the NOTA model, or the Whisper reference model.
    `threads`: CPU threads of the engine (torch's for the process; CTranslate2's for its model)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads:
        torch.set_num_threads(threads)
    if isinstance(config, WhisperASRConfig):
        if checkpoint:
            raise ConfigError("the Whisper reference model takes no checkpoint: its weights are at its config's path")
        return _load_whisper(config, device, threads)
    return _load_nota(config, checkpoint_for(config, checkpoint), device)


def model_identity(config: ModelConfig, checkpoint: str | None = None, capability: Capability = None) -> str:
    """What output rows name as the model: the config's name, the checksum of the trained weights (the NOTA
    checkpoint; the Whisper reference model's own weights), the precision it runs in on a device of
    `capability` (None: the CPU) and the NOTA model's other options that change its arithmetic (`option_tags`),
    so that float16, int8, merged or pooled rows are never taken for one model's."""
    if isinstance(config, WhisperASRConfig):
        weights = resolve(config.path) / "model.safetensors"
        identity = f"{config.name}+weights:sha256:{sha256_of(weights)[:16]}" if weights.exists() else config.name
        return f"{identity}+{precision_tag(config, capability)}"
    checkpoint = checkpoint_for(config, checkpoint)
    return _nota_identity(config, sha256_of(resolve(checkpoint)) if checkpoint else None, capability)


def precision_tag(config: ModelConfig, capability: Capability) -> str:
    """The precision a model config runs in on a device: its torch dtype (`llm-float32:encoders-float16` where
    the LLM's and the encoders' differ; `llm-int8:…` for an int8 LLM), or CTranslate2's compute type."""
    if isinstance(config, WhisperASRConfig):
        if config.engine == "ctranslate2":
            return f"ctranslate2:{ct2_compute_type(config.compute_type, capability)}"
        return _dtype_name(resolve_dtype(config.dtype, capability))
    check_quantization(config.llm, capability)
    llm, encoders = nota_dtypes(config, capability)
    llm_name = "int8" if config.llm.quantization == "int8" else _dtype_name(llm)
    return llm_name if llm_name == _dtype_name(encoders) else f"llm-{llm_name}:encoders-{_dtype_name(encoders)}"


def option_tags(config: NotaConfig) -> list[str]:
    """The identity's names of the NOTA options, besides precision, that change what the model computes:
    `lora-merged` (the same outputs up to rounding), `pool-tokens-N` (N audio tokens averaged into one)."""
    tags = {"lora-merged": config.lora.enabled and config.lora.merge,
            f"pool-tokens-{config.qformer.pool_tokens}": config.qformer.pool_tokens > 1}
    return [tag for tag, applies in tags.items() if applies]


def nota_dtypes(config: NotaConfig, capability: Capability) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes of a NOTA model's LLM and of its encoders on a device of `capability` (`precision.llm_dtype`;
    the LLM's family is read only where it matters, for float16)."""
    encoders = resolve_dtype(config.dtype, capability)
    model_type = llm_model_type(config.llm) if encoders == torch.float16 else None
    return llm_dtype(config.dtype, capability, model_type), encoders


def llm_model_type(config: LLMConfig) -> str | None:
    """The LLM's family (`qwen2`, `llama`): its weights' config.json, else `hf_config`'s `model_type`."""
    if config.path is None:
        return config.hf_config.get("model_type")
    return AutoConfig.from_pretrained(resolve(config.path)).model_type


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _nota_identity(config: NotaConfig, checkpoint_sha256: str | None, capability: Capability) -> str:
    weights = f"ckpt:sha256:{checkpoint_sha256[:16]}" if checkpoint_sha256 else "no-checkpoint"
    return "+".join([config.name, weights, precision_tag(config, capability), *option_tags(config)])


def _load_whisper(config: WhisperASRConfig, device: torch.device, threads: int | None) -> LoadedModel:
    if config.engine == "ctranslate2":
        # imported for its engine alone: the GPU check's image has no CTranslate2 (benchmarks/README.md)
        from nota_model.whisper_ct2 import load_whisper_ct2

        model = load_whisper_ct2(config, device, threads)
    else:
        model = load_whisper_asr(config, str(resolve(config.path)), device, resolve_dtype(config.dtype, device_capability(device)))
    identity = model_identity(config, capability=device_capability(device))
    return LoadedModel(model=model, identity=identity, checkpoint_sha256=None, checkpoint_report=None)


def _load_nota(config: NotaConfig, checkpoint: str | None, device: torch.device) -> LoadedModel:
    """Build the model on `device` and load `checkpoint` (a seed `.pth` or our
    safetensors of the trained parameters) when given. LoRA is merged into the LLM (`lora.merge`) once loaded, in
    float32. The LLM takes the config's dtype (`precision.llm_dtype`), cast before it moves to the device, or int8
    linear layers (`llm.quantization`); the frozen encoders' matrix weights are cast to theirs once here
    (`precast_encoders`: the LLM's, but float16 under a float32 LLM kept out of float16); the trained connector
    keeps float32 weights, under autocast."""
    capability = device_capability(device)
    check_quantization(config.llm, capability)
    torch.manual_seed(config.seed)
    speech_encoder, connector_weights = build_speech_parts(config)
    ced = build_audio_encoder(config.audio_encoder)
    llm, tokenizer = build_llm(config)
    model = NotaModel(config, speech_encoder, ced, llm, tokenizer)
    if connector_weights:
        load_into(model, connector_weights, required=set(connector_weights), source=config.speech_encoder.path,
                  ignorable=lambda key: False)
    report, sha = None, None
    if checkpoint:
        path = resolve(checkpoint)
        sha = sha256_of(path)
        trained = read_checkpoint(path)
        check_trained_with(trained, config, source=checkpoint)
        report = load_into(model, trained.tensors, required=set(model.trained_state_dict()), source=checkpoint)
        log.info("checkpoint_loaded", checkpoint=checkpoint, sha256=sha, loaded=len(report.loaded), ignored=report.ignored)
    if config.lora.enabled and config.lora.merge:
        model.llama_model = merge_lora(model.llama_model)
    dtype, encoder_dtype = nota_dtypes(config, capability)
    model.llama_model.to(dtype)
    if config.llm.quantization == "int8":
        quantize_int8(model.llama_model)
    precast_encoders(model, encoder_dtype)
    model.encoder_dtype = encoder_dtype if encoder_dtype != dtype else None
    model.to(device).eval()
    warning = float16_overflow_warning(model.llama_model.config.model_type, dtype)
    if warning:
        log.warning("float16_overflow_risk", model=config.name, message=warning)
    identity = _nota_identity(config, sha, capability)
    return LoadedModel(model, identity, sha, report, random_parts=random_parts(config, checkpoint), precision_warning=warning)


# Modules whose weights autocast casts to its dtype at every call: cast once instead, bit for bit the same.
# Layer norms and position embeddings run in float32 under autocast and keep their float32 weights.
AUTOCAST_CAST_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


def precast_encoders(model: NotaModel, dtype: torch.dtype) -> None:
    """Cast the frozen encoders' Linear and Conv weights to `dtype`, which `encode_audio`'s autocast would
    cast them to at every batch (a float32 copy of large-v3-turbo's encoder is 2.5 GB). CED's `patch_embed`
    stays float32: its weights' dtype is the dtype CED's input batch norm (`init_bn`) runs in."""
    if dtype == torch.float32:
        return
    encoders = {"speech_encoder": model.speech_encoder, "ced": model.ced}
    for prefix, encoder in encoders.items():
        if encoder is None:
            continue
        for name, module in encoder.named_modules():
            if isinstance(module, AUTOCAST_CAST_MODULES) and not (prefix == "ced" and name.startswith("patch_embed")):
                module.to(dtype)


def random_parts(config: ModelConfig, checkpoint: str | None) -> tuple[str, ...]:
    """The parts a model would get random weights for: their output means nothing."""
    if isinstance(config, WhisperASRConfig):
        return ()
    parts = {
        "speech encoder": config.speech_encoder.path is None,
        "audio encoder": config.audio_encoder.kind != "none" and config.audio_encoder.path is None,
        "LLM": config.llm.path is None,
        "Q-Former, projection and LoRA": checkpoint_for(config, checkpoint) is None,
    }
    return tuple(name for name, random in parts.items() if random)


def save_trained(model: NotaModel, path: Path) -> None:
    """Write the trained parameters, under the seed's key names, as safetensors."""
    metadata = {"format": "nota-trained", "config": model.config.name, SETTINGS_METADATA_KEY: json.dumps(seed_settings(model.config))}
    save_state_dict(model.trained_state_dict(), path, metadata=metadata)


@dataclass(frozen=True)
class WhisperCheckpoint:
    """A Whisper model's config and weights (None: random, from the config's `hf_config`), read once for the
    encoder and the connector that may start from its decoder."""

    config: WhisperConfig
    weights: dict[str, torch.Tensor] | None
    source: str | None

    def part(self, name: str) -> dict[str, torch.Tensor]:
        """The `encoder`'s or the `decoder`'s weights, under their own module's key names."""
        prefixes = (f"model.{name}.", f"{name}.")  # WhisperForConditionalGeneration's, WhisperModel's
        return {key.removeprefix(prefix): value for key, value in self.weights.items()
                for prefix in prefixes if key.startswith(prefix)}


def read_whisper(config: SpeechEncoderConfig) -> WhisperCheckpoint:
    """The Whisper checkpoint at `config.path` (its config checked against `hf_config`), or random from `hf_config`."""
    if config.path is None:
        return WhisperCheckpoint(WhisperConfig(**config.hf_config), None, None)
    path = resolve(config.path)
    hf_config = WhisperConfig.from_pretrained(path)
    _check_sizes("speech_encoder", config.hf_config, hf_config.to_dict(), ("d_model", "num_mel_bins", "encoder_layers"))
    return WhisperCheckpoint(hf_config, read_state_dict(path), config.path)


def build_speech_parts(config: NotaConfig) -> tuple[WhisperEncoder, dict[str, torch.Tensor]]:
    """The Whisper encoder, and the connector's initial weights from the same checkpoint, under the model's key
    names: the decoder's (`connector.decoder_layer_weights`, `decoder_queries`) for `qformer.kind:
    whisper_decoder` with Whisper weights, none otherwise (the connector keeps its random init)."""
    whisper = read_whisper(config.speech_encoder)
    encoder = build_whisper_encoder(whisper)
    if whisper.weights is None or config.qformer.kind != "whisper_decoder":
        return encoder, {}
    decoder = whisper.part("decoder")
    layers = decoder_layer_weights(decoder, config.qformer.num_layers, config.encoder_width)
    queries = decoder_queries(decoder, whisper.config.decoder_start_token_id, config.qformer.num_query_tokens)
    return encoder, {"speech_query_tokens": queries, **{f"speech_Qformer.{key}": value for key, value in layers.items()}}


def build_whisper_encoder(whisper: WhisperCheckpoint) -> WhisperEncoder:
    encoder = WhisperEncoder(whisper.config)
    if whisper.weights is not None:
        load_into(encoder, whisper.part("encoder"), required=_parameter_names(encoder), source=whisper.source,
                  ignorable=lambda key: False)
    return encoder


def build_audio_encoder(config: AudioEncoderConfig) -> CEDEncoder | None:
    if config.kind == "none":
        return None
    if config.kind != "ced":
        raise ConfigError(f"audio_encoder.kind {config.kind!r} is not implemented; use 'ced' or 'none'")
    ced = CEDEncoder(config)
    if config.path is not None:
        load_into(
            ced,
            resize_position_embeddings(read_state_dict(resolve(config.path)), ced),
            required=_parameter_names(ced) | {"init_bn.1.running_mean", "init_bn.1.running_var"},
            source=config.path,
            ignorable=is_ced_extra,
        )
    return ced


def build_llm(config: NotaConfig) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The causal LM with the seed's tokenizer set-up: a pad token added and the embeddings resized to
    the tokenizer (which may shrink them), then LoRA when enabled."""
    llm_config = config.llm
    tokenizer = load_tokenizer(llm_config)
    tokenizer.add_special_tokens({"pad_token": config.prompt.pad_token})
    tokenizer.bos_token, tokenizer.eos_token = config.prompt.bos_token, config.prompt.end_symbol
    llm = _causal_lm(llm_config)
    llm.resize_token_embeddings(len(tokenizer))
    if config.lora.enabled:
        lora = config.lora
        with warnings.catch_warnings():  # peft 0.21 still reads transformers' deprecated alias
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            llm = get_peft_model(
                llm,
                LoraConfig(
                    task_type="CAUSAL_LM",
                    inference_mode=True,
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=list(lora.target_modules),
                ),
            )
    return llm, tokenizer


def load_tokenizer(config: LLMConfig) -> PreTrainedTokenizerBase:
    if config.tokenizer_path is None:
        raise ConfigError("llm.tokenizer (or llm.path) must name a tokenizer directory")
    return AutoTokenizer.from_pretrained(resolve(config.tokenizer_path))


def _causal_lm(config: LLMConfig) -> torch.nn.Module:
    if config.path is None:
        if "model_type" not in config.hf_config:
            raise ConfigError("llm.hf_config needs a model_type (e.g. qwen2) to build a random-weight LLM")
        fields = dict(config.hf_config)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    path = resolve(config.path)
    _check_sizes("llm", config.hf_config, AutoConfig.from_pretrained(path).to_dict(), ("hidden_size", "num_hidden_layers"))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _check_sizes(section: str, expected: dict, actual: dict, names: tuple[str, ...]) -> None:
    wrong = [f"{name}: config {expected[name]} vs weights {actual.get(name)}" for name in names if name in expected and expected[name] != actual.get(name)]
    if wrong:
        raise ConfigError(f"{section}.hf_config disagrees with the weights at {section}.path ({'; '.join(wrong)})")


def _parameter_names(module: torch.nn.Module) -> set[str]:
    return {name for name, _ in module.named_parameters()}
