"""Plain Whisper speech recognition, batched and timed like the NOTA model: the reference model.

Two engines share the prompt, features and decoding settings: `WhisperASR` (transformers, the parity
reference) and `WhisperCT2` in `whisper_ct2.py` (CTranslate2, faster)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

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
ENGLISH = "en"


class WhisperPrompt:
    """Whisper's decoder prompt, the same for every engine: <|startoftranscript|> [<|lang|> <|task|>] <|notimestamps|>,
    and the language each clip is transcribed in: the config's, else the one the model finds most probable in it."""

    def __init__(self, config: WhisperASRConfig, generation: GenerationConfig, tokenizer: PreTrainedTokenizerBase):
        self.config = config
        self.generation = generation
        self.tokenizer = tokenizer
        multilingual = bool(getattr(generation, "is_multilingual", False))
        # language code -> its token id; empty for an English-only model, which has no language tokens
        self.language_tokens = {token[2:-2]: token_id for token, token_id in generation.lang_to_id.items()} if multilingual else {}
        if not multilingual and config.language not in (None, ENGLISH):
            raise ConfigError(f"{config.path} is an English-only Whisper: set language to null or 'en'")
        if multilingual and config.language is not None and config.language not in self.language_tokens:
            raise ConfigError(f"{config.path} knows no language {config.language!r}: set a Whisper language code "
                              f"({', '.join(sorted(self.language_tokens))}) or null to detect it")
        self.decoder_prompt = self.prompt_in(config.language)

    def prompt_for(self, task: str, prompt: str | None = None) -> str:
        """Whisper takes no text prompt: only speech recognition, described by its decoder prompt (without a
        language token where the model picks each clip's language)."""
        if task != ASR_TASK or prompt:
            raise ConfigError(f"the Whisper reference model does speech recognition only (task 'asr', no prompt), not {task!r}")
        return self.tokenizer.decode(self.decoder_prompt)

    def prompt_in(self, language: str | None) -> list[int]:
        """The decoder prompt for text in `language` (an English-only model's has no language token)."""
        prompt = [self.generation.decoder_start_token_id]
        if self.language_tokens:
            prompt += ([self.language_tokens[language]] if language else []) + [self.generation.task_to_id[self.config.task]]
        return prompt + [self.generation.no_timestamps_token_id]

    def chosen_languages(self, probabilities: Sequence[dict[str, float]]) -> tuple[list[str], list[float | None]]:
        """Each clip's language and its probability, given the model's probability of each language on each clip:
        the config's language, else the most probable one. An English-only model (no probabilities) writes English
        and cannot tell how likely that is."""
        if not self.language_tokens:
            return [ENGLISH] * len(probabilities), [None] * len(probabilities)
        languages = [self.config.language or max(clip, key=clip.get) for clip in probabilities]
        return languages, [clip[language] for clip, language in zip(probabilities, languages)]


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
        context is trimmed). Each clip's language comes from one decoder step on its encoder states, inside
        `ttft_s`; this engine gives no word times."""
        base = self.whisper.generation_config
        config = generation_config(decoding or self.config.decoding, [base.eos_token_id], base.pad_token_id, base=base)
        context = self.config.audio_context

        def run(indices: list[int]) -> GenerationOutput:
            chosen: dict[str, list] = {}

            def prepare() -> dict[str, torch.Tensor | BaseModelOutput]:
                group = [clips[i] for i in indices]
                group_features = compute_features(group, self.config) if features is None else [features[i] for i in indices]
                log_mel = stacked_log_mel(group_features, context.mel_frames(group[0].seconds)).to(self.device, self.dtype)
                states = whisper_encoder_states(self.whisper.get_encoder(), log_mel)
                chosen["languages"], chosen["probabilities"] = self.chosen_languages(self._language_probabilities(states))
                prompts = [self.prompt_in(language) for language in chosen["languages"]]
                return {"encoder_outputs": BaseModelOutput(last_hidden_state=states),
                        "decoder_input_ids": torch.tensor(prompts, dtype=torch.long, device=self.device)}

            output = timed_generate(prepare, self.whisper, config, self.tokenizer, self.device)
            return replace(output, languages=tuple(chosen["languages"]), language_probabilities=tuple(chosen["probabilities"]))

        return generate_in_groups(list(frame_groups([clip.seconds for clip in clips], context).values()), run)

    def _language_probabilities(self, states: torch.Tensor) -> list[dict[str, float]]:
        """Each clip's probability of each language: the decoder's first step after <|startoftranscript|>, over the
        language tokens alone (as CTranslate2's `detect_language`); none for an English-only model."""
        if not self.language_tokens:
            return [{}] * len(states)
        start = torch.full((len(states), 1), self.generation.decoder_start_token_id, dtype=torch.long, device=self.device)
        logits = self.whisper(encoder_outputs=BaseModelOutput(last_hidden_state=states), decoder_input_ids=start).logits
        probabilities = logits[:, -1, list(self.language_tokens.values())].float().softmax(-1).tolist()
        return [dict(zip(self.language_tokens, clip)) for clip in probabilities]


def load_whisper_asr(config: WhisperASRConfig, path: str, device: torch.device, dtype: torch.dtype) -> WhisperASR:
    whisper = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    check_mel_bins(config, whisper.config.num_mel_bins)
    return WhisperASR(config, whisper, WhisperTokenizer.from_pretrained(path))


def check_mel_bins(config: WhisperASRConfig, model_mel_bins: int) -> None:
    """The config's `num_mel_bins` (what the features are computed with) must be the model's."""
    if config.num_mel_bins != model_mel_bins:
        raise ConfigError(f"{config.path} takes {model_mel_bins} log-mel bins: set num_mel_bins: {model_mel_bins} in its config")
