"""The connector a config asks for (`qformer.kind`), and the one made of Whisper decoder layers.

`whisper_decoder` (DiVA, arXiv 2410.02678, initialises its Q-Former from Whisper's decoder): the first
`qformer.num_layers` layers of the decoder whose encoder the model uses, run on each window's queries:
pre-LayerNorm self-attention among the queries (not causal: they are not tokens in order), cross-attention to
the window's encoder states, the MLP, each with its layer norm, then the decoder's final layer norm. Its width,
heads and feed-forward size are the decoder's. Module names are transformers' `WhisperDecoder`'s, so the trained
keys read `speech_Qformer.layers.N.…` and `speech_Qformer.layer_norm.…`, and the decoder's weights copy over by
name (`decoder_layer_weights`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperDecoderLayer

from nota_model.config import NotaConfig
from nota_model.errors import ConfigError
from nota_model.qformer import QFormer, init_weights

CROSS_ATTENTION_INPUTS = ("encoder_attn.k_proj.weight", "encoder_attn.v_proj.weight")


class WhisperDecoderConnector(nn.Module):
    """Whisper decoder layers over windows: `forward(queries, windows)` as `QFormer`'s. With random weights until
    `decoder_layer_weights` are loaded into it (what `nota_model.build` does when the speech encoder has weights)."""

    def __init__(self, whisper: WhisperConfig, num_layers: int, encoder_width: int):
        super().__init__()
        _check_sizes(whisper, num_layers)
        whisper = WhisperConfig(**whisper.to_dict(), attn_implementation="sdpa")
        self.hidden_size = whisper.d_model
        self.initializer_range = whisper.init_std
        self.layers = nn.ModuleList(_connector_layer(whisper, index, encoder_width) for index in range(num_layers))
        self.layer_norm = nn.LayerNorm(whisper.d_model)
        self.apply(lambda module: init_weights(module, whisper.init_std))

    def forward(self, query_embeds: torch.Tensor, encoder_states: torch.Tensor) -> torch.Tensor:
        hidden = query_embeds
        for layer in self.layers:
            hidden = layer(hidden, encoder_hidden_states=encoder_states, use_cache=False)
        return self.layer_norm(hidden)


Connector = QFormer | WhisperDecoderConnector


def build_connector(config: NotaConfig, whisper: WhisperConfig) -> Connector:
    """The connector `config.qformer.kind` names, attending to `config.encoder_width` channels; `whisper`: the
    speech encoder's config (the decoder's sizes are in it)."""
    if config.qformer.kind == "whisper_decoder":
        return WhisperDecoderConnector(whisper, config.qformer.num_layers, config.encoder_width)
    return QFormer(config.qformer, config.encoder_width)


def decoder_layer_weights(decoder: dict[str, torch.Tensor], num_layers: int, encoder_width: int) -> dict[str, torch.Tensor]:
    """A `WhisperDecoderConnector`'s state dict from a Whisper decoder's (`WhisperDecoder` key names): its first
    `num_layers` layers and its final layer norm. Encoder states wider than the decoder (CED's channels
    concatenated after Whisper's) meet zero columns in the cross-attention's key and value projections, so that
    at first the connector reads Whisper's channels exactly as the decoder does."""
    kept = {key: value for key, value in decoder.items() if _is_kept(key, num_layers)}
    for key, value in kept.items():
        if key.endswith(CROSS_ATTENTION_INPUTS):
            kept[key] = F.pad(value, (0, encoder_width - value.shape[1]))
    return kept


def decoder_queries(decoder: dict[str, torch.Tensor], start_token_id: int, count: int) -> torch.Tensor:
    """(1, count, width) window queries a Whisper decoder already knows: the embedding of the token it starts every
    transcript with (`<|startoftranscript|>`) plus its position embeddings 0..count-1. One query is then exactly
    the decoder's input at its first step."""
    positions = decoder["embed_positions.weight"]
    if count > len(positions):
        raise ConfigError(f"qformer.num_query_tokens {count} is more than the Whisper decoder's {len(positions)} positions")
    return (decoder["embed_tokens.weight"][start_token_id] + positions[:count]).unsqueeze(0)


def _connector_layer(whisper: WhisperConfig, index: int, encoder_width: int) -> WhisperDecoderLayer:
    """A decoder layer whose queries see each other (not causally) and whose cross-attention reads `encoder_width` channels."""
    layer = WhisperDecoderLayer(whisper, layer_idx=index)
    layer.self_attn.is_causal = False
    layer.encoder_attn.k_proj = nn.Linear(encoder_width, whisper.d_model, bias=False)
    layer.encoder_attn.v_proj = nn.Linear(encoder_width, whisper.d_model)
    return layer


def _check_sizes(whisper: WhisperConfig, num_layers: int) -> None:
    if not 1 <= num_layers <= whisper.decoder_layers:
        raise ConfigError(f"qformer.num_layers {num_layers}: the Whisper decoder has {whisper.decoder_layers} layers "
                          "(qformer.kind whisper_decoder takes the first N)")
    if whisper.d_model % whisper.decoder_attention_heads:
        raise ConfigError(f"the Whisper decoder's width {whisper.d_model} is not a multiple of its "
                          f"{whisper.decoder_attention_heads} heads: set speech_encoder.hf_config.decoder_attention_heads")


def _is_kept(key: str, num_layers: int) -> bool:
    """Whether a decoder weight belongs to the connector: its first `num_layers` layers' and the final layer norm's."""
    if key.startswith("layers."):
        return int(key.split(".")[1]) < num_layers
    return key.startswith("layer_norm.")
