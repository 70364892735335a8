"""Whisper's encoder on the clip's own length (whisper.cpp's "audio context"): the log-mel cut to fewer
than 3000 frames and the position embeddings cut to match. `AudioContextConfig` says how many frames."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from nota_model.config import WHISPER_MEL_FRAMES, AudioContextConfig
from nota_model.features import ModelFeatures


def frame_groups(seconds: Sequence[float], context: AudioContextConfig) -> dict[int, list[int]]:
    """Item indices by the log-mel frames their encoder input has: items of one group share a forward."""
    groups: dict[int, list[int]] = defaultdict(list)
    for index, clip_seconds in enumerate(seconds):
        groups[context.mel_frames(clip_seconds)].append(index)
    return dict(groups)


def stacked_log_mel(features: Sequence[ModelFeatures], frames: int) -> torch.Tensor:
    """(B, num_mel_bins, frames) float32: each item's Whisper log-mel cut or padded to `frames`."""
    return torch.from_numpy(np.stack([item.whisper_frames(frames) for item in features]))


def whisper_encoder_states(encoder: WhisperEncoder, log_mel: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden states for log-mel of any even number of frames up to 3000: 30 s goes
    through transformers' own forward; fewer frames take the first position embeddings."""
    if log_mel.shape[-1] == WHISPER_MEL_FRAMES:
        return encoder(log_mel).last_hidden_state
    x = nn.functional.gelu(encoder.conv1(log_mel))
    x = nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    for layer in encoder.layers:
        x = layer(x, None)
    return encoder.layer_norm(x)
