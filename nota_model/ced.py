"""CED audio encoder (Consistent Ensemble Distillation, RicherMans/CED) that returns patch tokens.

This is the seed project's `ExtendedCEDEncoder`: the published `AudioTransformer` without its classification
head, with the log-mel features normalised as BEATs does and long inputs encoded chunk by chunk. Module names
follow the published checkpoints and the seed's: less their `outputlayer.*` head, published checkpoints hold
every key here but the seed's `front_end.fbank_mean`/`fbank_std` buffers, which the config sets. Their
position embeddings (10 s, 63 time positions) are resized to `target_length` as CED's own loader does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nota_model.config import AudioEncoderConfig
from nota_model.errors import AudioError, ConfigError

SAMPLE_RATE = 16000
AMPLITUDE_FLOOR = 1e-10


def hz_to_mel(freq: float) -> float:
    """HTK mel scale."""
    return 2595.0 * math.log10(1.0 + freq / 700.0)


def mel_to_hz(mels: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)


def melscale_fbanks(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> torch.Tensor:
    """torchaudio's `melscale_fbanks(norm=None, mel_scale="htk")`: triangular filters, shape (n_freqs, n_mels)."""
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float32)
    f_pts = mel_to_hz(torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2, dtype=torch.float32))
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)
    down_slopes = -slopes[:, :-2] / f_diff[:-1]
    up_slopes = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down_slopes, up_slopes), min=0.0)


class CEDSpectrogram(nn.Module):
    """Power spectrogram as torchaudio's `Spectrogram`: periodic Hann window, centred frames, reflect padding."""

    def __init__(self, n_fft: int, win_length: int, hop_length: int):
        super().__init__()
        self.n_fft = n_fft
        self.win_length = win_length
        self.hop_length = hop_length
        self.register_buffer("window", torch.hann_window(win_length, dtype=torch.float32))

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, n_fft // 2 + 1, frames)."""
        spec = torch.stft(
            waveforms,
            self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window.to(waveforms.dtype),
            center=True,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        return spec.abs().pow(2.0)


class CEDMelScale(nn.Module):
    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        fb = melscale_fbanks(config.n_fft // 2 + 1, config.f_min, config.f_max, config.n_mels, SAMPLE_RATE)
        self.register_buffer("fb", fb)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, n_freqs, frames) -> (B, n_mels, frames)."""
        return (spec.transpose(-1, -2) @ self.fb.to(spec.dtype)).transpose(-1, -2)


class CEDMelSpectrogram(nn.Module):
    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.spectrogram = CEDSpectrogram(config.n_fft, config.win_length, config.hop_length)
        self.mel_scale = CEDMelScale(config)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        return self.mel_scale(self.spectrogram(waveforms))


class CEDFrontEnd(nn.Sequential):
    """Mel spectrogram, then dB, then the seed's BEATs-style normalisation, always in float32."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__(CEDMelSpectrogram(config), CEDAmplitudeToDB(config.top_db))
        self.register_buffer("fbank_mean", torch.tensor(config.fbank_mean, dtype=torch.float32))
        self.register_buffer("fbank_std", torch.tensor(config.fbank_std, dtype=torch.float32))

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        # Mel power spectra overflow float16.
        with torch.autocast(device_type=waveforms.device.type, enabled=False):
            db = super().forward(waveforms.float())
            return (db - self.fbank_mean.float()) / (2 * self.fbank_std.float())


class CEDAmplitudeToDB(nn.Module):
    """torchaudio's `AmplitudeToDB("power", top_db)`, except that each item is floored at its OWN peak minus
    `top_db` (torchaudio takes one peak over a whole (B, n_mels, frames) batch)."""

    def __init__(self, top_db: float):
        super().__init__()
        self.top_db = top_db

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        db = 10.0 * torch.log10(torch.clamp(power, min=AMPLITUDE_FLOOR))
        return torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - self.top_db)


class CEDTranspose(nn.Module):
    """Swaps two axes: the published checkpoints' weightless einops `Rearrange` layers around `init_bn`."""

    def __init__(self, dim0: int, dim1: int):
        super().__init__()
        self.dim0 = dim0
        self.dim1 = dim1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(self.dim0, self.dim1)


class CEDPatchEmbed(nn.Module):
    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.proj = nn.Conv2d(1, config.embed_dim, kernel_size=config.patch_size, stride=config.patch_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, n_mels, frames) -> (B, embed_dim, freq patches, time patches)."""
        return self.proj(x)


class CEDAttention(nn.Module):
    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`key_mask`: (B, 1, 1, length), True on each item's own tokens where items are padded to one length
        (None: no padding). Each item's tokens then attend over its own tokens alone, in one attention call for
        the batch; they equal the item's unpadded result up to rounding (the sums run over the padded length)."""
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, dim))


class CEDMlp(nn.Module):
    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.fc1 = nn.Linear(config.embed_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CEDBlock(nn.Module):
    """Pre-norm ViT block (timm layout)."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.attn = CEDAttention(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp = CEDMlp(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


def ced_min_samples(config: AudioEncoderConfig) -> int:
    """The fewest samples that give a patch (and that the STFT's reflect padding accepts)."""
    min_frames_samples = (config.patch_size - 1) * config.hop_length + config.n_fft % 2
    return max(min_frames_samples, config.n_fft // 2 + 1)


def check_ced_length(config: AudioEncoderConfig, num_samples: int) -> None:
    """Raises AudioError (too_short) for a waveform shorter than `ced_min_samples`."""
    fewest = ced_min_samples(config)
    if num_samples < fewest:
        raise AudioError(
            "too_short",
            f"CED needs at least {fewest} samples ({fewest / SAMPLE_RATE:.3f} s at {SAMPLE_RATE} Hz) for one patch, "
            f"got {num_samples}",
        )


def _check_config(config: AudioEncoderConfig) -> None:
    if config.n_mels % config.patch_stride:
        raise ConfigError(
            f"CED needs audio_encoder.n_mels ({config.n_mels}) divisible by audio_encoder.patch_stride "
            f"({config.patch_stride}): freq_pos_embed has one row per n_mels // patch_stride patches"
        )
    if (config.n_mels - config.patch_size) // config.patch_stride + 1 != config.n_mels // config.patch_stride:
        raise ConfigError(
            f"CED's audio_encoder.patch_size ({config.patch_size}) gives a number of frequency patches other "
            f"than n_mels // patch_stride ({config.n_mels // config.patch_stride}), the rows of freq_pos_embed"
        )
    if config.embed_dim % config.num_heads:
        raise ConfigError(
            f"CED needs audio_encoder.embed_dim ({config.embed_dim}) divisible by num_heads ({config.num_heads})"
        )


class CEDEncoder(nn.Module):
    """CED over 16 kHz waveforms, returning the final-norm patch tokens, frequency-major within each chunk of
    `target_length` frames, the chunks one after the other. Call `.eval()` before use: `init_bn` is a
    BatchNorm, which in training mode normalises with batch statistics."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        self.front_end = CEDFrontEnd(config)
        self.init_bn = nn.Sequential(
            CEDTranspose(1, 2), nn.BatchNorm2d(config.n_mels, momentum=0.01), CEDTranspose(1, 2)
        )
        self.patch_embed = CEDPatchEmbed(config)
        time_patches = config.target_length // config.patch_stride
        freq_patches = config.n_mels // config.patch_stride
        self.time_pos_embed = nn.Parameter(torch.randn(1, config.embed_dim, 1, time_patches) * 0.02)
        self.freq_pos_embed = nn.Parameter(torch.randn(1, config.embed_dim, freq_patches, 1) * 0.02)
        self.blocks = nn.Sequential(*(CEDBlock(config) for _ in range(config.depth)))
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.apply(_init_linear)

    def num_tokens(self, num_samples: int) -> int:
        """Tokens `forward` returns per item for waveforms of `num_samples` samples."""
        check_ced_length(self.config, num_samples)
        cfg = self.config
        frames = (num_samples + 2 * (cfg.n_fft // 2) - cfg.n_fft) // cfg.hop_length + 1
        full_chunks, last_chunk = divmod(frames, cfg.target_length)
        time_patches = full_chunks * self._time_patches(cfg.target_length) + self._time_patches(last_chunk)
        return cfg.n_mels // cfg.patch_stride * time_patches

    def front_end_features(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel features (B, n_mels, frames), in float32 whatever the module's dtype."""
        check_ced_length(self.config, waveforms.shape[-1])
        return self.front_end(waveforms)

    def forward_features(self, spec: torch.Tensor, time_patches: Sequence[int] | None = None) -> torch.Tensor:
        """One chunk of at most `target_length` frames: (B, 1, n_mels, frames) -> (B, tokens, embed_dim).
        `time_patches`: each item's own number of time patches where the items are padded to one length; the
        padding's tokens are then kept out of attention (and come out as garbage, for the caller to drop)."""
        x = self.patch_embed(spec)
        x = x + self.time_pos_embed[..., : x.shape[-1]] + self.freq_pos_embed
        key_mask = None if time_patches is None else _key_mask(time_patches, x.shape[-2], x.shape[-1], x.device)
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Equal-length 16 kHz waveforms (B, samples) -> tokens (B, num_tokens(samples), embed_dim)."""
        if waveforms.ndim != 2:
            raise ValueError(f"CEDEncoder.forward takes (batch, samples), got {tuple(waveforms.shape)}")
        spec = self.front_end_features(waveforms).unsqueeze(1).to(self.patch_embed.proj.weight.dtype)
        spec = self.init_bn(spec)
        chunks = spec.split(self.config.target_length, dim=-1)
        return torch.cat([self.forward_features(c) for c in chunks if self._time_patches(c.shape[-1])], dim=1)

    def encode(self, waveforms: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Encodes 1-D waveforms of any lengths, each as it would be alone, in one forward:
        item i -> (num_tokens(len(item i)), embed_dim)."""
        for waveform in waveforms:
            if waveform.ndim != 1:
                raise ValueError(f"CEDEncoder.encode takes 1-D waveforms, got {tuple(waveform.shape)}")
        return self.encode_spectrograms([self.front_end_features(w.unsqueeze(0))[0] for w in waveforms])

    def encode_spectrograms(self, specs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Encodes front-end features (n_mels, frames) of any lengths in one forward: every item's chunks are
        padded to the longest chunk, and attention runs over each chunk's own tokens (a key mask, one attention
        call a layer), so that each item's tokens are those it gets alone, up to rounding (within 1e-5 in
        float32; exactly when all chunks have one length). Item i -> (its tokens, embed_dim)."""
        chunks = [(index, chunk) for index, spec in enumerate(specs) for chunk in spec.split(self.config.target_length, dim=-1)
                  if self._time_patches(chunk.shape[-1])]
        patches = [self._time_patches(chunk.shape[-1]) for _, chunk in chunks]
        frames = (max(patches) - 1) * self.config.patch_stride + self.config.patch_size
        batch = torch.stack([F.pad(chunk[..., :frames], (0, frames - min(frames, chunk.shape[-1]))) for _, chunk in chunks])
        batch = self.init_bn(batch.unsqueeze(1).to(self.patch_embed.proj.weight.dtype))
        padded = len(set(patches)) > 1
        tokens = self.forward_features(batch, patches if padded else None)
        tokens = tokens.unflatten(1, (self.config.n_mels // self.config.patch_stride, max(patches)))
        per_item: list[list[torch.Tensor]] = [[] for _ in specs]
        for (index, _), item_tokens, count in zip(chunks, tokens, patches, strict=True):
            per_item[index].append(item_tokens[:, :count].flatten(0, 1))
        return [torch.cat(item) for item in per_item]

    def _time_patches(self, frames: int) -> int:
        if frames < self.config.patch_size:
            return 0
        return (frames - self.config.patch_size) // self.config.patch_stride + 1



def _key_mask(time_patches: Sequence[int], freq_patches: int, width: int, device: torch.device) -> torch.Tensor:
    """(B, 1, 1, freq_patches * width), built on `device`: True on each item's own time patches,
    frequency-major as the tokens."""
    real = torch.arange(width, device=device) < torch.tensor(time_patches, device=device).unsqueeze(1)
    return real.unsqueeze(1).expand(-1, freq_patches, -1).flatten(1)[:, None, None, :]


def resize_position_embeddings(state_dict: dict[str, torch.Tensor], encoder: CEDEncoder) -> dict[str, torch.Tensor]:
    """Fit a checkpoint's time/frequency position embeddings to `encoder`, as CED's own `load_state_dict` does:
    cut when the checkpoint has more positions, bilinear interpolation when it has fewer."""
    resized = dict(state_dict)
    for key, axis in (("time_pos_embed", -1), ("freq_pos_embed", -2)):
        if key not in state_dict:
            continue
        source, target = state_dict[key], getattr(encoder, key)
        length, wanted = source.shape[axis], target.shape[axis]
        if source.ndim != 4 or source.shape[1] != target.shape[1] or length == wanted:
            continue
        if wanted <= length:
            resized[key] = source.narrow(axis, 0, wanted)
        else:
            size = (1, wanted) if axis == -1 else (wanted, 1)
            resized[key] = F.interpolate(source.float(), size=size, mode="bilinear", align_corners=False)
    return resized


def _init_linear(module: nn.Module) -> None:
    """The published random init of Linear layers (LayerNorms keep torch's ones and zeros)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
