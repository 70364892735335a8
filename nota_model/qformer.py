"""The BLIP-2 / LAVIS BERT Q-Former as SALMONN uses it, and its window-level application.

Only the query path exists: SALMONN removes the word and position embeddings and the text path's
feed-forward (`intermediate`/`output`), so each layer has self-attention, cross-attention to the
encoder states and the query feed-forward (`intermediate_query`/`output_query`). Module names match
the seed's checkpoint keys under `speech_Qformer.`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from nota_model.config import QFormerConfig


class BertSelfAttention(nn.Module):
    def __init__(self, config: QFormerConfig, key_value_width: int):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_size = config.hidden_size // config.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(key_value_width, config.hidden_size)
        self.value = nn.Linear(key_value_width, config.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        query, key, value = self._heads(self.query(hidden)), self._heads(self.key(key_value)), self._heads(self.value(key_value))
        scores = query @ key.transpose(-1, -2) / math.sqrt(self.head_size)
        context = scores.softmax(dim=-1) @ value
        batch, _, length, _ = context.shape
        return context.transpose(1, 2).reshape(batch, length, -1)


class BertOutput(nn.Module):
    """Dense projection back to the hidden size, residual, LayerNorm: after attention and after the feed-forward."""

    def __init__(self, config: QFormerConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: QFormerConfig, key_value_width: int):
        super().__init__()
        self.self = BertSelfAttention(config, key_value_width)
        self.output = BertOutput(config, config.hidden_size)

    def forward(self, hidden: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, key_value), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden))


class BertLayer(nn.Module):
    def __init__(self, config: QFormerConfig, encoder_width: int, layer_index: int):
        super().__init__()
        self.attention = BertAttention(config, config.hidden_size)
        self.has_cross_attention = layer_index % config.cross_attention_freq == 0
        if self.has_cross_attention:
            self.crossattention = BertAttention(config, encoder_width)
        self.intermediate_query = BertIntermediate(config)
        self.output_query = BertOutput(config, config.intermediate_size)

    def forward(self, queries: torch.Tensor, encoder_states: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(queries, queries)
        if self.has_cross_attention:
            hidden = self.crossattention(hidden, encoder_states)
        return self.output_query(self.intermediate_query(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config: QFormerConfig, encoder_width: int):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, encoder_width, i) for i in range(config.num_layers))

    def forward(self, hidden: torch.Tensor, encoder_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, encoder_states)
        return hidden


class BertEmbeddings(nn.Module):
    """What is left of BERT's embeddings for query-only input: the LayerNorm (and dropout, a no-op in eval)."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, query_embeds: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(query_embeds)


class BertModel(nn.Module):
    def __init__(self, config: QFormerConfig, encoder_width: int):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config, encoder_width)

    def forward(self, query_embeds: torch.Tensor, encoder_states: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(query_embeds), encoder_states)


class QFormer(nn.Module):
    """Holds `bert` so that parameter names read `speech_Qformer.bert.…` as in LAVIS. `hidden_size` (its output
    width) and `initializer_range` (its queries' initial spread) as every connector has them."""

    def __init__(self, config: QFormerConfig, encoder_width: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.initializer_range = config.initializer_range
        self.bert = BertModel(config, encoder_width)
        self.apply(lambda module: init_weights(module, config.initializer_range))

    def forward(self, query_embeds: torch.Tensor, encoder_states: torch.Tensor) -> torch.Tensor:
        return self.bert(query_embeds, encoder_states)


def init_weights(module: nn.Module, std: float) -> None:
    """transformers' initialisation of BERT and Whisper: normal Linear weights of `std`, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def split_windows(states: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """(B, T, C) -> (B * L, window, C): SALMONN's `F.unfold` windows; trailing frames that fill no window are dropped."""
    batch, _, channels = states.shape
    unfolded = F.unfold(states.transpose(1, 2).unsqueeze(2), kernel_size=(1, window), stride=(1, stride))
    num_windows = unfolded.shape[-1]
    windows = unfolded.view(batch, channels, window, num_windows).permute(0, 3, 2, 1)
    return windows.reshape(batch * num_windows, window, channels)


def pool_tokens(tokens: torch.Tensor, size: int) -> torch.Tensor:
    """(L, C) -> (ceil(L / size), C): each run of `size` consecutive tokens averaged; the last run may be
    shorter (no audio is dropped)."""
    if size == 1:
        return tokens
    whole = len(tokens) // size * size
    pooled = tokens[:whole].unflatten(0, (-1, size)).mean(1)
    if whole == len(tokens):
        return pooled
    return torch.cat([pooled, tokens[whole:].mean(0, keepdim=True)])


def num_windows(num_frames: int, window: int, stride: int) -> int:
    return (num_frames - window) // stride + 1
