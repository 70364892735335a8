"""GPU memory three ways: what torch's allocator handed out (`max_memory_allocated`), what it holds from the
driver (`max_memory_reserved`, with the cache and fragmentation), and what the driver counts for the process
(NVML: the CUDA context too). The first alone understates what must fit on the GPU."""

from __future__ import annotations

import os

import pynvml
import torch


def gpu_memory(device: torch.device) -> dict[str, int | None]:
    """Peaks since the last `torch.cuda.reset_peak_memory_stats` and NVML's readings now, in bytes."""
    process, used = nvml_memory(device)
    return {
        "max_allocated_bytes": torch.cuda.max_memory_allocated(device),
        "max_reserved_bytes": torch.cuda.max_memory_reserved(device),
        "nvml_process_bytes": process,
        "nvml_device_used_bytes": used,
    }


def nvml_memory(device: torch.device) -> tuple[int | None, int | None]:
    """(this process's memory on the GPU, the GPU's used memory) as NVML reads them; None where it cannot
    (no NVML, or a container whose process ids NVML does not know)."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None, None
    try:
        handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(device).uuid}")
        used = pynvml.nvmlDeviceGetMemoryInfo(handle).used
        mine = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == os.getpid()]
        return (mine[0] if mine else None), used
    except pynvml.NVMLError:
        return None, None
    finally:
        pynvml.nvmlShutdown()
