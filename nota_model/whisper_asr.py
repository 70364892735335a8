"""Plain Whisper speech recognition, batched and timed like the NOTA model: the reference model.

Two engines share the prompt, features and decoding settings: `WhisperASR` (transformers, the parity
reference) and `WhisperCT2` in `whisper_ct2.py` (CTranslate2, faster)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase, WhisperForConditionalGeneration, WhisperTokenizer

from transformers.modeling_outputs import BaseModelOutput

from nota_model.audio import AudioClip
from nota_model.audio_context import frame_groups, stacked_log_mel, whisper_encoder_states
from nota_model.config import DecodingConfig, WhisperASRConfig
from nota_model.decoding import GenerationOutput, generate_in_groups, generation_config, timed_generate
from nota_model.errors import ConfigError
from nota_model.features import ModelFeatures, compute_features

ASR_TASK = "asr"


class WhisperPrompt:
    """Whisper's decoder prompt, the same for every engine: <|startoftranscript|> [<|lang|> <|task|>] <|notimestamps|>."""

    def __init__(self, config: WhisperASRConfig, generation: GenerationConfig, tokenizer: PreTrainedTokenizerBase):
        self.config = config
        self.tokenizer = tokenizer
        self.decoder_prompt = decoder_prompt(config, generation)

    def prompt_for(self, task: str, prompt: str | None = None) -> str:
        """Whisper takes no text prompt: only speech recognition, described by its decoder prompt."""
        if task != ASR_TASK or prompt:
            raise ConfigError(f"the Whisper reference model does speech recognition only (task 'asr', no prompt), not {task!r}")
        return self.tokenizer.decode(self.decoder_prompt)


def decoder_prompt(config: WhisperASRConfig, generation: GenerationConfig) -> list[int]:
    prompt = [generation.decoder_start_token_id]
    if getattr(generation, "is_multilingual", False):
        language = config.language or "en"
        prompt += [generation.lang_to_id[f"<|{language}|>"], generation.task_to_id[config.task]]
    elif config.language not in (None, "en"):
        raise ConfigError(f"{config.path} is an English-only Whisper: set language to null or 'en'")
    return prompt + [generation.no_timestamps_token_id]


class WhisperASR(nn.Module, WhisperPrompt):
    def __init__(self, config: WhisperASRConfig, whisper: WhisperForConditionalGeneration, tokenizer: PreTrainedTokenizerBase):
        nn.Module.__init__(self)
        WhisperPrompt.__init__(self, config, whisper.generation_config, tokenizer)
        self.whisper = whisper

    @property
    def device(self) -> torch.device:
        return self.whisper.device

    @property
    def dtype(self) -> torch.dtype:
        return self.whisper.dtype

    def generate(self, clips: Sequence[AudioClip], prompts: Sequence[str] | None = None, decoding: DecodingConfig | None = None,
                 features: Sequence[ModelFeatures] | None = None) -> GenerationOutput:
        """Transcribe each clip; `prompts` are accepted for the common interface and must be `prompt_for`'s.
        `features`: the clips' `compute_features`, when computed elsewhere. Whisper's `generate` returns only
        the tokens after the decoder prompt. One `generate` per encoder input length (one unless the audio
        context is trimmed)."""
        base = self.whisper.generation_config
        config = generation_config(decoding or self.config.decoding, [base.eos_token_id], base.pad_token_id, base=base)
        context = self.config.audio_context

        def run(indices: list[int]) -> GenerationOutput:
            def prepare() -> dict[str, torch.Tensor | BaseModelOutput]:
                group = [clips[i] for i in indices]
                group_features = compute_features(group, self.config) if features is None else [features[i] for i in indices]
                log_mel = stacked_log_mel(group_features, context.mel_frames(group[0].seconds)).to(self.device, self.dtype)
                states = whisper_encoder_states(self.whisper.get_encoder(), log_mel)
                return {"encoder_outputs": BaseModelOutput(last_hidden_state=states), "decoder_input_ids": self._prompt_batch(len(indices))}

            return timed_generate(prepare, self.whisper, config, self.tokenizer, self.device)

        return generate_in_groups(list(frame_groups([clip.seconds for clip in clips], context).values()), run)

    def _prompt_batch(self, size: int) -> torch.Tensor:
        return torch.tensor([self.decoder_prompt] * size, dtype=torch.long, device=self.device)


def load_whisper_asr(config: WhisperASRConfig, path: str, device: torch.device, dtype: torch.dtype) -> WhisperASR:
    whisper = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    check_mel_bins(config, whisper.config.num_mel_bins)
    return WhisperASR(config, whisper, WhisperTokenizer.from_pretrained(path))


def check_mel_bins(config: WhisperASRConfig, model_mel_bins: int) -> None:
    """The config's `num_mel_bins` (what the features are computed with) must be the model's."""
    if config.num_mel_bins != model_mel_bins:
        raise ConfigError(f"{config.path} takes {model_mel_bins} log-mel bins: set num_mel_bins: {model_mel_bins} in its config")
