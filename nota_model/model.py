"""The NOTA model: Whisper encoder + CED + window-level Q-Former + a causal LM with LoRA (SALMONN-style).
The Q-Former is the seed's BERT one or Whisper decoder layers (`qformer.kind`, `nota_model.connector`).

Attribute names follow the seed, so its checkpoint keys (`speech_Qformer.*`, `speech_query_tokens`,
`speech_llama_proj.*`, `ln_speech.*`, `ln_audio.*`, `llama_model.base_model.model.…lora_…`) load as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from nota_model.audio import AudioClip
from nota_model.audio_context import frame_groups, stacked_log_mel, whisper_encoder_states
from nota_model.ced import CEDEncoder, CEDFrontEnd
from nota_model.checkpoint import is_trained_key
from nota_model.config import DecodingConfig, NotaConfig
from nota_model.connector import build_connector
from nota_model.decoding import GenerationOutput, generation_config, timed_generate, with_llm_cache
from nota_model.errors import ConfigError
from nota_model.features import ModelFeatures, compute_features
from nota_model.qformer import pool_tokens, split_windows


class NotaModel(nn.Module):
    def __init__(
        self,
        config: NotaConfig,
        speech_encoder: WhisperEncoder,
        ced: CEDEncoder | None,
        llama_model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
    ):
        super().__init__()
        self.config = config
        # The dtype the encoders and the connector run in under autocast when it is not the LLM's (`dtype`):
        # float16 under a float32 LLM (`build`, `precision.llm_dtype`).
        self.encoder_dtype: torch.dtype | None = None
        self.speech_encoder = speech_encoder
        self.ced = ced
        self.ln_speech = nn.LayerNorm(config.speech_encoder.width)
        self.ln_audio = nn.LayerNorm(config.audio_encoder.width) if ced is not None else None
        self.speech_Qformer = build_connector(config, speech_encoder.config)
        width = self.speech_Qformer.hidden_size
        self.speech_query_tokens = nn.Parameter(torch.zeros(1, config.qformer.num_query_tokens, width))
        nn.init.normal_(self.speech_query_tokens, std=self.speech_Qformer.initializer_range)
        self.speech_llama_proj = nn.Linear(width, llama_model.get_input_embeddings().embedding_dim)
        self.llama_model = llama_model
        self.tokenizer = tokenizer
        self.bos_token_id = _token_id(tokenizer, config.prompt.bos_token)
        self.end_token_id = _token_id(tokenizer, config.prompt.end_symbol)
        self.pad_token_id = _token_id(tokenizer, config.prompt.pad_token)

    @property
    def device(self) -> torch.device:
        return self.speech_llama_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The LLM's dtype. The connector keeps float32 weights and, with the encoders (whose matrices
        `build.precast_encoders` cast to it), runs under autocast to it (or to `encoder_dtype`, when set)."""
        return self.llama_model.get_input_embeddings().weight.dtype

    def prompt_for(self, task: str, prompt: str | None = None) -> str:
        """The prompt an item gets: its own, or its task's."""
        return prompt or self.config.prompt.task_prompt(task)

    @torch.inference_mode()
    def audio_tokens(self, clips: Sequence[AudioClip], features: Sequence[ModelFeatures] | None = None) -> list[torch.Tensor]:
        """The audio tokens fed to the LLM for each clip, after the projection: (windows, LLM hidden) each.
        `features`: the clips' `compute_features`, when computed elsewhere (the job's decode tasks)."""
        return self.encode_audio(clips, features)

    def encode_audio(self, clips: Sequence[AudioClip], features: Sequence[ModelFeatures] | None = None) -> list[torch.Tensor]:
        """`audio_tokens` with autograd, for training: frozen encoders (no parameter requiring grad) run
        without building a graph; the layer norms, Q-Former and projection keep theirs."""
        features = compute_features(clips, self.config) if features is None else features
        with self._autocast():
            return self._connect(self._encoder_states(features, clips))

    def speech_states(self, clips: Sequence[AudioClip], features: Sequence[ModelFeatures] | None = None) -> list[torch.Tensor]:
        """The frozen Whisper encoder's states of each clip, (frames, width): what a training feature cache holds."""
        features = compute_features(clips, self.config) if features is None else features
        with self._autocast(), torch.no_grad():
            return self._speech_states(features, clips)

    def tokens_from_speech_states(self, states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`encode_audio` from cached `speech_states` (with autograd through the trained parts). Only for a
        model without the CED branch, whose input is the speech states alone."""
        if self.ced is not None:
            raise ConfigError("cached speech states hold the Whisper branch only: a model with a CED audio encoder "
                              "(audio_encoder.kind: ced) trains from the audio")
        with self._autocast():
            return self._connect([self.ln_speech(item.to(self.device)) for item in states])

    def _autocast(self) -> torch.autocast:
        dtype = self.encoder_dtype or self.dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def _connect(self, states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each clip's encoder states -> windows -> Q-Former (`num_query_tokens` queries per window) -> runs of
        `pool_tokens` outputs averaged -> projection to the LLM.
        The states are cast to the model's dtype first: the layer norms return float32 under autocast, and the
        windows (overlapping copies of the states) would be float32 too, though their only readers, the
        Q-Former's key and value projections, cast them to the same dtype anyway."""
        qformer = self.config.qformer
        windows = [split_windows(item.to(self.dtype).unsqueeze(0), qformer.window_frames, qformer.stride_frames) for item in states]
        queries = self.speech_query_tokens.expand(sum(len(item) for item in windows), -1, -1)
        outputs = self.speech_Qformer(queries, torch.cat(windows)).split([len(item) for item in windows])
        pooled = [pool_tokens(item.flatten(0, 1), qformer.pool_tokens) for item in outputs]
        tokens = self.speech_llama_proj(torch.cat(pooled))
        return [item.to(self.dtype) for item in tokens.split([len(item) for item in pooled])]

    def _encoder_states(self, features: Sequence[ModelFeatures], clips: Sequence[AudioClip]) -> list[torch.Tensor]:
        """Per clip: LayerNormed Whisper states, concatenated on channels with LayerNormed CED tokens.
        The shorter of the two is zero-padded to the longer, as the seed does."""
        speech = [self.ln_speech(states) for states in self._speech_states(features, clips)]
        if self.ced is None:
            return speech
        with _grad_only_if_trained(self.ced):
            encoded = self.ced.encode_spectrograms(self._ced_features(features, clips))
        audio = [self.ln_audio(tokens) for tokens in encoded]
        return [_concat_padded(s, a) for s, a in zip(speech, audio)]

    def _speech_states(self, features: Sequence[ModelFeatures], clips: Sequence[AudioClip]) -> list[torch.Tensor]:
        """Whisper's states of each clip: one forward per input length (a single one unless the audio context is trimmed)."""
        states: list[torch.Tensor] = [torch.empty(0)] * len(clips)
        context = self.config.speech_encoder.audio_context
        with _grad_only_if_trained(self.speech_encoder):
            for frames, indices in frame_groups([clip.seconds for clip in clips], context).items():
                log_mel = stacked_log_mel([features[i] for i in indices], frames).to(self.device)
                for index, item in zip(indices, whisper_encoder_states(self.speech_encoder, log_mel)):
                    states[index] = item
        return states

    def _ced_features(self, features: Sequence[ModelFeatures], clips: Sequence[AudioClip]) -> list[torch.Tensor]:
        """CED's front-end features: the shipped ones, unless a checkpoint gave this CED a front end other
        than the config's (then its own, from the waveforms)."""
        if self._standard_ced_front_end:
            return [torch.from_numpy(item.ced).to(self.device) for item in features]
        return [self.ced.front_end_features(torch.from_numpy(clip.waveform).to(self.device).unsqueeze(0))[0] for clip in clips]

    @cached_property
    def _standard_ced_front_end(self) -> bool:
        own, standard = self.ced.front_end.state_dict(), CEDFrontEnd(self.config.audio_encoder).state_dict()
        return all(torch.equal(own[key].cpu(), standard[key]) for key in standard)

    def prompt_embeddings(self, audio_tokens: Sequence[torch.Tensor], prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded LLM input embeddings and attention mask:
        [bos] + prompt before the placeholder + audio tokens + prompt after it, inside the template."""
        return self.left_pad([self.prompt_sequence(tokens, prompt) for tokens, prompt in zip(audio_tokens, prompts, strict=True)])

    def prompt_sequence(self, audio_tokens: torch.Tensor, prompt: str) -> torch.Tensor:
        """One item's unpadded LLM input embeddings: the prompt with the audio tokens in its placeholder."""
        embed = self.llama_model.get_input_embeddings()
        before, after = self.prompt_token_ids(prompt)
        head = embed(before)
        return torch.cat([head, audio_tokens.to(head.dtype), embed(after)])

    def left_pad(self, sequences: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding sequences left-padded with `[PAD]` to one length, and their attention mask."""
        longest = max(len(s) for s in sequences)
        padding = self.llama_model.get_input_embeddings()(torch.tensor([self.pad_token_id], device=self.device))
        embeds = torch.stack([torch.cat([padding.expand(longest - len(s), -1), s]) for s in sequences])
        mask = torch.stack([F.pad(torch.ones(len(s), dtype=torch.long), (longest - len(s), 0)) for s in sequences])
        return embeds, mask.to(self.device)

    def prompt_token_ids(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids around the audio tokens: ([bos] + the templated prompt before the placeholder,
        the rest after it)."""
        before, after = self._split_prompt(prompt)
        return self._token_ids(before, prefix=[self.bos_token_id]), self._token_ids(after)

    def _token_ids(self, text: str, prefix: Sequence[int] = ()) -> torch.Tensor:
        ids = [*prefix, *self.tokenizer(text, add_special_tokens=False).input_ids]
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _split_prompt(self, prompt: str) -> tuple[str, str]:
        placeholder = self.config.prompt.speech_placeholder
        if prompt.count(placeholder) != 1:
            raise ConfigError(f"a prompt must hold {placeholder!r} exactly once, where the audio goes: {prompt!r}")
        before, after = self.config.prompt.template.format(prompt).split(placeholder)
        return before, after

    @torch.inference_mode()
    def next_token_logits(self, clips: Sequence[AudioClip], prompts: Sequence[str]) -> torch.Tensor:
        """Logits of the first answer token for each clip and prompt: (B, vocabulary)."""
        embeds, mask = self.prompt_embeddings(self.audio_tokens(clips), prompts)
        output = self.llama_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask))
        return output.logits[:, -1, :].float()

    def generate(self, clips: Sequence[AudioClip], prompts: Sequence[str], decoding: DecodingConfig | None = None,
                 features: Sequence[ModelFeatures] | None = None) -> GenerationOutput:
        """Answer each prompt about its clip. A batch gives the same output as its items one at a time, up to
        rounding (CED's padded attention, `CEDEncoder.encode_spectrograms`).
        `features`: the clips' `compute_features`, when computed elsewhere."""

        def prepare() -> dict[str, torch.Tensor]:
            embeds, mask = self.prompt_embeddings(self.audio_tokens(clips, features), prompts)
            return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions(mask)}

        decoding = decoding or self.config.decoding
        stop_ids = [self.end_token_id, *(_token_id(self.tokenizer, token) for token in decoding.extra_stop_tokens)]
        config = with_llm_cache(generation_config(decoding, stop_ids, self.pad_token_id), decoding)
        return timed_generate(prepare, self.llama_model, config, self.tokenizer, self.device)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value for key, value in self.state_dict().items() if is_trained_key(key)}


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, so left padding shifts nothing."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _grad_only_if_trained(module: nn.Module) -> torch.autograd.grad_mode.set_grad_enabled:
    """No autograd graph through a frozen module (all its parameters have requires_grad False)."""
    return torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()))


def _concat_padded(speech: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    length = max(len(speech), len(audio))
    pad = lambda x: F.pad(x, (0, 0, 0, length - len(x)))
    return torch.cat([pad(speech), pad(audio).to(speech.dtype)], dim=-1)


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ConfigError(f"token {token!r} is not in the tokenizer's vocabulary: check the config's prompt section")
    return token_id
