"""SpecAugment-style masking of the cached encoder states (`augment`): the bands it fills, its determinism, its
config checks, and that the worker masks its cached training examples."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from jobs.training.augment import mask_generator, mask_states
from jobs.training.config import AugmentSection, load_train_config
from jobs.training.state_cache import CachedStates
from jobs.training.worker import WorkerTrainer
from nota_model.errors import ConfigError


def _states(frames: int = 50, width: int = 16) -> torch.Tensor:
    return torch.randn(frames, width, generator=torch.Generator().manual_seed(frames * width))


def _filled(states: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which frames and which channels the masking replaced, wholly, by the item's mean."""
    mean = states.mean(dim=0)
    changed = masked != states
    assert torch.equal(masked[changed], mean.expand_as(states)[changed])  # only ever the mean
    return (masked == mean).all(dim=1), (masked == mean).all(dim=0)


def _runs(flags: torch.Tensor) -> list[int]:
    """The lengths of the runs of True in `flags`."""
    runs, length = [], 0
    for flag in flags.tolist() + [False]:
        if flag:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def test_nothing_is_masked_by_default():
    states = _states()
    assert not AugmentSection().active
    assert mask_states(states, AugmentSection(), mask_generator(42, 0, 0)) is states


@pytest.mark.parametrize("seed", range(20))
def test_time_masks_fill_at_most_their_bands_with_the_items_mean(seed):
    states = _states()
    settings = AugmentSection(time_masks=2, time_mask_frames=7)
    masked = mask_states(states, settings, mask_generator(seed, 0, 3))
    frames, channels = _filled(states, masked)
    assert not channels.any()
    assert frames.sum() <= 2 * 7 and all(run <= 2 * 7 for run in _runs(frames)) and len(_runs(frames)) <= 2
    assert torch.equal(masked[~frames], states[~frames])
    assert torch.equal(states, _states())  # the input is left as it was


def test_one_band_of_each_kind_is_one_contiguous_band_within_its_width():
    settings = AugmentSection(time_masks=1, time_mask_frames=9, channel_masks=1, channel_mask_width=5)
    widths = set()
    for position in range(40):
        states = _states()
        masked = mask_states(states, settings, mask_generator(7, 1, position))
        changed = masked != states
        frames, channels = changed.all(dim=1), changed.all(dim=0)
        assert len(_runs(frames)) <= 1 and sum(_runs(frames)) <= 9
        assert len(_runs(channels)) <= 1 and sum(_runs(channels)) <= 5
        assert torch.equal(changed, frames[:, None] | channels[None, :])  # whole frames and whole channels, no more
        widths.add((int(frames.sum()), int(channels.sum())))
    assert len(widths) > 5  # the widths vary between 0 and their largest


def test_masks_never_reach_past_the_items_frames_or_channels():
    states = _states(frames=3, width=4)
    settings = AugmentSection(time_masks=3, time_mask_frames=100, channel_masks=3, channel_mask_width=100)
    for position in range(20):
        masked = mask_states(states, settings, mask_generator(0, 0, position))
        assert masked.shape == states.shape and torch.isfinite(masked).all()
    assert mask_states(torch.zeros(0, 4), settings, mask_generator(0, 0, 0)).shape == (0, 4)


def test_the_masks_are_a_function_of_seed_epoch_and_position():
    states, settings = _states(), AugmentSection(time_masks=2, time_mask_frames=10, channel_masks=2, channel_mask_width=4)
    first = mask_states(states, settings, mask_generator(42, 2, 17))
    assert torch.equal(first, mask_states(states, settings, mask_generator(42, 2, 17)))  # as a resumed run draws them
    torch.manual_seed(0)  # the global RNG plays no part
    assert torch.equal(first, mask_states(states, settings, mask_generator(42, 2, 17)))
    for other in ((42, 3, 17), (42, 2, 18), (43, 2, 17)):
        assert not torch.equal(first, mask_states(states, settings, mask_generator(*other))), other


def test_config_checks_the_widths_and_needs_the_feature_cache(tmp_path: Path):
    path = tmp_path / "train.yaml"
    path.write_text("datasets: {train: [m.yaml], feature_cache: /tmp/cache}\nrun: {name: x, storage_path: /tmp/x, max_steps: 3}\n")
    assert load_train_config(str(path)).augment == AugmentSection(time_masks=0, time_mask_frames=0, channel_masks=0,
                                                                  channel_mask_width=0)
    config = load_train_config(str(path), {"augment": {"time_masks": 2, "time_mask_frames": 20}})
    assert config.augment.active and config.augment.channel_masks == 0
    with pytest.raises(ConfigError, match="time_masks above 0 need time_mask_frames"):
        load_train_config(str(path), {"augment": {"time_masks": 2}})
    with pytest.raises(ConfigError, match="channel_masks above 0 need channel_mask_width"):
        load_train_config(str(path), {"augment": {"channel_masks": 1, "channel_mask_width": 0}})
    with pytest.raises(ConfigError, match="time_mask_frames"):
        load_train_config(str(path), {"augment": {"time_mask_frames": -1}})
    with pytest.raises(ConfigError, match="bogus"):
        load_train_config(str(path), {"augment": {"bogus": 1}})
    path.write_text("datasets: {train: [m.yaml]}\nrun: {name: x, storage_path: /tmp/x, max_steps: 3}\n")
    with pytest.raises(ConfigError, match="needs datasets.feature_cache"):
        load_train_config(str(path), {"augment": {"channel_masks": 1, "channel_mask_width": 4}})
    assert not load_train_config(str(path)).augment.active  # off, training from audio is fine


def test_the_worker_masks_its_cached_training_examples_as_a_function_of_epoch_and_position():
    width, frames = 8, [30, 20]
    values = np.random.default_rng(0).standard_normal((sum(frames), width)).astype(np.float16)
    cache = CachedStates([], {0: values}, width)
    rows = [{"cache": 0, "shard": 0, "offset": 0, "frames": 30, "task": "asr", "prompt": "p", "answer": "a"},
            {"cache": 0, "shard": 0, "offset": 30, "frames": 20, "task": "asr", "prompt": "p", "answer": "b"}]

    def examples(augment: AugmentSection, epoch: int, positions: list[int]) -> list[torch.Tensor]:
        trainer = SimpleNamespace(train_rows=rows, caches=[cache], prompts={}, run=SimpleNamespace(seed=5),
                                  config=SimpleNamespace(augment=augment))
        built, failed = WorkerTrainer._examples(trainer, epoch, np.array([0, 1]), positions)
        assert failed == 0 and [example.answer for example in built] == ["a", "b"]
        return [example.speech_states for example in built]

    plain = examples(AugmentSection(), 0, [0, 1])
    assert all(torch.equal(states, cache.states(row)) for states, row in zip(plain, rows))
    settings = AugmentSection(time_masks=2, time_mask_frames=6, channel_masks=1, channel_mask_width=3)
    masked = examples(settings, 0, [0, 1])
    assert all(torch.equal(states, mask_states(cache.states(row), settings, mask_generator(5, 0, position)))
               for states, row, position in zip(masked, rows, [0, 1]))
    assert not all(torch.equal(a, b) for a, b in zip(masked, plain))
    assert all(torch.equal(a, b) for a, b in zip(masked, examples(settings, 0, [0, 1])))  # a resumed run's
    assert not all(torch.equal(a, b) for a, b in zip(masked, examples(settings, 1, [0, 1])))  # the next epoch's
