"""A model actor's device comes from the GPUs Ray assigned it (fake Ray GPUs, torch's CUDA check patched)."""

import os

import pytest
import ray
import torch

from jobs.inference.devices import FAKE_GPUS_ENV, GPUUnavailableError, actor_device, assigned_device


def test_an_actor_given_no_gpu_runs_on_the_cpu_and_hides_cuda_even_on_a_gpu_node(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # what Ray 2.60 leaves a worker given no GPU
    assert assigned_device([]) == torch.device("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_an_actor_given_a_gpu_runs_on_its_first_visible_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert assigned_device([1]) == torch.device("cuda", 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert assigned_device([1]) == torch.device("cuda", 1)


def test_an_actor_given_a_gpu_torch_cannot_see_fails_loudly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GPUUnavailableError, match="assigned this actor GPU 1 .* sees no CUDA device.*--accelerator cpu"):
        assigned_device([1])
    assert assigned_device([1], fake_gpus=True) == torch.device("cpu")


@ray.remote(max_calls=1)  # the patched torch dies with its worker
def _device_in_actor(cuda_visible: bool) -> tuple[str, str | None]:
    torch.cuda.is_available = lambda: cuda_visible  # this worker's torch, as on a GPU node
    return str(actor_device()), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_ray_assignment_decides_the_device(local_ray):
    assert ray.get(_device_in_actor.options(num_gpus=0).remote(True)) == ("cpu", "")
    assert ray.get(_device_in_actor.options(num_gpus=1).remote(True))[0] == "cuda:0"
    no_fakes = {"env_vars": {FAKE_GPUS_ENV: "0"}}
    with pytest.raises(GPUUnavailableError, match="sees no CUDA device"):
        ray.get(_device_in_actor.options(num_gpus=1, runtime_env=no_fakes, max_retries=0).remote(False))


@ray.remote(num_cpus=0)
class _GPUShare:
    def device(self) -> tuple[list, str]:
        torch.cuda.is_available = lambda: True  # this actor's torch, as on a GPU node
        return ray.get_gpu_ids(), str(actor_device())


def test_actors_sharing_a_gpu_run_on_the_one_ray_assigned(local_ray):
    # local_ray: two fake GPUs, each shared by two actors of half a GPU
    actors = [_GPUShare.options(num_gpus=0.5).remote() for _ in range(4)]
    try:
        assigned = ray.get([actor.device.remote() for actor in actors], timeout=120)
    finally:
        for actor in actors:
            ray.kill(actor)
    assert sorted(str(gpu) for gpus, _ in assigned for gpu in gpus) == ["0", "0", "1", "1"], assigned
    assert all(len(gpus) == 1 and device == "cuda:0" for gpus, device in assigned)
