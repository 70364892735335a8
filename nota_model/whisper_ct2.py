"""The Whisper reference model on CTranslate2: the same decoder prompt, log-mel features and decoding
settings as the transformers engine, run by a C++ engine (int8 or float32 on CPU, float16 or
int8_float16 on GPU) with several files in one batch."""

from __future__ import annotations

import time
from collections.abc import Sequence

import ctranslate2
import numpy as np
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
from nota_model.word_times import Word, aligned_words


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
        CTranslate2 reports no per-step times: `ttft_s` is the features, encoder and language time plus one mean
        decode step, `tpot_s` the decoder's time over its steps (one per output token of the longest item, plus its
        stop). Word timestamps (`decoding.word_timestamps`) are aligned after decoding, outside both times."""
        decoding = decoding or self.config.decoding
        if decoding.min_new_tokens > 1:
            raise ConfigError("the ctranslate2 engine has no min_new_tokens; use engine: transformers for it")
        context = self.config.audio_context

        def run(indices: list[int]) -> GenerationOutput:
            group = [clips[i] for i in indices]
            started = time.perf_counter()
            group_features = compute_features(group, self.config) if features is None else [features[i] for i in indices]
            frames = context.mel_frames(group[0].seconds)
            log_mel = stacked_log_mel(group_features, frames).numpy()
            encoded = self.whisper.encode(ctranslate2.StorageView.from_array(log_mel), to_cpu=False)
            return self._decode(encoded, decoding, started, [min(frames, item.whisper.shape[1]) for item in group_features])

        return generate_in_groups(list(frame_groups([clip.seconds for clip in clips], context).values()), run)

    def _decode(self, encoded: ctranslate2.StorageView, decoding: DecodingConfig, started: float,
                audio_frames: list[int]) -> GenerationOutput:
        """Decode the encoded clips, each in its language; `audio_frames`: each clip's log-mel frames that are audio,
        not padding (for the word times)."""
        languages, probabilities = self.chosen_languages(self._language_probabilities(encoded))
        prompts = [self.prompt_in(language) for language in languages]
        decoding_started = time.perf_counter()
        results = self.whisper.generate(
            encoded,
            prompts,
            beam_size=decoding.num_beams,
            length_penalty=decoding.length_penalty,
            repetition_penalty=decoding.repetition_penalty,
            max_length=ct2_max_length(len(prompts[0]), decoding.max_new_tokens),
            suppress_blank=True,  # the generation config's begin_suppress_tokens: no blank, no end first
            suppress_tokens=list(self.generation.suppress_tokens or []),
            return_scores=True,
        )
        decode_s = time.perf_counter() - decoding_started
        token_ids = [result.sequences_ids[0] for result in results]
        steps = min(max(len(ids) for ids in token_ids) + 1, decoding.max_new_tokens)
        step_s = decode_s / steps
        return GenerationOutput(
            texts=[self.tokenizer.decode(ids, skip_special_tokens=False) for ids in token_ids],
            token_ids=token_ids,
            output_tokens=[len(ids) for ids in token_ids],
            ttft_s=decoding_started - started + step_s,
            tpot_s=step_s if steps > 1 else None,
            decode_steps=steps,
            # a score is the log-probabilities' sum (the stop token's included) over the token count to the length penalty
            logprob_sums=tuple(result.scores[0] * max(len(ids), 1) ** decoding.length_penalty
                               for result, ids in zip(results, token_ids)),
            languages=tuple(languages),
            language_probabilities=tuple(probabilities),
            words=self._words(encoded, prompts, token_ids, audio_frames, languages) if decoding.word_timestamps else (),
        )

    def _language_probabilities(self, encoded: ctranslate2.StorageView) -> list[dict[str, float]]:
        """Each clip's probability of each language (CTranslate2's `detect_language`, one decoder step); none for
        an English-only model."""
        if not self.language_tokens:
            return [{}] * encoded.shape[0]
        return [{token[2:-2]: probability for token, probability in clip} for clip in self.whisper.detect_language(encoded)]

    def _words(self, encoded: ctranslate2.StorageView, prompts: list[list[int]], token_ids: list[list[int]],
               audio_frames: list[int], languages: list[str]) -> tuple[list[Word], ...]:
        """Each clip's words and their times. Clips are aligned together only with others of the same decoder prompt
        and as many text tokens: padding a shorter text changes its token probabilities, so an item's words would
        depend on its batch-mates."""
        texts = [[token for token in ids if token < self.tokenizer.eos_token_id] for ids in token_ids]
        groups: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for index, (prompt, text) in enumerate(zip(prompts, texts)):
            groups.setdefault((tuple(prompt), len(text)), []).append(index)
        words: list[list[Word]] = [[] for _ in texts]
        for (prompt, _), indices in groups.items():
            alignments = self._align(encoded, indices, list(prompt), [texts[i] for i in indices], [audio_frames[i] for i in indices])
            for index, alignment in zip(indices, alignments):
                words[index] = aligned_words(texts[index], alignment.text_token_probs, alignment.alignments,
                                             self.tokenizer.decode, languages[index])
        return tuple(words)

    def _align(self, encoded: ctranslate2.StorageView, indices: list[int], prompt: list[int], texts: list[list[int]],
               audio_frames: list[int]) -> list:
        """CTranslate2's alignment of the texts with the encoder outputs of the batch's clips at `indices` (picked
        on their device: through torch on a GPU, numpy on the CPU; the array is kept here while `align` reads it).
        `align` puts <|notimestamps|> after the start sequence itself."""
        rows = encoded
        if len(indices) < encoded.shape[0]:
            picked = (torch.as_tensor(encoded, device=self.device)[indices].contiguous() if encoded.device == "cuda"
                      else np.ascontiguousarray(np.asarray(encoded)[indices]))
            rows = ctranslate2.StorageView.from_array(picked)
        return self.whisper.align(rows, prompt[:-1], texts, audio_frames)


def ct2_max_length(prompt_tokens: int, new_tokens: int) -> int:
    """CTranslate2's `max_length` for `new_tokens` decoding steps (the stop token's included) after a decoder prompt,
    as the transformers engine's `max_new_tokens` gives: its Whisper decodes min(max_length // 2, max_length - the
    prompt's tokens after the first) steps (whisper.cc; CTranslate2 issue 1856), so that the prompt's length plus
    the new tokens would stop at half of them."""
    return max(2 * new_tokens, new_tokens + prompt_tokens - 1)


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
