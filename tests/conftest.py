from __future__ import annotations

import pytest

from benchmarks.batching import synthetic_clip
from nota_model.build import LoadedModel, load_model
from nota_model.config import NotaConfig, load_config

make_clip = synthetic_clip


@pytest.fixture(scope="session")
def tiny_config() -> NotaConfig:
    return load_config("tiny")


@pytest.fixture(scope="session")
def tiny(tiny_config: NotaConfig) -> LoadedModel:
    return load_model(tiny_config, device="cpu")
