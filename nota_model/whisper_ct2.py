"""The Whisper reference model on CTranslate2: the same decoder prompt, log-mel features and decoding
settings as the transformers engine, run by a C++ engine (int8 or float32 on CPU, float16 or
int8_float16 on GPU) with several files in one batch."""

from __future__ import annotations

import time
from collections.abc import Sequence

import ctranslate2
import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, WhisperTokenizer

from nota_model.audio import AudioClip
from nota_model.audio_context import frame_groups, stacked_log_mel
from nota_model.config import DecodingConfig, WhisperASRConfig
from nota_model.decoding import GenerationOutput, generate_in_groups
from nota_model.errors import ConfigError
from nota_model.features import ModelFeatures, compute_features
from nota_model.precision import ct2_compute_type, device_capability
from nota_model.storage import resolve
from nota_model.whisper_asr import WhisperPrompt, check_mel_bins


class WhisperCT2(WhisperPrompt):
    def __init__(
        self,
        config: WhisperASRConfig,
        whisper: ctranslate2.models.Whisper,
        generation: GenerationConfig,
        tokenizer: PreTrainedTokenizerBase,
    ):
        super().__init__(config, generation, tokenizer)
        self.whisper = whisper
        self.generation = generation

    @property
    def device(self) -> torch.device:
        return torch.device(self.whisper.device)

    @property
    def compute_type(self) -> str:
        return self.whisper.compute_type

    def generate(self, clips: Sequence[AudioClip], prompts: Sequence[str] | None = None, decoding: DecodingConfig | None = None,
                 features: Sequence[ModelFeatures] | None = None) -> GenerationOutput:
        """Transcribe each clip; `prompts` are accepted for the common interface and must be `prompt_for`'s.
        `features`: the clips' `compute_features`, when computed elsewhere. CTranslate2's encoder takes fewer
        than 3000 frames as they are: a trimmed audio context runs one encode and generate per input length.
        CTranslate2 reports no per-step times: `ttft_s` is the features and encoder time plus one mean decode
        step, `tpot_s` the decoder's time over its steps (one per output token of the longest item, plus its stop)."""
        decoding = decoding or self.config.decoding
        if decoding.min_new_tokens > 1:
            raise ConfigError("the ctranslate2 engine has no min_new_tokens; use engine: transformers for it")
        context = self.config.audio_context

        def run(indices: list[int]) -> GenerationOutput:
            group = [clips[i] for i in indices]
            started = time.perf_counter()
            group_features = compute_features(group, self.config) if features is None else [features[i] for i in indices]
            log_mel = stacked_log_mel(group_features, context.mel_frames(group[0].seconds)).numpy()
            return self._decode(self.whisper.encode(ctranslate2.StorageView.from_array(log_mel), to_cpu=False), decoding, started)

        return generate_in_groups(list(frame_groups([clip.seconds for clip in clips], context).values()), run)

    def _decode(self, encoded: ctranslate2.StorageView, decoding: DecodingConfig, started: float) -> GenerationOutput:
        encoded_at = time.perf_counter()
        results = self.whisper.generate(
            encoded,
            [self.decoder_prompt] * encoded.shape[0],
            beam_size=decoding.num_beams,
            length_penalty=decoding.length_penalty,
            repetition_penalty=decoding.repetition_penalty,
            max_length=len(self.decoder_prompt) + decoding.max_new_tokens,
            suppress_blank=True,  # the generation config's begin_suppress_tokens: no blank, no end first
            suppress_tokens=list(self.generation.suppress_tokens or []),
        )
        decode_s = time.perf_counter() - encoded_at
        token_ids = [result.sequences_ids[0] for result in results]
        steps = min(max(len(ids) for ids in token_ids) + 1, decoding.max_new_tokens)
        step_s = decode_s / steps
        return GenerationOutput(
            texts=[self.tokenizer.decode(ids, skip_special_tokens=False) for ids in token_ids],
            token_ids=token_ids,
            output_tokens=[len(ids) for ids in token_ids],
            ttft_s=encoded_at - started + step_s,
            tpot_s=step_s if steps > 1 else None,
            decode_steps=steps,
        )


def load_whisper_ct2(config: WhisperASRConfig, device: torch.device, threads: int | None = None) -> WhisperCT2:
    """The CTranslate2 model at `config.ctranslate2_location`, with the prompt and tokenizer of the
    transformers directory at `config.path` (the same files the transformers engine reads)."""
    path = resolve(config.path)
    location = resolve(config.ctranslate2_location)
    if not (location / "model.bin").exists():
        raise ConfigError(
            f"{config.ctranslate2_location} holds no CTranslate2 model.bin: rebuild the pack (nota-batch packs), "
            "set ctranslate2_path, or use engine: transformers"
        )
    compute_type = ct2_compute_type(config.compute_type, device_capability(device))
    whisper = ctranslate2.models.Whisper(
        str(location), device=device.type, device_index=device.index or 0, compute_type=compute_type, intra_threads=threads or 0
    )
    check_mel_bins(config, whisper.n_mels)
    return WhisperCT2(config, whisper, GenerationConfig.from_pretrained(path), WhisperTokenizer.from_pretrained(path))
