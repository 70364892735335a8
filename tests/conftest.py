from __future__ import annotations

import pytest
import ray

from jobs.inference.devices import FAKE_GPUS_ENV
from nota_model.build import LoadedModel, load_model
from nota_model.config import NotaConfig, load_config
from nota_model.testing import synthetic_clip

make_clip = synthetic_clip


@pytest.fixture(scope="session")
def tiny_config() -> NotaConfig:
    return load_config("tiny")


@pytest.fixture(scope="session")
def tiny(tiny_config: NotaConfig) -> LoadedModel:
    return load_model(tiny_config, device="cpu")


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole session, with two fake GPUs (torch sees none: FAKE_GPUS_ENV lets the model
    actors given one run on the CPU).
    Ray Data keeps per-process state that a second `ray.init` in the same process trips over."""
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, runtime_env={"env_vars": {FAKE_GPUS_ENV: "1"}})
    yield
    ray.shutdown()
