"""A model actor's device comes from the GPUs Ray assigned it (fake Ray GPUs, torch's CUDA check patched); it is
checked for this torch's kernels and capped to its share of the GPU; waiting for a GPU ends."""

import os

import pytest
import ray
import torch

from jobs.inference import devices
from jobs.inference.devices import (
    FAKE_GPUS_ENV, GPUUnavailableError, GPUWaitError, MissingKernelsError, actor_device, assigned_device, cap_memory_share,
    check_kernels, run_capability,
)


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


def pretend_gpu_node(cuda_visible: bool = True) -> list[float]:
    """This Ray worker's torch as on a node of capability 8.0 GPUs (or one whose torch sees none); returns the
    memory fractions set."""
    fractions: list[float] = []
    torch.cuda.is_available = lambda: cuda_visible
    torch.cuda.get_device_capability = lambda device=None: (8, 0)
    torch.cuda.get_arch_list = lambda: ["sm_80"]
    torch.cuda.set_per_process_memory_fraction = lambda share, device=None: fractions.append(share)
    return fractions


@ray.remote(max_calls=1)  # the patched torch dies with its worker
def _device_in_actor(cuda_visible: bool) -> tuple[str, str | None]:
    pretend_gpu_node(cuda_visible)
    return str(actor_device()), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_ray_assignment_decides_the_device(local_ray):
    assert ray.get(_device_in_actor.options(num_gpus=0).remote(True)) == ("cpu", "")
    assert ray.get(_device_in_actor.options(num_gpus=1).remote(True))[0] == "cuda:0"
    no_fakes = {"env_vars": {FAKE_GPUS_ENV: "0"}}
    with pytest.raises(GPUUnavailableError, match="sees no CUDA device"):
        ray.get(_device_in_actor.options(num_gpus=1, runtime_env=no_fakes, max_retries=0).remote(False))


@ray.remote(num_cpus=0)
class _GPUShare:
    def device(self) -> tuple[list, str, list[float]]:
        fractions = pretend_gpu_node()
        return ray.get_gpu_ids(), str(actor_device()), fractions


def test_actors_sharing_a_gpu_run_on_the_one_ray_assigned_each_capped_to_its_share(local_ray):
    # local_ray: two fake GPUs, each shared by two actors of half a GPU
    actors = [_GPUShare.options(num_gpus=0.5).remote() for _ in range(4)]
    try:
        assigned = ray.get([actor.device.remote() for actor in actors], timeout=120)
    finally:
        for actor in actors:
            ray.kill(actor)
    assert sorted(str(gpu) for gpus, _, _ in assigned for gpu in gpus) == ["0", "0", "1", "1"], assigned
    assert all(len(gpus) == 1 and device == "cuda:0" for gpus, device, _ in assigned)
    assert all(fractions == [0.5] for _, _, fractions in assigned), "each actor capped to its half of the GPU"


def as_gpu_node(monkeypatch, capability: tuple[int, int], arch_list: list[str]) -> list[tuple[float, object]]:
    """torch as on a GPU node of `capability` whose torch was built for `arch_list`; returns the memory
    fractions set, (fraction, device) each."""
    fractions: list[tuple[float, object]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda share, device=None: fractions.append((share, device)))
    return fractions


@pytest.mark.parametrize(("capability", "arch_list"), [
    ((7, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]),
    ((8, 6), ["sm_80", "sm_90"]),  # an older minor's kernels of the same major run
    ((9, 0), ["sm_80", "sm_90a"]),
    ((12, 0), ["sm_80", "compute_90"]),  # PTX, compiled at load for a newer GPU
])
def test_a_torch_with_the_gpus_kernels_runs(monkeypatch, capability, arch_list):
    as_gpu_node(monkeypatch, capability, arch_list)
    check_kernels(torch.device("cuda", 0))


@pytest.mark.parametrize(("capability", "arch_list", "wheel"), [
    ((7, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], "whl/cu126"),  # a V100 under a cu128 torch
    ((12, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], "whl/cu128"),  # Blackwell under cu126
])
def test_a_torch_without_the_gpus_kernels_fails_at_start_naming_the_wheel(monkeypatch, capability, arch_list, wheel):
    as_gpu_node(monkeypatch, capability, arch_list)
    sm = f"sm_{capability[0]}{capability[1]}"
    with pytest.raises(MissingKernelsError, match=rf"has no {sm} kernels .*install a torch wheel built for {sm}.*{wheel}"):
        check_kernels(torch.device("cuda", 0))


def test_a_fractional_actor_is_capped_to_its_share_of_the_gpu(monkeypatch):
    fractions = as_gpu_node(monkeypatch, (8, 0), ["sm_80"])
    cap_memory_share(torch.device("cuda", 0), 0.25)
    cap_memory_share(torch.device("cuda", 0), 1.0)  # a whole GPU: no cap
    assert fractions == [(0.25, torch.device("cuda", 0))]


def test_waiting_for_a_gpu_ends_after_gpu_wait_saying_what_to_do(monkeypatch):
    asked, cancelled = object(), []
    monkeypatch.setattr(devices._gpu_capability, "remote", lambda: asked)

    def get(ref, timeout=None):
        assert ref is asked and timeout == 2.5
        raise ray.exceptions.GetTimeoutError("timed out")

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "cancel", lambda ref, force=False: cancelled.append(ref))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(devices, "job_has_fake_gpus", lambda: False)  # the session's Ray may have fake ones
    with pytest.raises(GPUWaitError, match=r"within --gpu-wait 2.5 s .*0 GPUs.*--accelerator cpu"):
        run_capability(True, gpu_wait_s=2.5)
    assert cancelled == [asked]
    assert run_capability(False, gpu_wait_s=2.5) is None


def test_a_job_on_fake_gpus_starts_no_task_to_ask_their_capability(local_ray, monkeypatch):
    # local_ray: fake GPUs in the job's runtime environment, not in this (the driver's) process environment
    monkeypatch.delenv(FAKE_GPUS_ENV, raising=False)
    monkeypatch.setattr(devices._gpu_capability, "remote", lambda: pytest.fail("a GPU task was started"))
    assert devices.job_has_fake_gpus() and run_capability(True, gpu_wait_s=2.5) is None
    real = type("Context", (), {"runtime_env": {"env_vars": {"OTHER": "1"}}})()
    monkeypatch.setattr(ray, "get_runtime_context", lambda: real)
    assert not devices.job_has_fake_gpus()
    monkeypatch.setenv(FAKE_GPUS_ENV, "1")  # as benchmarks.scaling's driver has it
    assert devices.job_has_fake_gpus()
