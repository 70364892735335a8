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


# Ray Train's controller takes a worker's `ray.train.report` when it polls the workers, every 2 s by default, and
# the worker's next report waits until then (its result queue holds one): a test run reporting every step would
# spend most of its time waiting. Ray Train passes the variable on from the driver's environment.
RAY_TRAIN_POLL_ENV, RAY_TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole session, with two fake GPUs (torch sees none: FAKE_GPUS_ENV lets the model
    actors given one run on the CPU), and Ray Train polling its workers often (RAY_TRAIN_POLL_S).
    Ray Data keeps per-process state that a second `ray.init` in the same process trips over."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(RAY_TRAIN_POLL_ENV, RAY_TRAIN_POLL_S)
        ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, runtime_env={"env_vars": {FAKE_GPUS_ENV: "1"}})
        yield
        ray.shutdown()
