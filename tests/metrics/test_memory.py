"""jobs.metrics.memory with torch's CUDA queries and NVML faked (no GPU here): allocated, reserved and NVML's figures."""

import os
from types import SimpleNamespace

import pynvml
import torch

from jobs.metrics.memory import gpu_memory


def fake_gpu(monkeypatch, processes):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3_000)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 4_000)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid="1234-abcd"))
    handles = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByUUID", lambda uuid: handles.append(uuid) or "handle")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda handle: SimpleNamespace(used=9_000))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", lambda handle: processes)
    return handles


def test_reserved_and_nvml_figures_beside_allocated(monkeypatch):
    handles = fake_gpu(monkeypatch, [SimpleNamespace(pid=1, usedGpuMemory=1), SimpleNamespace(pid=os.getpid(), usedGpuMemory=5_000)])
    assert gpu_memory(torch.device("cuda", 0)) == {"max_allocated_bytes": 3_000, "max_reserved_bytes": 4_000,
                                                   "nvml_process_bytes": 5_000, "nvml_device_used_bytes": 9_000}
    assert handles == ["GPU-1234-abcd"]  # NVML's name of the GPU torch calls cuda:0, whatever CUDA_VISIBLE_DEVICES says


def test_a_process_nvml_does_not_list_has_no_process_figure(monkeypatch):
    fake_gpu(monkeypatch, [SimpleNamespace(pid=1, usedGpuMemory=1)])  # another pid namespace, as in a container
    assert gpu_memory(torch.device("cuda", 0))["nvml_process_bytes"] is None


def test_without_nvml_only_torchs_figures(monkeypatch):
    fake_gpu(monkeypatch, [])

    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    memory = gpu_memory(torch.device("cuda", 0))
    assert memory["max_reserved_bytes"] == 4_000 and memory["nvml_process_bytes"] is memory["nvml_device_used_bytes"] is None
