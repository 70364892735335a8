"""SpecAugment-style masking of the frozen encoder's cached states during training (`augment` in the config).

Time masks blank bands of consecutive encoder frames, channel masks bands of consecutive state channels, so that
the connector learns not to lean on any one stretch of time or group of features. The states are masked where
they come from the feature cache only: with training from audio the encoder runs inside the model's forward pass,
after the worker built the example, so there is nothing to mask at that point, and the config refuses the option
there (it needs `datasets.feature_cache`). Validation never masks: its items are decoded from audio.

Each example's masks are a pure function of (run.seed, epoch, position in the epoch), the same key as its training
prompt (`nota_model.training.choose_prompt`), drawn from a generator of their own, never torch's global state:
a resumed run masks exactly as the uninterrupted one did, and the loader threads do not race on a shared RNG.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from jobs.training.config import AugmentSection

MASK_STREAM = 0x6D61736B  # keeps the masks' seeds apart from other seeds built of the same numbers


def mask_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """The generator of one example's masks: that of (seed, epoch, position in the epoch)."""
    state = np.random.SeedSequence([seed, epoch, position, MASK_STREAM]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state % 2**63))


def mask_states(states: torch.Tensor, settings: AugmentSection, generator: torch.Generator) -> torch.Tensor:
    """`states` (frames, width) with `settings.time_masks` bands of at most `time_mask_frames` frames and
    `channel_masks` bands of at most `channel_mask_width` channels filled with the item's mean (bands may overlap;
    each band's width is drawn from 0 to its maximum, clipped to the item's frames or width, then its start).
    A copy; `states` itself when `settings` masks nothing."""
    if not settings.active:
        return states
    frames, width = states.shape
    # The item's own per-channel mean over time, not 0: the encoder's states end in a layer norm and are not
    # centred per channel, so zeros would be values the connector never sees otherwise (and, for a channel band,
    # an abrupt level change); the mean removes a band's information and keeps the item's level and statistics.
    fill = states.mean(dim=0)
    masked = states.clone()
    for start, stop in _bands(frames, settings.time_masks, settings.time_mask_frames, generator):
        masked[start:stop] = fill
    for start, stop in _bands(width, settings.channel_masks, settings.channel_mask_width, generator):
        masked[:, start:stop] = fill[start:stop]
    return masked


def _bands(size: int, count: int, max_width: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """`count` bands [start, stop) of 0 to `max_width` (at most `size`) consecutive places within `size`."""
    bands = []
    for _ in range(count):
        band = int(torch.randint(0, min(max_width, size) + 1, (), generator=generator))
        start = int(torch.randint(0, size - band + 1, (), generator=generator))
        bands.append((start, start + band))
    return bands
